"""One seed, one result: the whole benchmark flow run twice, each time in a fresh store, with its
generation and scoring shards side by side in threads, gives identical image bytes, scores,
adapters, evaluations and metrics."""

import hashlib
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from tests.support.project import PROJECT
from tests.support.scores import synthetic_score_table
from tests.support.stores import write_images
from tia2.store import TABLES, Store

pytestmark = pytest.mark.slow
POOL = PROJECT.parent / "shared" / "data" / "imagereward" / "benchmark_prompts.json"

# When and in which MLflow run a row was written: the only columns allowed to differ.
VOLATILE = {"run_id", "created_at", "scored_at", "failed_at", "evaluated_at"}


def store_content(root) -> dict:
    """Every table's rows (sorted, without VOLATILE columns, paths relative to the store) and the
    sha256 of every adapter file: what two runs of one seed must share."""
    store = Store(root, create=False)
    content = {}
    for name in TABLES:
        frame = store.read(name).to_pandas()
        frame = frame[[c for c in frame.columns if c not in VOLATILE]]
        rows = [tuple(str(v).replace(str(store.root), "<store>") for v in row)
                for row in frame.itertuples(index=False)]
        content[name] = sorted(rows)
    content["adapter files"] = sorted(
        (str(p.relative_to(store.root)), hashlib.sha256(p.read_bytes()).hexdigest())
        for p in store.adapters_dir.rglob("*") if p.is_file())
    return content


@pytest.mark.prefect_server
def test_two_fresh_store_runs_are_identical(tmp_path, mini_release, isolated_tracking, prefect_api):
    import os

    if not POOL.is_file():
        pytest.skip(f"{POOL} is not present")
    scratch = Store(tmp_path / "scratch")
    from tasks.ingest import ingest_tia2

    ingest_tia2(scratch, str(mini_release))
    pq.write_table(synthetic_score_table(scratch, {"m1": 2.0}), tmp_path / "scores.parquet")
    sets = ("comprehensive", "counting", "composition")
    images = write_images(mini_release, tmp_path / "images", sets)
    contents = []
    for run in ("first", "second"):
        (tmp_path / run).mkdir()
        store_root = tmp_path / run / "store"
        # the tiny profile at a smaller size: generation and scoring in two shards each (threads
        # of one process), labelled images scored too, metrics, a ReFL fine-tune and its evaluation;
        # 2 denoising steps for the generated and evaluated images (the profile's 10 add time, not code)
        settings = yaml.safe_load((PROJECT / "configs" / "tiny.yaml").read_text())
        settings.update(store=str(store_root), score_files=[str(tmp_path / "scores.parquet")],
                        image_folders={s: str(images / s) for s in sets}, prompt_pool=str(POOL),
                        max_prompts=2, pool_prompts=2, generate_shards=2, score_shards=2, steps=2,
                        reward_models=["tiny-clip", "tiny-imagereward"],
                        rewards=["m1", "textnorm(tiny-clip, tau=0.05)", "mean(tiny-clip, tiny-imagereward)"])
        settings["finetune"]["settings"].update(steps=4, checkpoint_every=2)
        settings["finetune"]["evaluate"].update(max_prompts=2, steps=2)
        config = tmp_path / f"{run}.yaml"
        config.write_text(yaml.safe_dump(settings))
        env = dict(os.environ, PREFECT_HOME=str(tmp_path / run / "prefect"), TIA2_SOURCE=str(mini_release),
                   MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / run}/mlflow.db", PYTHONPATH=str(PROJECT),
                   PREFECT_API_URL=prefect_api)
        done = subprocess.run([sys.executable, "-m", "cli", "benchmark", "--config", str(config)],
                              cwd=tmp_path / run, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        contents.append(store_content(store_root))
    first, second = contents
    for table in ("images", "scores", "prompt_metrics", "finetune_checkpoints", "finetune_evaluation",
                  "adapter files"):
        assert first[table], f"the run wrote no {table}"
    differing = [table for table in first if first[table] != second[table]]
    assert not differing, f"two runs of one seed differ in {differing}"


def _weights(module) -> list:
    return [t.detach().clone() for t in module.state_dict().values()]


@pytest.mark.parametrize("build", ["generator", "reward model"])
def test_models_built_side_by_side_in_threads_get_their_seeds_weights(build):
    """Random-weight builds in threads at once (as generation or scoring shards under a
    thread-pool task runner) each get exactly the weights a build alone gets from its seed."""
    from concurrent.futures import ThreadPoolExecutor

    from tia2.models import create_reward_model
    from tia2.models.diffusion import create_pipeline

    def make(seed: int):
        if build == "generator":
            return _weights(create_pipeline("tiny-sd", seed=seed).pipeline.unet)
        return _weights(create_reward_model("tiny-imagereward", seed=seed))

    alone = {seed: make(seed) for seed in (0, 1)}
    with ThreadPoolExecutor(4) as pool:
        side_by_side = list(pool.map(make, [0, 1, 0, 1]))
    for seed, weights in zip([0, 1, 0, 1], side_by_side):
        assert all(torch.equal(a, b) for a, b in zip(alone[seed], weights)), f"seed {seed} built other weights"
    assert not all(torch.equal(a, b) for a, b in zip(alone[0], alone[1]))
