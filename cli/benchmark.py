"""The command that runs the whole benchmark flow: benchmark."""

from __future__ import annotations

import os

from cli.command import Command


def benchmark_arguments(p) -> None:
    from tia2.config import CONFIG_KEYS, DEFAULT_PROFILE

    p.description += "\n".join(f"  {k:<12} {v.meaning}" for k, v in CONFIG_KEYS.items())
    p.add_argument("--config", default=DEFAULT_PROFILE, metavar="PROFILE|FILE",
                   help=f"profile name in configs/ (tiny, paper) or a YAML file (default: {DEFAULT_PROFILE})")


def run_benchmark(args) -> int:
    from tia2.config import resolve_config

    overrides = {"store": args.store} if args.store else {}
    config = resolve_config(args.config, overrides)  # a user mistake stops here, in one line
    from flows.tia2_benchmark import tia2_benchmark  # Prefect: only once the config is right

    summary = tia2_benchmark(config=args.config, overrides=overrides)
    ingest = summary["ingest"]
    print("TIA2 in the store: " + ", ".join(
        f"{s} {ingest[s]['captions']} captions / {ingest[s]['images']} images" for s in config.sets if s in ingest))
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
        _print_finetuned(tuned)
    from tia2.store import Store
    from tia2.tracking import run_page_url, tracking_uri

    print(f"report: {summary['report']}")
    print(f"state: store {Store(config.store, create=False).root}, MLflow {tracking_uri()}, "
          f"Prefect {os.environ['PREFECT_HOME']}")
    run_id = summary["mlflow_run_id"]
    print(f"MLflow run {run_id}: " + (run_page_url(run_id) or (
        f"mlflow ui --backend-store-uri {tracking_uri()}, then "
        f"{run_page_url(run_id, server='http://127.0.0.1:5000')}")))
    return 0


def _print_finetuned(tuned: dict) -> None:
    """A fine-tuning stage of the flow's summary, and its evaluation on held-out prompts."""
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


BENCHMARK = Command("benchmark", "run the tia2-benchmark flow locally (no server needed)",
                    "Run the tia2-benchmark Prefect flow in this process. Config keys (all checked before any "
                    "work):\n", benchmark_arguments, run_benchmark)  # the config keys follow (benchmark_arguments)

COMMANDS = (BENCHMARK,)
