"""The `tia2` command. Each subcommand parses its arguments, calls one stage function and prints
what a person needs; a user mistake is one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import sys
import textwrap

from tia2.errors import UserError
from tia2.store import default_store_root

EPILOG = """\
environment:
  TIA2_STORE           store root: a folder or a file:// URL (default ./storage); --store overrides it
  TIA2_SOURCE          folder or URL of the TIA2 release, for ingest-tia2 and benchmark
  MLFLOW_TRACKING_URI  MLflow tracking store (default sqlite:///<cwd>/mlruns/mlflow.db)
  PREFECT_HOME         Prefect's state for benchmark (default ./.prefect)
  HF_HUB_OFFLINE=1     load model weights only from the local cache (no network)

state: where these are not set, a command keeps its state in the folder it runs in (./storage,
  ./mlruns, ./.prefect), wherever the project is; `tia2 benchmark` ends by saying where it went.
"""


def _store(args, create: bool = True, write: bool = True):
    """The store of --store or $TIA2_STORE; for a command that writes to it, checked to be writable
    before any work."""
    from tia2.store import Store

    store = Store(args.store or default_store_root(), create=create)
    if write:
        store.check_writable()
    return store


def _number(kind: type, minimum: float | None = None, *, above: float | None = None,
            word: str | None = None, meaning=None):
    """An argparse type: a finite number of `kind` (int or float), at least `minimum` or more than
    `above` when given, or the keyword `word` (which stands for `meaning`)."""
    expected = "a whole number" if kind is int else "a finite number"
    if minimum is not None:
        expected += f" of at least {minimum:g}"
    if above is not None:
        expected += f" above {above:g}"
    if word is not None:
        expected += f" or {word}"

    def parse(text: str):
        if word is not None and text == word:
            return meaning
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (minimum is None or value >= minimum) and (above is None or value > above)):
            raise argparse.ArgumentTypeError(f"must be {expected} (got {text!r})")
        return value
    return parse


_count = _number(int, minimum=1)  # sizes, steps, limits: zero or fewer would do nothing
_finite = _number(float)
_batch_size = _number(int, minimum=1, word="auto", meaning=None)  # None: from the GPU's free memory


def _csv_list(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated finite numbers, at least one."""
    try:
        values = tuple(_finite(x) for x in text.split(",") if x.strip())
    except argparse.ArgumentTypeError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"must be comma-separated finite numbers (got {text!r})")
    return values


def _device(name: str) -> str:
    """An argparse type: a torch device this machine has (tia2.devices)."""
    from tia2.devices import resolve_device

    try:
        return resolve_device(name)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _set_name(text: str) -> str:
    """An argparse type: the name of a set to create."""
    if not text or text != text.strip():
        raise argparse.ArgumentTypeError(f"a set name must be non-empty, without surrounding spaces (got {text!r})")
    return text


# --- subcommands ------------------------------------------------------------------------------
def cmd_ingest(args) -> int:
    from tasks.ingest import DEFAULT_SOURCE, ingest_tia2

    source = args.source or os.environ.get("TIA2_SOURCE") or DEFAULT_SOURCE  # "" counts as unset
    report = ingest_tia2(_store(args), source, tuple(args.set) if args.set else _all_sets())
    new = report["new_rows"]
    print(f"ingested {source}")
    for set_name in args.set or _all_sets():
        print(f"  {set_name:<14} {report[set_name]['captions']:>4} captions {report[set_name]['images']:>6} images")
    print(f"  new rows: {', '.join(f'{k} {v}' for k, v in new.items())}"
          + ("  (already up to date)" if not any(new.values()) else ""))
    print(f"  contrast sets: dropped {report['repeated_contrast_prompts_dropped']} repeated prompts and "
          f"{report['caption_in_own_contrast_set_dropped']} captions listed in their own set")
    return 0


def _all_sets():
    from tasks.ingest import SETS

    return SETS


def cmd_import_scores(args) -> int:
    from tasks.score import import_scores

    result = import_scores(_store(args, create=False), args.file, replace=args.replace)
    print(f"{args.file}: {result['rows']} rows checked, {result['added']} added, "
          + (f"{result['replaced']} replaced, " if args.replace else "")
          + f"{result['already_present']} already present "
          f"(reward models: {', '.join(result['reward_models'])})")
    return 0


def cmd_import_images(args) -> int:
    from tasks.ingest import import_images

    result = import_images(_store(args, create=False), args.set, args.folder)
    print(f"set {result['set']}: registered {result['registered']} image files "
          f"({result['new_images']} new images; the set has {result['set_images']})"
          + (f"; {result['unmatched_files']} files matched no image of the set" if result["unmatched_files"] else ""))
    return 0


def cmd_sample_prompts(args) -> int:
    from tasks.prompts import record_select_from_pool, record_synthetic_prompts

    if args.synthetic:
        for set_name, report in record_synthetic_prompts(_store(args), args.synthetic).items():
            print(f"{set_name}: {report['prompts']} synthetic prompts ({report['added']} new)")
        return 0
    summary = record_select_from_pool(_store(args), args.pool, args.n, args.k, args.seed, args.set_name)
    print(f"selected {summary['selected']} of {summary['pool_size']} prompts into set {summary['set']!r} "
          f"(k={summary['k']}): coverage {summary['coverage']:.1%}, random selection "
          f"{summary['random_coverage']:.1%}")
    print(f"  embedded {summary['embedded_now']} prompts in {summary['seconds_embed']:.1f} s (the rest from the "
          f"store), k-NN graph {summary['seconds_knn']:.1f} s, selection {summary['seconds_select']:.2f} s")
    return 0


