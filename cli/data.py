"""The commands that fill the store: ingest-tia2, import-scores, import-images, sample-prompts,
contrast."""

from __future__ import annotations

import os
import sys

from cli.command import Command, count, defaults_of, finite, number, open_store, set_name


def ingest_arguments(p) -> None:
    from tasks.ingest import SETS

    p.add_argument("source", nargs="?", metavar="SOURCE",
                   help="folder or base URL (default: $TIA2_SOURCE, else the public TextNorm repository)")
    p.add_argument("--set", action="append", choices=list(SETS), help="only this set (repeatable)")


def run_ingest(args) -> int:
    from tasks.ingest import DEFAULT_SOURCE, SETS, ingest_tia2

    source = args.source or os.environ.get("TIA2_SOURCE") or DEFAULT_SOURCE  # "" counts as unset
    sets = tuple(args.set) if args.set else SETS
    report = ingest_tia2(open_store(args), source, sets)
    new = report["new_rows"]
    print(f"ingested {source}")
    for name in sets:
        print(f"  {name:<14} {report[name]['captions']:>4} captions {report[name]['images']:>6} images")
    print(f"  new rows: {', '.join(f'{k} {v}' for k, v in new.items())}"
          + ("  (already up to date)" if not any(new.values()) else ""))
    print(f"  contrast sets: dropped {report['repeated_contrast_prompts_dropped']} repeated prompts and "
          f"{report['caption_in_own_contrast_set_dropped']} captions listed in their own set")
    return 0


INGEST_TIA2 = Command("ingest-tia2", "read the TIA2 benchmark (prompts, contrast sets, labels) into the store", """\
    Read the TIA2 benchmark into the store: prompts, contrast prompts (method `dataset`),
    images (file names, no pixels) and the three human labels of every image.
    SOURCE is a folder laid out like the release (human_annotations/, prompts/) or a base URL.
    Everything is checked before anything is written; re-running is a no-op.""", ingest_arguments, run_ingest)


def import_scores_arguments(p) -> None:
    p.add_argument("file", metavar="FILE")
    p.add_argument("--replace", action="store_true",
                   help="replace stored scores of the same key with the file's (all or, on failure, none)")


def run_import_scores(args) -> int:
    from tasks.score import import_scores

    result = import_scores(open_store(args, create=False), args.file, replace=args.replace)
    print(f"{args.file}: {result['rows']} rows checked, {result['added']} added, "
          + (f"{result['replaced']} replaced, " if args.replace else "")
          + f"{result['already_present']} already present "
          f"(reward models: {', '.join(result['reward_models'])})")
    return 0


IMPORT_SCORES = Command("import-scores", "import reward scores computed elsewhere (Parquet or CSV)", """\
    Import scores from a Parquet or CSV file with columns
        set, image, prompt, reward_model, score   [, model_version]
    one row per (image, text scored against, reward model): the caption and any contrast
    prompt of the image. Every row is checked against the store (known image, known prompt
    for that image, finite score, no repeated key, no other score already stored for the key
    unless --replace); on any problem nothing is written.""", import_scores_arguments, run_import_scores)


def import_images_arguments(p) -> None:
    p.add_argument("--set", type=set_name, required=True, metavar="SET")
    p.add_argument("folder", metavar="FOLDER")


def run_import_images(args) -> int:
    from tasks.ingest import import_images

    result = import_images(open_store(args, create=False), args.set, args.folder)
    print(f"set {result['set']}: registered {result['registered']} image files "
          f"({result['new_images']} new images; the set has {result['set_images']})"
          + (f"; {result['unmatched_files']} files matched no image of the set" if result["unmatched_files"] else ""))
    return 0


IMPORT_IMAGES = Command("import-images", "register image files (with their sha256) for scoring", """\
    Register image files so they can be scored. If SET is already in the store (a TIA2 set),
    files are matched to its images by file name (e.g. the TIA2 JPEGs you downloaded).
    Otherwise FOLDER is laid out by caption, FOLDER/<caption>/<image files>, and becomes a
    new set of prompts and images.""", import_images_arguments, run_import_images)


def sample_prompts_arguments(p) -> None:
    from tasks.prompts import SYNTHETIC_SETS, record_select_from_pool

    defaults = defaults_of(record_select_from_pool)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--pool", metavar="FILE", help="the prompt pool to select from")
    source.add_argument("--synthetic", action="append", choices=list(SYNTHETIC_SETS),
                        help="write this synthetic TIA2 set (repeatable)")
    p.add_argument("--n", type=count, default=100, help="prompts to select (default 100)")
    p.add_argument("--k", type=count, default=defaults["k"],
                   help=f"neighbours per prompt in the graph (default {defaults['k']}, the paper's)")
    p.add_argument("--seed", type=int, default=defaults["seed"],
                   help=f"breaks ties between equal scores (default {defaults['seed']})")
    p.add_argument("--set-name", type=set_name, default=defaults["set_name"], metavar="NAME",
                   help=f"set of the selected prompts (default {defaults['set_name']})")


