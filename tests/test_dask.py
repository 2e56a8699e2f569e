"""Scoring mapped over image shards on a local Dask cluster of two worker processes (prefect-dask)
gives the same score rows as the default task runner with one shard."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.project import PROJECT
from tia2.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.prefect_server]

RUN = """
import sys
from flows.tia2_benchmark import tia2_benchmark  # first: sets Prefect's defaults before prefect is imported
from prefect_dask import DaskTaskRunner
flow = tia2_benchmark
if sys.argv[2] == "dask":
    flow = tia2_benchmark.with_options(task_runner=DaskTaskRunner(cluster_kwargs={
        "n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None}))
summary = flow(config=sys.argv[1])
print("shards", [s["shards"] for s in summary["scores"]])
"""


def _scores(store_root):
    return Store(store_root).connect().execute(
        "SELECT image_id, text, reward_model, score FROM scores ORDER BY ALL").fetchall()


def test_dask_cluster_scores_the_same_rows_as_the_default_runner(tmp_path, mini_release, isolated_tracking,
                                                                  prefect_api):
    rows = {}
    for runner, shards in (("default", 1), ("dask", 2)):
        config = tmp_path / f"{runner}.yaml"
        config.write_text(f"store: {tmp_path / runner}\nsets: [counting, composition]\ngenerator: tiny-sd\n"
                          f"images_per_prompt: 2\nsteps: 2\nreward_models: [tiny-clip, tiny-blip2]\n"
                          f"weights: random\nscore_shards: {shards}\n")
        env = dict(os.environ, PREFECT_HOME=str(tmp_path / f"prefect-{runner}"), TIA2_SOURCE=str(mini_release),
                   MLFLOW_TRACKING_URI=f"sqlite:///{isolated_tracking}/mlflow.db", PYTHONPATH=str(PROJECT),
                   HF_HUB_OFFLINE="1", PREFECT_API_URL=prefect_api)
        done = subprocess.run([sys.executable, "-c", RUN, str(config), runner], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"shards [{shards}, {shards}]" in done.stdout
        rows[runner] = _scores(tmp_path / runner)
    assert len(rows["dask"]) == len(rows["default"]) == 2 * 8 * 4  # 2 models x 8 images x 4 texts
    # Dask's workers run torch on one thread each and other batches: float32 sums in another
    # order move a score by up to ~1e-4 (tiny-blip2); the rows themselves are the same
    for ours, theirs in zip(rows["dask"], rows["default"]):
        assert ours[:3] == theirs[:3] and ours[3] == pytest.approx(theirs[3], rel=1e-3, abs=1e-4)
