"""The tia2-benchmark flow run locally (ephemeral Prefect API, no server), and the console script."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest

from tests.support.project import PROJECT, copy_project
from tests.support.scores import synthetic_score_table
from tests.support.stores import store_with_prompts, write_images
from tia2.store import Store


def main_sql(store_root, query):
    return Store(store_root).connect().execute(query).fetchall()

pytestmark = pytest.mark.slow


def _run_benchmark(config, env):
    return subprocess.run([sys.executable, "-m", "cli", "benchmark", "--config", str(config)],
                          cwd=env["cwd"], env=env["env"], capture_output=True, text=True, timeout=600)


@pytest.fixture
def flow_env(tmp_path, mini_release, isolated_tracking, monkeypatch):
    import os

    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), TIA2_SOURCE=str(mini_release),
               MLFLOW_TRACKING_URI=f"sqlite:///{isolated_tracking}/mlflow.db",
               PREFECT_LOGGING_LEVEL="INFO", PYTHONPATH=str(PROJECT))
    return {"cwd": tmp_path, "env": env}


@pytest.fixture
def served_flow_env(flow_env, prefect_api):
    """`flow_env` with the session's Prefect server: its flow processes start no server of their own."""
    flow_env["env"]["PREFECT_API_URL"] = prefect_api
    return flow_env