def cmd_contrast(args) -> int:
    from tasks.contrast import LLMSettings, record_contrast

    llm = LLMSettings(model=args.llm_model, base_url=args.llm_base_url, temperature=args.temperature,
                      frequency_penalty=args.frequency_penalty, api_key_env=args.llm_api_key_env,
                      timeout=args.llm_timeout, retries=args.llm_retries)
    report = record_contrast(_store(args, create=False), args.method, args.set, args.missing_only, llm)
    print(f"{args.method}: {report['prompts']} prompts" + ("" if args.method == "dataset" else
          f", {report['rows_added']} new contrast prompts")
          + (f"; {report['without_contrast']} prompts have none" if report["without_contrast"] else ""))
    for set_name, by_method in report["by_set"].items():
        print(f"  {set_name:<14} " + "  ".join(f"{m} {n}" for m, n in sorted(by_method.items())))
    for method, by_category in report["by_category"].items():
        print(f"  {method} by category: " + ", ".join(f"{c} {n}" for c, n in by_category.items()))
    if args.method == "llm":
        print(f"  {report['api_requests']} API requests, {report['cached_replies']} replies from the cache")
    if report["fallbacks"]:
        print(f"{len(report['fallbacks'])} prompts got rules instead (reason in contrast_prompts.note), e.g.:",
              file=sys.stderr)
        for text, reason in list(report["fallbacks"].items())[:5]:
            print(f"  {text!r}: {reason}", file=sys.stderr)
    return 0


def cmd_score(args) -> int:
    from tasks.score import record_score

    weights = "random" if args.random_init else args.weights
    report = record_score(_store(args, create=False), args.reward_model, weights, args.set,
                          args.batch_size, args.device, args.fp16, args.seed)
    print(f"{args.reward_model}: scored {report.images} images, {report.rows_added} new score rows, "
          f"{report.images_per_second:.1f} images/s")
    if report.rows_superseded:
        print(f"{report.rows_superseded} rows of older scoring code replaced by the current version's")
    if report.failures:
        print(f"{len(report.failures)} images could not be scored (table score_failures), e.g.:", file=sys.stderr)
        for image_id, reason in report.failures[:5]:
            print(f"  {image_id}: {reason}", file=sys.stderr)
        return 1
    return 0


def cmd_generate(args) -> int:
    from tasks.generate import record_generate

    report = record_generate(_store(args, create=False), args.model, "random" if args.random_init else args.weights,
                             args.set, args.images_per_prompt, args.steps, args.guidance, args.seed,
                             args.batch_size, args.max_prompts, args.device, args.lora, args.dtype,
                             args.channels_last, args.compile)
    print(f"{args.model}: made {report.images} images ({report.already_present} already present), "
          f"{report.images_per_second:.2f} images/s")
    return 0


def cmd_best_of_n(args) -> int:
    from tasks.evaluate import record_best_of_n
    from tia2.specs import parse_spec

    try:
        ns = sorted({int(n) for n in args.n.split(",") if n.strip()})
    except ValueError:
        raise UserError(f"--n takes comma-separated whole numbers, got {args.n!r}") from None
    picks = record_best_of_n(_store(args, create=False), [parse_spec(s) for s in args.reward], ns,
                             args.generator, args.set)
    table = picks.groupby(["reward", "n"], sort=False)["value"].mean().unstack("n")
    print(f"best-of-n over {picks['prompt_id'].nunique()} prompts ({picks['generator'].iloc[0]}): "
          f"mean reward of the picked image")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    return 0


def cmd_metrics(args) -> int:
    from tasks.metrics import format_table2, record_metrics
    from tia2.specs import parse_spec

    specs = [parse_spec(s) for s in args.reward]
    means = record_metrics(_store(args, create=False), specs, args.set, args.out)
    print(format_table2(means))
    if args.out:
        print(f"\nper-caption metrics written to {args.out}")
    return 0


def cmd_tune(args) -> int:
    from tasks.metrics import DEFAULT_LAMS, DEFAULT_TAUS, record_tune

    result = record_tune(_store(args, create=False, write=False), args.reward_model, args.set,
                         args.tau or DEFAULT_TAUS, args.lam or DEFAULT_LAMS)
    print("best values by the mean of AP@5, AP@10, AP@25 (TextNorm paper §4.3):")
    for row in result.best.itertuples():
        value = f"tau={row.tau:g}" if row.model != "ensemble" else f"lam={row.lam:g}"
        print(f"  {row.set:<14} {row.model:<16} {value:<14} AP-mean {row.ap_mean:.4f}   {row.reward}")
    return 0


TABLE_VIEW_ROWS = 100  # the rows `tia2 sql` shows as a table unless --limit says otherwise: a look, not a dump


