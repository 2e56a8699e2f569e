"""The commands that evaluate reward specs against the human labels: metrics, tune."""

from __future__ import annotations

from cli.command import Command, as_written, number_list, open_store


def metrics_arguments(p) -> None:
    p.add_argument("--reward", action="append", required=True, metavar="SPEC", help="a reward spec (repeatable)")
    p.add_argument("--set", action="append", metavar="NAME", help="only this set (repeatable; default: all)")
    p.add_argument("--out", metavar="FILE.csv", help="write the per-caption metrics to this CSV")


def run_metrics(args) -> int:
    from tasks.metrics import format_table2, record_metrics
    from tia2.specs import parse_spec

    specs = [parse_spec(s) for s in args.reward]
    means = record_metrics(open_store(args, create=False), specs, args.set, args.out)
    print(format_table2(means))
    if args.out:
        print(f"\nper-caption metrics written to {args.out}")
    return 0


METRICS = Command("metrics", "per-caption metrics of reward specs against the human labels", """\
    Evaluate reward specs with the TIA2 protocol: per caption AUROC, AUPRC, AP@5/10/25,
    Spearman and Kendall; per-set means printed like the TextNorm paper's Table 2.
    Stores rows in prompt_metrics and logs the run (tables, ROC/PR plots) to MLflow.

    reward specs:
      NAME                          a reward model's scores (NAME@VERSION for one version)
      textnorm(SPEC, tau=T)         TextNorm over the caption's contrast prompts
      mean(SPEC, SPEC, ...)         mean ensemble
      ur(SPEC, SPEC, ..., lam=L)    uncertainty-regularised ensemble""", metrics_arguments, run_metrics)


def tune_arguments(p) -> None:
    from tasks.metrics import DEFAULT_LAMS, DEFAULT_TAUS

    p.add_argument("--reward-model", action="append", required=True, metavar="NAME",
                   help="a reward model with stored scores (repeatable)")
    p.add_argument("--set", action="append", metavar="NAME", help="only this set (repeatable)")
    p.add_argument("--tau", type=number_list, default=DEFAULT_TAUS, metavar="T1,T2,...",
                   help=f"tau grid (default: {len(DEFAULT_TAUS)} values {as_written(min(DEFAULT_TAUS))}.."
                        f"{as_written(max(DEFAULT_TAUS))})")
    p.add_argument("--lam", type=number_list, default=DEFAULT_LAMS, metavar="L1,L2,...",
                   help=f"lambda grid (default: {as_written(min(DEFAULT_LAMS))}..{as_written(max(DEFAULT_LAMS))})")


def run_tune(args) -> int:
    from tasks.metrics import record_tune

    result = record_tune(open_store(args, create=False, write=False), args.reward_model, args.set, args.tau, args.lam)
    print("best values by the mean of AP@5, AP@10, AP@25 (TextNorm paper §4.3):")
    for row in result.best.itertuples():
        value = f"tau={row.tau:g}" if row.model != "ensemble" else f"lam={row.lam:g}"
        print(f"  {row.set:<14} {row.model:<16} {value:<14} AP-mean {row.ap_mean:.4f}   {row.reward}")
    return 0


TUNE = Command("tune", "tune TextNorm's tau per model and the ensemble's lambda", """\
    The TextNorm paper's light tuning: for each reward model and set, the tau of
    textnorm(MODEL, tau=...) with the best mean of AP@5/10/25; with two or more models, the
    lambda of ur(textnorm(M1, tau=best), ..., lam=...) per set. Logs the grid and a plot.""", tune_arguments, run_tune)

COMMANDS = (METRICS, TUNE)