@pytest.mark.prefect_server
def test_flow_ingests_imports_evaluates_and_caches(tmp_path, mini_release, served_flow_env):
    store_root = tmp_path / "store"
    # Scores for the mini release, in the import format.
    scratch = Store(tmp_path / "scratch")
    from tasks.ingest import ingest_tia2

    ingest_tia2(scratch, str(mini_release))
    pq.write_table(synthetic_score_table(scratch, {"m1": 2.0, "m2": 1.0}), tmp_path / "scores.parquet")
    sets = ("comprehensive", "counting", "composition")
    images = write_images(mini_release, tmp_path / "images", sets)
    folders = ", ".join(f"{s}: {images / s}" for s in sets)
    config = tmp_path / "run.yaml"
    config.write_text(f"store: {store_root}\nscore_files: [{tmp_path / 'scores.parquet'}]\n"
                      f"image_folders: {{{folders}}}\nreward_models: [tiny-clip]\nweights: random\n"
                      "rewards: [m1, 'textnorm(m1, tau=0.5)', 'mean(m1, m2)', 'textnorm(tiny-clip, tau=0.05)']\n")

    first = _run_benchmark(config, served_flow_env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "scored with tiny-clip: 24 images, 96 new rows" in first.stdout
    assert "C150 (2)" in first.stdout and "textnorm(tiny-clip, tau=0.05)" in first.stdout
    assert main_sql(store_root, "SELECT reward, count(*) FROM prompt_metrics GROUP BY 1 ORDER BY 1") == [
        ("m1", 6), ("mean(m1, m2)", 6), ("textnorm(m1, tau=0.5)", 6), ("textnorm(tiny-clip, tau=0.05)", 6)]

    second = _run_benchmark(config, served_flow_env)
    assert second.returncode == 0, second.stderr[-3000:]
    task_lines = [line for line in second.stderr.splitlines() if "Task run" in line and "Finished" in line]
    # ingest, contrast, 3 image folders, score, import-scores, metrics
    assert len(task_lines) == 4 + len(sets) + 1 and all("Cached" in line for line in task_lines), task_lines

    # One parent run per flow run, stages nested under it, tagged with the flow run id.
    runs = mlflow.search_runs(experiment_names=["tia2"], output_format="list")
    parents = [r for r in runs if r.info.run_name == "tia2-benchmark"]
    assert len(parents) == 2 and all(r.data.tags.get("prefect.flow_run_id") for r in parents)
    first_run, second_run = sorted(parents, key=lambda r: r.info.start_time)

    def stages(parent):
        return {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}

    assert stages(first_run) == {"ingest-tia2", "contrast", "score tiny-clip", "metrics"}
    # the parent run has the headline numbers
    assert first_run.data.metrics["rows_scored"] == 96 and "counting/m1/auroc" in first_run.data.metrics
    assert stages(second_run) == set()  # every stage was cached


TWO_STAGES = """
import json, sys
from pathlib import Path

from flows.tia2_benchmark import contrast_task, ingest_task
from prefect import flow
from tia2.store import Store

store, source, edited = Store(sys.argv[1]), sys.argv[2], Path(sys.argv[3])


@flow
def two_stages():
    root = str(store.root)
    return [ingest_task(root, source, ("counting",), "source", store.store_id, None, return_state=True).name,
            contrast_task(root, "rules", "prompts", None, return_state=True).name]


print(json.dumps(two_stages()))
edited.write_text(edited.read_text() + "\\nCHANGED = True\\n")
print(json.dumps(two_stages()))
"""


@pytest.mark.prefect_server
def test_an_edit_of_a_stages_module_recomputes_that_stage_only(tmp_path, mini_release, served_flow_env):
    """Two flow runs of a copy of the project, tasks/contrast.py edited between them."""
    project = copy_project(tmp_path / "project")
    script = tmp_path / "two_stages.py"
    script.write_text(TWO_STAGES)
    env = dict(served_flow_env["env"], PYTHONPATH=str(project))
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "store"), str(mini_release),
                          str(project / "tasks" / "contrast.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    first, second = map(json.loads, out.stdout.splitlines()[-2:])
    assert first == ["Completed", "Completed"] and second == ["Cached", "Completed"]


def test_bad_profile_and_bad_setting_are_clear(tmp_path, flow_env):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rewardz: [m1]\n")
    out = _run_benchmark(bad, flow_env)
    assert out.returncode == 2 and "unknown setting(s) rewardz" in out.stderr
    out = _run_benchmark("nope", flow_env)
    assert out.returncode == 2 and "unknown profile 'nope'" in out.stderr


def test_every_subcommand_has_help():
    commands = ["ingest-tia2", "import-scores", "metrics", "tune", "sql", "benchmark"]
    top = subprocess.run([sys.executable, "-m", "cli", "--help"], capture_output=True, text=True, cwd=PROJECT)
    assert top.returncode == 0 and all(c in top.stdout for c in commands)
    for command in commands:
        out = subprocess.run([sys.executable, "-m", "cli", command, "--help"],
                             capture_output=True, text=True, cwd=PROJECT)
        assert out.returncode == 0 and "usage: tia2" in out.stdout and "TIA2_STORE" in out.stdout


@pytest.mark.prefect_server  # a temporary server of its own, as `make demo` runs
def test_the_tiny_profile_generates_and_scores(tmp_path, flow_env):
    """The README's main job, on the small constructed release: tiny-sd images scored by every
    tiny twin, summarised without labels."""
    flow_env["env"]["TIA2_STORE"] = str(tmp_path / "store")
    out = _run_benchmark("tiny", flow_env)
    assert out.returncode == 0, out.stderr[-3000:]
    # 4 prompts picked from ImageReward's benchmark prompts get rule-made contrast prompts, and
    # images beside the release's 2 x 3 captions
    assert "selected 4 of 100 pool prompts (set selected)" in out.stdout
    assert "contrast prompts (rules) for 4 prompts that had none" in out.stdout
    assert "generated with tiny-sd: 20 new images" in out.stdout
    store = Store(tmp_path / "store")
    [(pool_images, rows)] = main_sql(store.root, """
        SELECT count(DISTINCT i.image_id), count(*) FROM images i JOIN prompts p USING (prompt_id)
        JOIN (SELECT prompt_id, text FROM prompts UNION SELECT prompt_id, text FROM contrast_prompts) t
        USING (prompt_id) WHERE p.set = 'selected'""")
    assert pool_images == 8 and rows > 8  # scored against captions and contrast prompts
    for name in ("tiny-clip", "tiny-pickscore", "tiny-hpsv2", "tiny-blip2", "tiny-imagereward", "tiny-aesthetic"):
        assert f"scored with {name}: 20 images, {48 + rows} new rows" in out.stdout
    # the run's HTML report, in the flow's MLflow run
    [parent] = [r for r in mlflow.search_runs(experiment_names=["tia2"], output_format="list")
                if r.info.run_name == "tia2-benchmark"]
    page = (Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="report.html"))
            .read_text())
    assert "Reward models on the scored images" in page and "tiny-imagereward" in page and "\\n" not in page
    assert page.count('<img src="data:image/png;base64,') == 4  # score distributions, fine-tuning's three plots
    # an image per prompt: 2 of each of 6 captions and 4 pool prompts, and the held-out ones beside the base's
    assert page.count("<img class=thumb") == 2 * (6 + 4) + 2 * 2 * 3 and "No metrics against human labels" in page
    assert "sample-prompts" in page and f"report: {parent.info.artifact_uri}/report.html" in out.stdout
    assert "caption_top1" in out.stdout
    # the short fine-tune of the profile: ReFL on 4 counting prompts (the release has 2), 2 checkpoints
    [(steps, base)] = main_sql(store.root, "SELECT list(step ORDER BY step), min(base_mean_reward) "
                                          "FROM finetune_checkpoints WHERE algo = 'refl'")
    assert steps == [5, 10] and "fine-tuned (refl, run " in out.stdout and f"{base:.4f}" in out.stdout
    # and its evaluation: both checkpoints against the base on the 2 composition captions (held out),
    # 2 images each, for the proxy, its model and the gold
    rows = main_sql(store.root, "SELECT step, reward, wins + ties + losses FROM finetune_evaluation ORDER BY ALL")
    assert {(step, n) for step, _, n in rows} == {(5, 4), (10, 4)}
    assert {reward for _, reward, _ in rows} == {"textnorm(tiny-clip, tau=0.05)", "tiny-clip", "tiny-pickscore"}
    assert "held-out prompts, wins/ties/losses against the base model" in out.stdout


