"""The deployments for real: `prefect server start` on 127.0.0.1 with a temporary PREFECT_HOME, a
process work pool, `prefect deploy --all` from prefect.yaml, a worker, deployment runs; then the
store, MLflow and the Prefect API are checked. Every state (store, MLflow, Prefect) lives in
tmp_path; the flows run in the project folder (prefect.yaml's pull step)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.prefect_server import PREFECT, prefect_server
from tests.support.project import PROJECT
from tests.support.stores import make_release
from tia2.store import Store

# Its own server, not the session's (`prefect_api`): the `gpu` concurrency limit created here would
# hold the other flow tests' shards to one at a time.
pytestmark = [pytest.mark.slow, pytest.mark.prefect_server]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefect")
    with prefect_server(root) as api:
        env = dict(os.environ, PREFECT_HOME=str(root / "home"), PREFECT_API_URL=api, PREFECT_CLI_PROMPT="false",
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PYTHONPATH=str(PROJECT),
                   PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(root / "results"),
                   MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}",
                   TIA2_SOURCE=str(make_release(root / "release")), HF_HUB_OFFLINE="1")
        for command in (["work-pool", "create", "tia2", "--type", "process"],
                        ["concurrency-limit", "create", "gpu", "1"],
                        ["deploy", "--all"]):
            done = subprocess.run([PREFECT, *command], cwd=PROJECT, env=env, capture_output=True, text=True,
                                  timeout=180)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        yield {"env": env, "api": api, "root": root}


def _run_deployment(server, name: str, params: dict) -> dict:
    """Create a run of FLOW/DEPLOYMENT, let a worker execute it, return the run from the API."""
    done = subprocess.run([PREFECT, "deployment", "run", name, "--params", json.dumps(params)], cwd=PROJECT,
                          env=server["env"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    flow_run_id = next(line.split()[-1] for line in done.stdout.splitlines() if "UUID" in line)
    worker = subprocess.run([PREFECT, "worker", "start", "--pool", "tia2", "--run-once"], cwd=PROJECT,
                            env=server["env"], capture_output=True, text=True, timeout=600)
    run = httpx.get(f"{server['api']}/flow_runs/{flow_run_id}", timeout=10).json()
    assert run["state"]["type"] == "COMPLETED", worker.stdout[-3000:] + worker.stderr[-3000:]
    return run


def test_benchmark_deployment_runs_on_a_worker_then_rescore_scores_only_a_new_model(server):
    import mlflow

    store = server["root"] / "store"
    tiny = {"store": str(store), "sets": ["counting"], "max_prompts": 1, "generate_shards": 1,
            "reward_models": ["tiny-clip"], "pool_prompts": 2, "finetune": None}
    run = _run_deployment(server, "tia2-benchmark/tia2-benchmark", {"config": "tiny", "overrides": tiny})

    data = Store(store)
    [(images,)] = data.connect().execute("SELECT count(*) FROM images WHERE sha256 IS NOT NULL").fetchall()
    assert images == 2 * 2  # 2 images for each of 1 counting caption and (max_prompts) 1 pool prompt
    assert dict(data.connect().execute("SELECT reward_model, count(*) > 0 FROM scores GROUP BY ALL").fetchall()) \
        == {"tiny-clip": True}

    mlflow.set_tracking_uri(server["env"]["MLFLOW_TRACKING_URI"])
    [parent] = [r for r in mlflow.search_runs(experiment_names=["tia2"], output_format="list")
                if r.info.run_name == "tia2-benchmark"]
    assert parent.data.tags["prefect.flow_run_id"] == run["id"]
    assert parent.data.tags["prefect.deployment"] == "tia2-benchmark"

    rescore = httpx.get(f"{server['api']}/deployments/name/tia2-rescore/tia2-rescore", timeout=10).json()
    [schedule] = rescore["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *"

    clip_rows = data.connect().execute("SELECT count(*) FROM scores WHERE reward_model = 'tiny-clip'").fetchall()
    run = _run_deployment(server, "tia2-rescore/tia2-rescore",
                          {"config": "tiny", "overrides": {**tiny, "reward_models": ["tiny-clip", "tiny-aesthetic"]}})
    assert data.connect().execute("SELECT count(*) FROM scores WHERE reward_model = 'tiny-clip'").fetchall() == clip_rows
    [(aesthetic_images,)] = data.connect().execute(
        "SELECT count(DISTINCT image_id) FROM scores WHERE reward_model = 'tiny-aesthetic'").fetchall()
    assert aesthetic_images == images
    artifacts = httpx.post(f"{server['api']}/artifacts/filter", json={"artifacts": {"key": {"any_": ["tia2-rescore"]}}},
                           timeout=10).json()
    table = json.loads(artifacts[0]["data"])
    assert {row["reward_model"]: row["rows_added"] for row in table} == {"tiny-clip": 0, "tiny-aesthetic": clip_rows[0][0]}


def test_finetune_deployment_trains_checkpoints_and_logs_them(server, tmp_path):
    import mlflow

    from tasks.ingest import ingest_tia2

    store = Store(tmp_path / "store")
    ingest_tia2(store, server["env"]["TIA2_SOURCE"], ("counting", "composition"))
    section = {"algos": ["refl"], "reward": "tiny-clip", "sets": ["counting"], "max_prompts": 1,
               "settings": {"steps": 2, "checkpoint_every": 1, "denoise_steps": 2, "guidance": 1.0, "batch_size": 2,
                            "refl_start": 0, "refl_end": 1, "eval_images_per_prompt": 1,
                            "pretrain_images_per_prompt": 1},
               "evaluate": {"gold": "tiny-aesthetic", "sets": ["composition"], "max_prompts": 1,
                            "images_per_prompt": 1, "steps": 2}}
    run = _run_deployment(server, "tia2-finetune/tia2-finetune",
                          {"config": "tiny", "overrides": {"store": str(store.root), "finetune": section}})
    rows = store.connect().execute("SELECT algo, step, path FROM finetune_checkpoints ORDER BY step").fetchall()
    assert [(algo, step) for algo, step, _ in rows] == [("refl", 1), ("refl", 2)]
    assert all(Path(path).is_file() for _, _, path in rows)
    mlflow.set_tracking_uri(server["env"]["MLFLOW_TRACKING_URI"])
    [parent] = [r for r in mlflow.search_runs(experiment_names=["tia2"], output_format="list")
                if r.info.run_name == "tia2-finetune" and r.data.tags.get("prefect.flow_run_id") == run["id"]]
    assert parent.data.tags["prefect.deployment"] == "tia2-finetune"
    [stage] = mlflow.search_runs(experiment_names=["tia2"], output_format="list",
                                 filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                                               f"and tags.`tia2.stage` = 'finetune'")
    assert stage.data.tags["tia2.algo"] == "refl" and stage.data.tags["tia2.reward"] == "tiny-clip"
    # the evaluation: both checkpoints against the base on one held-out prompt, and its artifacts
    rows = store.connect().execute("SELECT step, reward, wins + ties + losses FROM finetune_evaluation").fetchall()
    assert sorted(rows) == [(1, "tiny-aesthetic", 1), (1, "tiny-clip", 1), (2, "tiny-aesthetic", 1), (2, "tiny-clip", 1)]
    artifacts = httpx.post(f"{server['api']}/artifacts/filter", timeout=10, json={
        "artifacts": {"key": {"any_": ["tia2-finetune-evaluation", "tia2-finetune-overoptimization"]}}}).json()
    assert {a["key"] for a in artifacts if a["flow_run_id"] == run["id"]} == {
        "tia2-finetune-evaluation", "tia2-finetune-overoptimization"}