def cmd_sql(args) -> int:
    limit = args.limit if args.limit is not None else 0 if args.csv or args.json else TABLE_VIEW_ROWS
    with _store(args, create=False, write=False).stream_readonly(args.query) as (columns, batches):
        rows = itertools.chain.from_iterable(batches)
        try:
            if args.csv:
                writer = csv.writer(sys.stdout)
                writer.writerow(columns)
                writer.writerows(itertools.islice(rows, limit or None))
            elif args.json:
                _write_json(columns, itertools.islice(rows, limit or None))
            else:
                shown = list(itertools.islice(rows, limit or None))
                _print_table(columns, shown, more=next(rows, None) is not None)
        except BrokenPipeError:  # e.g. `| head`: the reader has what it wants
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _write_json(columns: list[str], rows) -> None:
    """A JSON list of records, written as the rows come."""
    sys.stdout.write("[")
    for i, row in enumerate(rows):
        sys.stdout.write(("," if i else "") + "\n " + json.dumps(dict(zip(columns, row)), default=str))
    sys.stdout.write("\n]\n")


def _print_table(columns: list[str], rows: list[tuple], more: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, box=None, header_style="bold")
    for row in rows:
        table.add_row(*("NULL" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v) for v in row))
    Console(width=max(100, os.get_terminal_size(0).columns if sys.stdout.isatty() else 200)).print(table)
    count = f"{len(rows)} row{'s' if len(rows) != 1 else ''}"
    print(f"(the first {count}; more with --limit N, all with --limit 0 or --csv/--json)" if more else f"({count})")


def cmd_finetune(args) -> int:
    from tasks.finetune import paper_config, record_finetune, sweep_kl_coefficient

    sweep = args.kl_beta == "sweep"
    overrides = {k: getattr(args, k) for k in (
        "steps", "checkpoint_every", "seed", "denoise_steps", "guidance", "learning_rate", "batch_size",
        "lora_rank", "images_per_prompt", "keep", "kl_beta", "samples_per_iteration", "refl_lambda", "refl_sampler",
        "eval_images_per_prompt", "mixed_precision")}
    if sweep:
        overrides["kl_beta"] = None
    if args.lora_rank is not None:
        overrides["lora_alpha"] = float(args.lora_rank)
    config = paper_config(args.algo, args.reward, **overrides)
    options = dict(sets=args.set, max_prompts=args.max_prompts,
                   weights="random" if args.random_init else args.weights, device=args.device)
    store = _store(args, create=False)
    if not sweep:
        _print_finetune(record_finetune(store, args.model, config, **options))
        return 0
    result = sweep_kl_coefficient(store, args.model, config, **options)
    for beta, run in result.runs.items():
        print(f"KL coefficient {beta}:")
        _print_finetune(run)
    print("KL coefficient  run           selected step  beats base")
    for beta, run in result.runs.items():
        print(f"{beta:>14}  {run.run:<12}  {run.selected_step:>13}  {result.wins[beta]:>10}")
    print(f"chosen KL coefficient (most wins; ties to the larger): {result.chosen} "
          f"(run {result.runs[result.chosen].run})")
    return 0


def _print_finetune(result) -> None:
    config = result.config
    done = result.checkpoints[-1].step if result.checkpoints else result.start_step
    print(f"{config.algo} on {result.generator} against {config.reward}: steps {result.start_step} -> {done} "
          f"({result.steps_per_second:.2f} steps/s), adapters in {result.folder}")
    for c in result.checkpoints:
        print(f"  step {c.step:>6}  mean reward {c.mean_reward:.4f} (base {c.base_mean_reward:.4f})  "
              f"beats base {c.wins}/{c.n_eval}")
    if result.selected_step is not None:
        print(f"  selected checkpoint (earliest with the most wins): step {result.selected_step}")


