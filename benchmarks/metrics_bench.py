"""Benchmark: score import and metrics at the size of the real benchmark, and SQL over a large
score table.

    .venv/bin/python benchmarks/metrics_bench.py [--tia2 ../shared/data/tia2] [--rows 10000000]

1. ingest TIA2 (27,500 images) and import ~1.2 million score rows (target: under 30 s);
2. `compute_metrics` for 7 specs, TextNorm and ensembles included (target: under 10 s), and the
   whole recorded run (store, CSV, MLflow, plots) for reference;
3. a GROUP BY over 10 million synthetic score rows through the catalog, `tia2 sql`'s path
   (target: under 2 s).
Each line prints the measured time and its ratio to the target (< 1 meets it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.ingest import ingest_tia2  # noqa: E402
from tasks.metrics import compute_metrics, record_metrics  # noqa: E402
from tasks.score import import_scores  # noqa: E402
from tests.support.scores import synthetic_score_table  # noqa: E402
from tia2.specs import parse_spec  # noqa: E402
from tia2.store import TIMESTAMP, Store  # noqa: E402

SPECS = [
    "alpha", "beta", "textnorm(alpha, tau=0.5)", "textnorm(beta, tau=2)",
    "mean(textnorm(alpha, tau=0.5), textnorm(beta, tau=2))",
    "ur(textnorm(alpha, tau=0.5), textnorm(beta, tau=2), lam=1)", "mean(alpha, beta, gamma, delta)",
]


def report(name: str, seconds: float, target: float | None = None) -> None:
    ratio = f"  ratio to target {seconds / target:.2f} (target {target:g} s)" if target else ""
    print(f"{name:<58} {seconds:7.2f} s{ratio}", flush=True)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_metrics(tia2: Path, work: Path) -> None:
    store = Store(work / "store")
    _, seconds = timed(lambda: ingest_tia2(store, str(tia2)))
    report("ingest-tia2 (27,500 images)", seconds)
    full = synthetic_score_table(store, {"alpha": 2.0, "beta": 0.7}, seed=0)
    captions_only = synthetic_score_table(store, {"gamma": 1.0, "delta": 0.5}, seed=1, with_contrast=False)
    table = pa.concat_tables([full, captions_only])
    path = work / "scores.parquet"
    pq.write_table(table, path)
    result, seconds = timed(lambda: import_scores(store, path))
    report(f"import-scores ({result['rows']:,} rows)", seconds, 30)
    _, seconds = timed(lambda: import_scores(store, path))
    report("import-scores again (all rows already present)", seconds, 30)

    specs = [parse_spec(s) for s in SPECS]
    _, seconds = timed(lambda: compute_metrics(store, specs))
    report(f"compute_metrics ({len(specs)} specs, 3 sets)", seconds, 10)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlruns/mlflow.db")
    _, seconds = timed(lambda: record_metrics(store, specs, out_csv=str(work / "per_caption.csv")))
    report("record_metrics (+ prompt_metrics, CSV, MLflow, plots)", seconds)


def bench_sql(rows: int, work: Path) -> None:
    store = Store(work / "big")
    rng = np.random.default_rng(0)
    part_rows = 2_000_000
    images = np.array([f"img{i:06d}" for i in range(50_000)])
    texts = np.array([f"prompt {i}" for i in range(600)])
    models = np.array(["clip", "blip2", "imagereward", "pickscore", "hpsv2"])
    start = time.perf_counter()
    for part in range(rows // part_rows):
        # Written straight as parts: generating 10M rows is the slow bit, not what is measured.
        n = part_rows
        table = pa.table({
            "image_id": images[rng.integers(0, len(images), n)], "text": texts[rng.integers(0, len(texts), n)],
            "reward_model": models[rng.integers(0, len(models), n)], "model_version": ["v1"] * n,
            "score": rng.normal(size=n), "run_id": pa.nulls(n, pa.string()),
            "scored_at": pa.array(np.zeros(n, dtype="datetime64[us]")).cast(TIMESTAMP)})
        store._write_file(store.root / "scores" / f"part-bench{part:03d}.parquet", table)
    store.refresh_catalog()
    report(f"(generate {rows:,} synthetic score rows)", time.perf_counter() - start)
    query = ("SELECT reward_model, text, count(*) AS n, avg(score) AS mean, stddev(score) AS sd "
             "FROM scores GROUP BY reward_model, text")
    store.query_readonly("SELECT count(*) FROM scores")  # open once: file metadata into the OS cache
    best = min(timed(lambda: store.query_readonly(query))[1] for _ in range(3))
    report(f"GROUP BY model, text over {rows:,} rows via the catalog", best, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tia2", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/tia2")
    parser.add_argument("--rows", type=int, default=10_000_000)
    args = parser.parse_args()
    if not (args.tia2 / "human_annotations").is_dir():
        sys.exit(f"no TIA2 release at {args.tia2}: pass --tia2 DIR")
    print(f"metrics_bench on {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}")
    with tempfile.TemporaryDirectory() as tmp:
        bench_metrics(args.tia2, Path(tmp))
        bench_sql(args.rows, Path(tmp))


if __name__ == "__main__":
    main()