def run_sample_prompts(args) -> int:
    from tasks.prompts import record_select_from_pool, record_synthetic_prompts

    if args.synthetic:
        for name, report in record_synthetic_prompts(open_store(args), args.synthetic).items():
            print(f"{name}: {report['prompts']} synthetic prompts ({report['added']} new)")
        return 0
    summary = record_select_from_pool(open_store(args), args.pool, args.n, args.k, args.seed, args.set_name)
    print(f"selected {summary['selected']} of {summary['pool_size']} prompts into set {summary['set']!r} "
          f"(k={summary['k']}): coverage {summary['coverage']:.1%}, random selection "
          f"{summary['random_coverage']:.1%}")
    print(f"  embedded {summary['embedded_now']} prompts in {summary['seconds_embed']:.1f} s (the rest from the "
          f"store), k-NN graph {summary['seconds_knn']:.1f} s, selection {summary['seconds_select']:.2f} s")
    return 0


SAMPLE_PROMPTS = Command("sample-prompts", "pick diverse prompts from a pool, or write TIA2's synthetic prompts", """\
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
    classes; composition: every pair of classes), as the benchmark lists them.""",
    sample_prompts_arguments, run_sample_prompts)


def contrast_arguments(p) -> None:
    from tasks.contrast import METHODS, LLMSettings

    llm = LLMSettings()
    p.add_argument("--method", required=True, metavar="|".join(METHODS))
    p.add_argument("--set", action="append", metavar="NAME", help="only this set (repeatable; default: all)")
    p.add_argument("--missing-only", action="store_true", help="only prompts with no contrast prompt of any method yet")
    p.add_argument("--llm-base-url", metavar="URL", help="OpenAI-compatible API, e.g. http://localhost:8000/v1 "
                   "(default: $OPENAI_BASE_URL, else OpenAI's)")
    p.add_argument("--llm-model", default=llm.model, metavar="MODEL", help=f"(default {llm.model}, the paper's)")
    p.add_argument("--temperature", type=finite, default=llm.temperature, metavar="T",
                   help=f"sampling temperature (default {llm.temperature:g}, the paper's)")
    p.add_argument("--frequency-penalty", type=finite, default=llm.frequency_penalty, metavar="P",
                   help=f"(default {llm.frequency_penalty:g}, the paper's)")
    p.add_argument("--llm-api-key-env", default=llm.api_key_env, metavar="VAR",
                   help=f"environment variable holding the API key (default {llm.api_key_env})")
    p.add_argument("--llm-timeout", type=number(float, above=0), default=llm.timeout, metavar="SECONDS",
                   help=f"per request (default {llm.timeout:g})")
    p.add_argument("--llm-retries", type=number(int, minimum=0), default=llm.retries, metavar="N",
                   help=f"retries after a timeout, 429 or 5xx, with exponential backoff (default {llm.retries})")


def run_contrast(args) -> int:
    from tasks.contrast import LLMSettings, record_contrast

    llm = LLMSettings(model=args.llm_model, base_url=args.llm_base_url, temperature=args.temperature,
                      frequency_penalty=args.frequency_penalty, api_key_env=args.llm_api_key_env,
                      timeout=args.llm_timeout, retries=args.llm_retries)
    report = record_contrast(open_store(args, create=False), args.method, args.set, args.missing_only, llm)
    print(f"{args.method}: {report['prompts']} prompts" + ("" if args.method == "dataset" else
          f", {report['rows_added']} new contrast prompts")
          + (f"; {report['without_contrast']} prompts have none" if report["without_contrast"] else ""))
    for name, by_method in report["by_set"].items():
        print(f"  {name:<14} " + "  ".join(f"{m} {n}" for m, n in sorted(by_method.items())))
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


CONTRAST = Command("contrast", "make or count the contrast prompts of the store's prompts", """\
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
    The API key is read from $OPENAI_API_KEY (or --llm-api-key-env) and never logged.""",
    contrast_arguments, run_contrast)

COMMANDS = (INGEST_TIA2, IMPORT_SCORES, IMPORT_IMAGES, SAMPLE_PROMPTS, CONTRAST)