def cmd_evaluate(args) -> int:
    from tasks.evaluate_finetune import record_evaluate_finetune, wins_table

    result = record_evaluate_finetune(
        _store(args, create=False), args.model, args.gold, args.run, args.adapter or (), args.set, args.max_prompts,
        args.images_per_prompt, args.steps, args.guidance, args.seed, args.proxy, args.reward or (), args.tol,
        args.weights, args.reward_weights, args.device, args.batch_size)
    print(f"{len(result.adapters)} adapter(s) against {result.generator} on {len(result.prompts)} held-out prompts x "
          f"{args.images_per_prompt} images ({result.images_made} images made, {result.rows_scored} score rows added)")
    print("wins/ties/losses of the matched pairs (same prompt and seed) against the base model:")
    print(wins_table(result.win_tie_loss).to_string())
    print(f"\nproxy {result.proxy}, gold {result.gold}: means over fine-tuning steps (step 0: the base model)")
    print(result.steps_curve.drop(columns=["run"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("best-of-n of the base model's images by the proxy")
    print(result.best_of_n_curve.drop(columns=["kl"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


def cmd_benchmark(args) -> int:
    from tia2.config import resolve_config

    overrides = {"store": args.store} if args.store else {}
    config = resolve_config(args.config, overrides)  # a user mistake stops here, in one line
    from flows.tia2_benchmark import tia2_benchmark  # Prefect: only once the config is right

    summary = tia2_benchmark(config=args.config, overrides=overrides)
    ingest = summary["ingest"]
    print("TIA2 in the store: " + ", ".join(
        f"{s} {ingest[s]['captions']} captions / {ingest[s]['images']} images"
        for s in config.get("sets", _all_sets()) if s in ingest))
    if summary["selected"]:
        picked = summary["selected"]
        print(f"selected {picked['selected']} of {picked['pool_size']} pool prompts (set {picked['set']}): "
              f"coverage {picked['coverage']:.1%}, random {picked['random_coverage']:.1%}")
    contrast = summary["contrast"]
    if contrast["prompts"]:
        print(f"contrast prompts ({contrast['method']}) for {contrast['prompts']} prompts that had none: "
              f"{contrast['rows_added']} new")
    if summary["generated"]:
        made = summary["generated"]
        print(f"generated with {made['generator']}: {made['images']} new images "
              f"({made['already_present']} already present)")
    for scored in summary["scores"]:
        print(f"scored with {scored['reward_model']}: {scored['images']} images, {scored['rows_added']} new rows"
              + (f", {scored['failures']} unreadable" if scored["failures"] else "")
              + ("" if scored["images"] else " (no image files registered yet: see image_folders)"))
    if summary["caption_ranking"]:
        print("\nhow often each reward model scores an image's caption above all its contrast prompts:")
        print(summary["caption_ranking"] + "\n")
    print(summary["table2"] or "no reward specs configured: no metrics against human labels")
    for tuned in summary.get("finetune") or []:
        print(f"fine-tuned ({tuned['algo']}, run {tuned['run']}) to step {tuned['final_step']}: mean reward "
              f"{tuned['final_mean_reward']:.4f} against the base model's {tuned['base_mean_reward']:.4f} (beats it "
              f"{tuned['final_wins']}); selected step {tuned['selected_step']}")
        if tuned.get("evaluation"):
            import pandas as pd

            from tasks.evaluate_finetune import wins_table

            evaluation = tuned["evaluation"]
            print(f"  on {evaluation['heldout_prompts']} held-out prompts, wins/ties/losses against the base "
                  f"model:\n{wins_table(pd.DataFrame(evaluation['win_tie_loss'])).to_string()}\n  proxy "
                  f"{evaluation['proxy']} and gold {evaluation['gold']} over the steps:\n"
                  f"{pd.DataFrame(evaluation['steps_curve']).to_string(index=False)}")
    from tia2.store import Store
    from tia2.tracking import run_page_url

    print(f"report: {summary['report']}")
    print(f"state: store {Store(config['store'], create=False).root}, MLflow {_tracking_uri()}, "
          f"Prefect {os.environ['PREFECT_HOME']}")
    run_id = summary["mlflow_run_id"]
    print(f"MLflow run {run_id}: " + (run_page_url(run_id) or (
        f"mlflow ui --backend-store-uri {_tracking_uri()}, then "
        f"{run_page_url(run_id, server='http://127.0.0.1:5000')}")))
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tia2")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed: pip install -e .)"


def _tracking_uri() -> str:
    from tia2.tracking import tracking_uri

    return tracking_uri()


# --- the parser ---------------------------------------------------------------------------------
class CommandLineError(Exception):
    """A mistake in the command line found by argparse; its text names the command."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line, like a UserError (argparse would print the usage before it and exit).
        raise CommandLineError(f"{self.prog}: error: {message}")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", metavar="DIR", default=argparse.SUPPRESS,
                        help="store root (default: $TIA2_STORE or ./storage)")
    parser = _Parser(
        prog="tia2", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark text-to-image reward models against human labels (TIA2) and "
                    "fine-tune generators against them.",
        epilog=EPILOG)
    parser.add_argument("--mlflow-uri", metavar="URI", help="MLflow tracking URI (default: local mlruns/)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_text, description=""):
        p = sub.add_parser(name, parents=[common], help=help_text,
                           description=textwrap.dedent(description or help_text),
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
        p.set_defaults(func=func)
        return p

    p = add("ingest-tia2", cmd_ingest, "read the TIA2 benchmark (prompts, contrast sets, labels) into the store", """\
        Read the TIA2 benchmark into the store: prompts, contrast prompts (method `dataset`),
        images (file names, no pixels) and the three human labels of every image.
        SOURCE is a folder laid out like the release (human_annotations/, prompts/) or a base URL.
        Everything is checked before anything is written; re-running is a no-op.""")
    p.add_argument("source", nargs="?", metavar="SOURCE",
                   help="folder or base URL (default: $TIA2_SOURCE, else the public TextNorm repository)")
    p.add_argument("--set", action="append", choices=list(_all_sets()), help="only this set (repeatable)")

    p = add("import-scores", cmd_import_scores, "import reward scores computed elsewhere (Parquet or CSV)", """\
        Import scores from a Parquet or CSV file with columns
            set, image, prompt, reward_model, score   [, model_version]
        one row per (image, text scored against, reward model): the caption and any contrast
        prompt of the image. Every row is checked against the store (known image, known prompt
        for that image, finite score, no repeated key, no other score already stored for the key
        unless --replace); on any problem nothing is written.""")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--replace", action="store_true",
                   help="replace stored scores of the same key with the file's (all or, on failure, none)")

    p = add("import-images", cmd_import_images, "register image files (with their sha256) for scoring", """\
        Register image files so they can be scored. If SET is already in the store (a TIA2 set),
        files are matched to its images by file name (e.g. the TIA2 JPEGs you downloaded).
        Otherwise FOLDER is laid out by caption, FOLDER/<caption>/<image files>, and becomes a
        new set of prompts and images.""")
    p.add_argument("--set", type=_set_name, required=True, metavar="SET")
    p.add_argument("folder", metavar="FOLDER")

    p = add("sample-prompts", cmd_sample_prompts, "pick diverse prompts from a pool, or write TIA2's synthetic prompts", """\
        --pool FILE: graph-based selection (ImageReward paper, Appendix A.1; vote-k). Prompts are
        embedded with all-MiniLM-L6-v2 (kept in the store: a pool is embedded once), joined to
        their k nearest neighbours by cosine similarity (exact up to 50,000 prompts, an inverted-
        file index above), and picked greedily: a prompt scores the votes of prompts that have it
        as a neighbour, votes from prompts near an earlier pick count ten times less. The picks
        become set NAME in `prompts`, their order and coverage go to `prompt_selections`, and
        MLflow gets a map of the pool. Deterministic for a seed.
        FILE: JSON (strings, or objects with text/prompt/caption), CSV or Parquet (a
        text/prompt/caption column), or text with one prompt per line.
        --synthetic SET: TIA2's synthetic prompts (counting: 1-6 of each of Table 6's 25
        classes; composition: every pair of classes), as the benchmark lists them.""")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--pool", metavar="FILE", help="the prompt pool to select from")
    source.add_argument("--synthetic", action="append", choices=["counting", "composition"],
                        help="write this synthetic TIA2 set (repeatable)")
    p.add_argument("--n", type=_count, default=100, help="prompts to select (default 100)")
    p.add_argument("--k", type=_count, default=150, help="neighbours per prompt in the graph (default 150, the paper's)")
    p.add_argument("--seed", type=int, default=0, help="breaks ties between equal scores (default 0)")
    p.add_argument("--set-name", type=_set_name, default="selected", metavar="NAME", help="set of the selected prompts (default selected)")

    from tasks.contrast import LLMSettings

    llm = LLMSettings()
    p = add("contrast", cmd_contrast, "make or count the contrast prompts of the store's prompts", """\
        Contrast prompts are close to a prompt but mean something else; TextNorm normalises a
        reward over them. Methods:
          rules    a category detector (counting, composition, spatial, colors, text, ...) picks
                   rules: other counts and objects, dropped, duplicated and blended ("an A-like B")
                   objects, other spatial relations, swapped colours, misspelled quoted text
          llm      TextNorm's Algorithm 1 with Table 19's few-shot examples, through any
                   OpenAI-compatible server; replies are cached in the store (llm_replies), so the
                   same prompt, model and parameters never call the API twice; timeouts, 429 and
                   5xx are retried with backoff; a prompt whose request still fails, or whose reply
                   has no list of captions, gets rules (rows say why in contrast_prompts.note)
          dataset  the sets shipped with TIA2 (from `tia2 ingest-tia2`): counts them
        The API key is read from $OPENAI_API_KEY (or --llm-api-key-env) and never logged.""")
    p.add_argument("--method", required=True, metavar="rules|llm|dataset")
    p.add_argument("--set", action="append", metavar="NAME", help="only this set (repeatable; default: all)")
    p.add_argument("--missing-only", action="store_true", help="only prompts with no contrast prompt of any method yet")
    p.add_argument("--llm-base-url", metavar="URL", help="OpenAI-compatible API, e.g. http://localhost:8000/v1 "
                   "(default: $OPENAI_BASE_URL, else OpenAI's)")
    p.add_argument("--llm-model", default=llm.model, metavar="MODEL", help=f"(default {llm.model}, the paper's)")
    p.add_argument("--temperature", type=_finite, default=llm.temperature, metavar="T",
                   help=f"sampling temperature (default {llm.temperature:g}, the paper's)")
    p.add_argument("--frequency-penalty", type=_finite, default=llm.frequency_penalty, metavar="P",
                   help=f"(default {llm.frequency_penalty:g}, the paper's)")
    p.add_argument("--llm-api-key-env", default=llm.api_key_env, metavar="VAR",
                   help=f"environment variable holding the API key (default {llm.api_key_env})")
    p.add_argument("--llm-timeout", type=_number(float, above=0), default=llm.timeout, metavar="SECONDS",
                   help=f"per request (default {llm.timeout:g})")
    p.add_argument("--llm-retries", type=_number(int, minimum=0), default=llm.retries, metavar="N",
                   help=f"retries after a timeout, 429 or 5xx, with exponential backoff (default {llm.retries})")

    from tia2.models import list_models

    p = add("score", cmd_score, "score the store's images with a reward model", """\
        Score every image that has pixels against its caption and all its contrast prompts,
        writing only the rows missing for this model and weights. Safe to kill and re-run.
        Unreadable images are recorded in score_failures; the command then exits with 1.
        Models: """ + ", ".join(list_models()))
    p.add_argument("--reward-model", required=True, metavar="NAME")
    p.add_argument("--set", action="append", metavar="NAME", help="only this set (repeatable)")
    p.add_argument("--batch-size", type=_count, default=32, metavar="N", help="images per batch (default 32)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--fp16", action="store_true", help="half precision (GPU only)")
    p.add_argument("--weights", default="pretrained", metavar="PATH",
                   help="released weights from the hub/HF cache (default) or a local file/folder")
    p.add_argument("--random-init", action="store_true", help="the full-size architecture with random weights (timing)")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights (default 0)")

    from tia2.models.diffusion import list_generators

    p = add("generate", cmd_generate, "generate images for the store's prompts with a diffusion model", """\
        Make images for every prompt of the given sets with a Stable Diffusion pipeline. Image i of
        a prompt is seeded from (prompt, i, --seed): the same inputs give the same PNGs (on the CPU
        byte for byte, whatever the batch size). Files are content-addressed under the store's
        images/; a re-run makes only the missing images. Generators: """ + ", ".join(list_generators()))
    p.add_argument("--model", required=True, metavar="ID", help="generator name (e.g. sd-2-1, tiny-sd)")
    p.add_argument("--images-per-prompt", type=_count, default=1, metavar="N")
    p.add_argument("--set", action="append", metavar="NAME", help="only this set (repeatable)")
    p.add_argument("--steps", type=_count, default=50, help="denoising steps (default 50, TextNorm paper)")
    p.add_argument("--guidance", type=_finite, default=7.5, help="classifier-free guidance (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--batch-size", type=_batch_size, default=None, metavar="N|auto",
                   help="images per batch, across prompts (default auto: on a GPU, as many as its free "
                        "memory holds, measured with two short runs; on the CPU 4)")
    p.add_argument("--max-prompts", type=_count, metavar="N", help="only the first N prompts of each set")
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--weights", default="pretrained", metavar="PATH",
                   help="released weights (hub / HF cache, default) or a local diffusers folder")
    p.add_argument("--random-init", action="store_true", help="the full-size architecture with random weights")
    p.add_argument("--lora", metavar="PATH", help="a LoRA adapter (pytorch_lora_weights.safetensors or its folder)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="precision (fp16/bf16: GPU only)")
    p.add_argument("--channels-last", action="store_true", help="UNet in channels-last memory format (GPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (GPU): ~1.5 min to compile, then 2.2x per image at batch 1 (launch-bound)")

    p = add("best-of-n", cmd_best_of_n, "pick the best of the first n images per prompt for reward specs", """\
        Best-of-n (TextNorm paper, section 5.2): per prompt, the image with the highest reward
        among its first n generated images, for every reward spec and n. Stores the picks in the
        best_of_n table and logs a contact sheet per prompt (rows: rewards, columns: n) to MLflow.
        The images must be scored by the specs' reward models (tia2 score).""")
    p.add_argument("--n", required=True, metavar="N1,N2,...", help="e.g. 16,64,256")
    p.add_argument("--reward", action="append", required=True, metavar="SPEC", help="a reward spec (repeatable)")
    p.add_argument("--generator", metavar="NAME", help="whose images (start of images.generator, e.g. tiny-sd)")
    p.add_argument("--set", action="append", metavar="NAME", help="only this set (repeatable)")

    p = add("metrics", cmd_metrics, "per-caption metrics of reward specs against the human labels", """\
        Evaluate reward specs with the TIA2 protocol: per caption AUROC, AUPRC, AP@5/10/25,
        Spearman and Kendall; per-set means printed like the TextNorm paper's Table 2.
        Stores rows in prompt_metrics and logs the run (tables, ROC/PR plots) to MLflow.

        reward specs:
          NAME                          a reward model's scores (NAME@VERSION for one version)
          textnorm(SPEC, tau=T)         TextNorm over the caption's contrast prompts
          mean(SPEC, SPEC, ...)         mean ensemble
          ur(SPEC, SPEC, ..., lam=L)    uncertainty-regularised ensemble""")
    p.add_argument("--reward", action="append", required=True, metavar="SPEC", help="a reward spec (repeatable)")
    p.add_argument("--set", action="append", metavar="NAME", help="only this set (repeatable; default: all)")
    p.add_argument("--out", metavar="FILE.csv", help="write the per-caption metrics to this CSV")

    p = add("tune", cmd_tune, "tune TextNorm's tau per model and the ensemble's lambda", """\
        The TextNorm paper's light tuning: for each reward model and set, the tau of
        textnorm(MODEL, tau=...) with the best mean of AP@5/10/25; with two or more models, the
        lambda of ur(textnorm(M1, tau=best), ..., lam=...) per set. Logs the grid and a plot.""")
    p.add_argument("--reward-model", action="append", required=True, metavar="NAME",
                   help="a reward model with stored scores (repeatable)")
    p.add_argument("--set", action="append", metavar="NAME", help="only this set (repeatable)")
    p.add_argument("--tau", type=_csv_list, metavar="T1,T2,...", help="tau grid (default: 16 values 0.001..100)")
    p.add_argument("--lam", type=_csv_list, metavar="L1,L2,...", help="lambda grid (default: 0..10)")

    from tia2.store import TABLES

    p = add("sql", cmd_sql, "run a read-only SQL query over the store's tables", textwrap.dedent("""\
        Run one read-only query (SELECT, EXPLAIN) over the DuckDB catalog of the store.
        --csv and --json print every row as it comes; the table view shows the first rows.
        Example: tia2 sql "SELECT reward, set, avg(auroc) FROM prompt_metrics GROUP BY ALL"

        tables and their columns:
        """) + "\n".join(textwrap.fill(", ".join(spec.schema.names), width=100, initial_indent=f"  {name:<22}",
                                       subsequent_indent=" " * 24) for name, spec in TABLES.items()))
    p.add_argument("query", metavar="QUERY")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="print CSV")
    fmt.add_argument("--json", action="store_true", help="print JSON records")
    p.add_argument("--limit", type=_number(int, minimum=0), metavar="N",
                   help=f"print at most N rows (default {TABLE_VIEW_ROWS} in the table view, all with --csv/--json; "
                        f"0: all)")

    p = add("finetune", cmd_finetune, "fine-tune a generator's UNet with LoRA against a reward spec", """\
        Fine-tune LoRA weights of the UNet (attention projections; the base stays frozen) on the
        store's prompts (--set, --max-prompts) to maximise a reward spec (any: a model, textnorm(...),
        mean(...), ur(...); scored online, on pixels). A step is one optimizer update.
          rwr   reward-weighted regression (TextNorm paper eq. 4): the base model makes N images per
                prompt, the top K by the reward are the data; loss = reward-weighted denoising loss
                + beta * distance of the noise prediction to the frozen base's (the KL term).
                Defaults (Table 4): 50 steps, guidance 7.5, AdamW lr 1e-5, wd 1e-2, batch 32,
                N 100, K 10, beta 0.5; try beta in 0, 0.25, 0.5, 0.75, 1 and keep the one whose
                selected checkpoint beats the base most often (Appendix A.2).
          ddpo  DDPO (Black et al. 2023; TextNorm eq. 5): DDIM sampling with eta 1 and per-step
                log-probabilities, per-prompt reward normalisation, PPO-clipped policy gradient
                over timesteps, one update per iteration of 256 samples. Defaults (Table 4):
                50 steps, guidance 5, lr 3e-4, wd 1e-4, batch 64. MLflow gets each step's
                approx_kl and clipfrac (as trl logs them).
          refl  ReFL (ImageReward Algorithm 1): denoise without gradients to a random step in
                [30, 39] of 40, one step with gradients, predict x0, decode, reward;
                loss = 1e-3 * ReLU(2 - reward) + the denoising loss on (caption, image) pairs (the
                store's images of the prompts, else the base model's). lr 1e-5, batch 64.
                --refl-sampler ddpm (the default) samples as ImageReward's ReFL.py: stochastic
                DDPM steps, no classifier-free guidance (the gradient step too); ddim:
                deterministic DDIM with --guidance.
        Checkpoints (adapter safetensors + optimizer state) every --checkpoint-every steps go to
        the store's adapters/<algo>-<run>/step-N, to MLflow (with base model, reward spec, step) and
        to the finetune_checkpoints table, each evaluated against the base model on the training
        prompts with fixed seeds. Re-running the same command continues from the last checkpoint.""")
    p.add_argument("--algo", required=True, choices=["rwr", "ddpo", "refl"])
    p.add_argument("--reward", required=True, metavar="SPEC", help="the reward spec to maximise")
    p.add_argument("--model", required=True, metavar="ID", help="generator (tiny-sd, sd-2-1, sd-2-1-base)")
    p.add_argument("--set", action="append", metavar="NAME", help="training prompts of this set (repeatable)")
    p.add_argument("--max-prompts", type=_count, metavar="N", help="only the first N prompts of each set")
    p.add_argument("--steps", type=_count, metavar="N", help="target optimizer steps (default rwr 1000, ddpo 500, refl 1000)")
    p.add_argument("--checkpoint-every", type=_count, metavar="N", help="(default 100)")
    p.add_argument("--seed", type=int, help="(default 0)")
    p.add_argument("--denoise-steps", type=_count, metavar="N", help="sampling steps (default 50; refl 40)")
    p.add_argument("--guidance", type=_finite, help="classifier-free guidance (default 7.5; ddpo 5)")
    p.add_argument("--learning-rate", type=_number(float, above=0), metavar="LR")
    p.add_argument("--batch-size", type=_count, metavar="N")
    p.add_argument("--lora-rank", type=_count, metavar="R", help="LoRA rank, alpha = rank (default 4)")
    p.add_argument("--images-per-prompt", type=_count, metavar="N", help="rwr: images per prompt (default 100)")
    p.add_argument("--keep", type=_count, metavar="K", help="rwr: top K per prompt (default 10)")
    p.add_argument("--kl-beta", type=_number(float, word="sweep", meaning="sweep"), metavar="B|sweep",
                   help="rwr: KL coefficient (default 0.5); `sweep`: a run for each of 0, 0.25, 0.5, 0.75 and 1, "
                        "then the one whose selected checkpoint beats the base model on the most images "
                        "(TextNorm paper, Appendix A.2)")
    p.add_argument("--samples-per-iteration", type=_count, metavar="N", help="ddpo (default 256)")
    p.add_argument("--refl-lambda", type=_finite, metavar="L", help="refl: reward loss scale (default 1e-3)")
    p.add_argument("--refl-sampler", choices=["ddpm", "ddim"],
                   help="refl: the steps to the gradient step; ddpm (default): ReFL.py's stochastic DDPM without "
                        "guidance; ddim: deterministic DDIM with --guidance")
    p.add_argument("--mixed-precision", choices=["fp32", "bf16", "fp16"],
                   help="autocast of the UNet and VAE (default fp32; LoRA weights and optimizer stay fp32); fp16, "
                        "as the papers trained, scales the loss against underflowing gradients")
    p.add_argument("--eval-images-per-prompt", type=_count, metavar="N",
                   help="images per prompt for each checkpoint's comparison with the base (default 4)")
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--weights", default="pretrained", metavar="PATH", help="generator weights (released or a folder)")
    p.add_argument("--random-init", action="store_true", help="the generator's architecture with random weights")

    p = add("evaluate", cmd_evaluate, "evaluate fine-tuned adapters against their base model on held-out prompts", """\
        Evaluate a fine-tuning run's checkpoints (--run, a key of finetune_checkpoints) or adapter
        files/folders (--adapter) against the base model (--model, --weights) on held-out prompts:
        the prompts of --set (first --max-prompts of each) that the adapters were not trained on.
        The base and every adapter make --images-per-prompt images per prompt from the same seeds,
        so image i of an adapter and image i of the base are a matched pair; every image is scored
        by the proxy (default: the reward the adapters were trained on), the reward models it
        combines, the gold (--gold: a reward spec, or `human` for images with human labels) and any
        --reward. Images and scores are cached in the store: a re-run makes only what is missing.
        Per reward spec and adapter, the pairs won (adapter above base + --tol), tied and lost go to
        the finetune_evaluation table. Over-optimisation (Gao et al. 2023): the proxy's and the
        gold's means over training steps, and over best-of-n of the base model's images against
        sqrt(KL), KL = log n - (n - 1)/n. MLflow gets the tables, the plots and image grids (a row
        per prompt, a column per model). TextNorm specs need contrast prompts (tia2 contrast).""")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", metavar="RUN", help="a fine-tuning run: all its checkpoints, by step")
    which.add_argument("--adapter", action="append", metavar="PATH",
                       help="a LoRA adapter (pytorch_lora_weights.safetensors or its folder; repeatable)")
    p.add_argument("--model", required=True, metavar="ID", help="the base generator (tiny-sd, sd-2-1, sd-2-1-base)")
    p.add_argument("--weights", default="pretrained", metavar="random|pretrained|FOLDER",
                   help="the base generator's weights (default pretrained)")
    p.add_argument("--gold", required=True, metavar="SPEC|human", help="the gold reward of the over-optimisation curves")
    p.add_argument("--proxy", metavar="SPEC", help="the optimised reward (default: the adapters' training reward)")
    p.add_argument("--reward", action="append", metavar="SPEC", help="another reward spec to compare with (repeatable)")
    p.add_argument("--set", action="append", metavar="NAME", help="held-out prompts of this set (repeatable; default all)")
    p.add_argument("--max-prompts", type=_count, metavar="N", help="only the first N held-out prompts of each set")
    p.add_argument("--images-per-prompt", type=_count, default=4, metavar="N",
                   help="images per prompt and model; best-of-n goes up to N (default 4)")
    p.add_argument("--steps", type=_count, default=50, help="denoising steps per image (default 50)")
    p.add_argument("--guidance", type=_finite, default=7.5, help="classifier-free guidance (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the images (default 0)")
    p.add_argument("--tol", type=_number(float, minimum=0), default=1e-6,
                   help="a pair whose values differ by at most this is a tie (default 1e-6)")
    p.add_argument("--reward-weights", default="pretrained", metavar="random|pretrained|PATH",
                   help="the reward models' weights (default pretrained)")
    p.add_argument("--batch-size", type=_batch_size, default=None, metavar="N|auto",
                   help="images per generation batch (default auto, as for generate)")
    p.add_argument("--device", type=_device, default="cpu")

    from tia2.config import CONFIG_KEYS

    p = add("benchmark", cmd_benchmark, "run the tia2-benchmark flow locally (no server needed)",
            "Run the tia2-benchmark Prefect flow in this process. Config keys (all checked before any work):\n"
            + "\n".join(f"  {k:<12} {v.meaning}" for k, v in CONFIG_KEYS.items()))
    p.add_argument("--config", default="tiny", metavar="PROFILE|FILE",
                   help="profile name in configs/ (tiny, paper) or a YAML file (default: tiny)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except CommandLineError as exc:
        print(exc, file=sys.stderr)
        return 2
    args.store = getattr(args, "store", None)
    if args.mlflow_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.mlflow_uri
    try:
        return args.func(args)
    except UserError as exc:
        print(f"tia2 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