def test_a_bad_finetune_section_is_one_clear_error_before_any_work():
    from flows.finetune import finetune_section
    from tia2.errors import UserError

    good = {"generator": "tiny-sd", "finetune": {"reward": "tiny-clip", "settings": {"steps": 3}}}
    section = finetune_section(good)
    assert (section["algos"], section["model"], section["evaluate"]) == (["refl"], "tiny-sd", {})
    finetune_section({"generator": "tiny-sd", "finetune": {"reward": "tiny-clip", "algos": ["rwr", "refl"],
                                                           "settings": {"kl_beta": "sweep"}}})  # RWR's β sweep
    for finetune, message in [({"reward": "tiny-clip", "epochs": 3}, "unknown setting"),
                              ({"algos": ["refl"]}, "needs `reward`"),
                              ({"reward": "tiny-clip", "settings": {"stepz": 3}}, "stepz"),
                              ({"reward": "tiny-clip", "algos": ["ppo"]}, "unknown algorithm"),
                              ({"reward": "tiny-clip", "evaluate": {"sets": ["counting"]}}, "needs `gold`"),
                              ({"reward": "tiny-clip", "settings": {"kl_beta": "lots"}}, "kl_beta must be a finite number"),
                              ({"reward": "tiny-clip", "settings": {"steps": "10"}}, "steps must be a whole number")]:
        with pytest.raises(UserError, match=message):
            finetune_section({"generator": "tiny-sd", "finetune": finetune})


def test_the_flows_rwr_sweep_keeps_the_papers_pick_for_the_evaluation(tmp_path):
    from flows.finetune import finetune_section, finetune_task
    from tasks.finetune import KL_COEFFICIENTS, choose_kl_coefficient, select_checkpoint

    store = store_with_prompts(tmp_path / "store", ["a photo of two cats", "three red apples on a table"])
    section = finetune_section({"generator": "tiny-sd", "finetune": {
        "reward": "tiny-clip", "algos": ["rwr"], "weights": "random",
        # the smallest runs: tests/test_finetune.py's CLI sweep checks the runs and the pick, this the task's report
        "settings": {"kl_beta": "sweep", "steps": 2, "checkpoint_every": 1, "denoise_steps": 2, "guidance": 1.0,
                     "batch_size": 2, "images_per_prompt": 2, "keep": 1, "eval_images_per_prompt": 1,
                     "learning_rate": 5e-2}}})
    report = finetune_task.fn(str(store.root), "rwr", section, "cpu", "key", None)
    rows = main_sql(store.root, "SELECT run, list(step ORDER BY step), list(wins ORDER BY step) "
                                "FROM finetune_checkpoints GROUP BY run")
    assert len(rows) == len(KL_COEFFICIENTS)
    wins = {run: w[s.index(select_checkpoint(s, w))] for run, s, w in rows}
    assert sorted(report["wins_by_kl_beta"]) == list(KL_COEFFICIENTS)
    assert sorted(report["wins_by_kl_beta"].values()) == sorted(wins.values())
    assert report["kl_beta"] == choose_kl_coefficient(report["wins_by_kl_beta"])
    assert report["wins_by_kl_beta"][report["kl_beta"]] == wins[report["run"]]  # the chosen run is reported
