"""Caching benchmark (issue 7): what a second, unchanged run of tia2-benchmark costs against the
first, and what re-scoring after adding one reward model costs against scoring every model.

In one process, on a fresh store and Prefect home, with Prefect's local API warmed up first (so
its start-up is in neither run):
  1. tia2-benchmark on the tiny profile with five tiny reward models (TIA2 from ../shared);
  2. the same run again: every stage should be Cached (target: at most 5 % of run 1's time);
  3. tia2-rescore with a sixth model added, against tia2-rescore of all six on a copy of the
     store without scores: only the new model's rows are computed, so the cost should be about
     that model's share of the full re-score (flow, model loading and metrics included in both).

    python benchmarks/cache_bench.py
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
SHARED_TIA2 = PROJECT.parent / "shared" / "data" / "tia2"
MODELS = ["tiny-clip", "tiny-hpsv2", "tiny-blip2", "tiny-imagereward", "tiny-aesthetic"]
ADDED = "tiny-pickscore"


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="cache_bench-"))
    os.environ.update(PREFECT_HOME=str(tmp / "prefect"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
                      TIA2_SOURCE=str(SHARED_TIA2), HF_HUB_OFFLINE="1", PREFECT_LOGGING_LEVEL="ERROR")
    from flows.rescore import tia2_rescore
    from flows.tia2_benchmark import tia2_benchmark
    from prefect import flow

    @flow
    def warm_up() -> None:
        pass

    warm_up()
    overrides = {"store": str(tmp / "store"), "reward_models": MODELS}
    start = time.perf_counter()
    first = tia2_benchmark("tiny", overrides)
    t_first = time.perf_counter() - start
    start = time.perf_counter()
    tia2_benchmark("tiny", overrides)
    t_second = time.perf_counter() - start
    # a full score: the same store without its scores, every model scored by the re-score flow
    full_store = tmp / "full"
    shutil.copytree(tmp / "store", full_store, ignore=shutil.ignore_patterns("part-*.parquet"))
    all_models = [*MODELS, ADDED]
    start = time.perf_counter()
    tia2_rescore("tiny", {**overrides, "store": str(full_store), "reward_models": all_models})
    t_full = time.perf_counter() - start
    start = time.perf_counter()
    rescored = tia2_rescore("tiny", {**overrides, "reward_models": all_models})
    t_incremental = time.perf_counter() - start
    added_rows = {row["reward_model"]: row["rows_added"] for row in rescored["changed"] if row["rows_added"]}

    print(f"tiny profile, {first['generated']['images']} generated images, {len(MODELS)} reward models "
          f"(TIA2 from {SHARED_TIA2})")
    print(f"first run                         {t_first:7.1f} s")
    print(f"second, unchanged run             {t_second:7.1f} s  = {t_second / t_first:.1%} of the first "
          f"(target <= 5 %)")
    print(f"re-score, all {len(all_models)} models (no scores)  {t_full:7.1f} s")
    print(f"re-score, {ADDED} added        {t_incremental:7.1f} s  = {t_incremental / t_full:.2f} of the full "
          f"re-score (one model of {len(all_models)}: {1 / len(all_models):.2f}); rows added: {added_rows}")


if __name__ == "__main__":
    main()
