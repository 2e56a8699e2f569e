"""What a researcher reads: the HTML report (tasks/report.py), the Prefect artifacts' markdown,
the MLflow run names, parent-run metrics and experiment type, the progress bars of shards in
threads, and `tia2 --version`. The report is built on a small store: the constructed release with
synthetic scores (Table 2, caption ranking) and a few generated PNGs, with a fine-tuning summary
shaped as the flow returns it."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import threading
from types import SimpleNamespace

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.generate import image_id, prompts_to_generate, save_png
from tasks.ingest import ingest_tia2
from tasks.metrics import caption_ranking, compute_metrics, format_table2, set_means
from tasks.report import build_report, headline_metrics, record_report, report_markdown, table2_markdown
from tasks.score import import_scores
from tests.support.project import PROJECT
from tests.support.scores import synthetic_score_table
from tia2.specs import parse_spec
from tia2.store import Store
from tia2.tracking import (EXPERIMENT_KIND, WORKFLOW_QUERY, artifact_reference, metric_key, run_label, run_page_url,
                           stage_run)

GENERATOR, IDENTITY, STEPS, GUIDANCE, PER_PROMPT = "tiny-sd", "random-init:0", 10, 7.5, 2


@pytest.fixture
def store(tmp_path, mini_release):
    """The constructed release (6 captions in 3 sets) with synthetic scores of two models, and two
    generated 64x64 PNGs for each of its captions."""
    store = Store(tmp_path / "store")
    ingest_tia2(store, str(mini_release))
    pq.write_table(synthetic_score_table(store, {"m1": 2.0, "m2": 0.5}), tmp_path / "scores.parquet")
    import_scores(store, tmp_path / "scores.parquet")
    rng = np.random.default_rng(0)
    rows = []
    for pid, _, set_name in prompts_to_generate(store, None):
        for i in range(PER_PROMPT):
            path, digest = save_png(store, Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
            rows.append(dict(image_id=image_id(pid, IDENTITY, None, i, 0, STEPS, GUIDANCE), prompt_id=pid,
                             set=set_name, file=path.name, ordinal=i, seed=i, generator=f"{GENERATOR}@{IDENTITY}",
                             lora=None, steps=STEPS, guidance=GUIDANCE, path=str(path), sha256=digest,
                             width=64, height=64))
    store.upsert("images", pa.Table.from_pylist(rows))
    return store


def summary_of(store: Store, with_metrics: bool = True) -> dict:
    """A summary as flows/tia2_benchmark.py returns it, for this store."""
    sets = ["comprehensive", "counting", "composition"]
    means = set_means(compute_metrics(store, [parse_spec("m1"), parse_spec("textnorm(m1, tau=0.5)")], sets)
                      .per_caption) if with_metrics else None
    prompts = prompts_to_generate(store, sets)
    base = [dict(variant="base", set=s, prompt_id=p, caption=t, ordinal=i,
                 image_id=image_id(p, IDENTITY, None, i, 0, STEPS, GUIDANCE))
            for p, t, s in prompts[:2] for i in range(PER_PROMPT)]
    images = base + [dict(row, variant=f"step {step}") for step in (5, 10) for row in base]
    win_tie_loss = [dict(adapter=f"step {step}", run="run1", step=step, reward=reward, wins=w, ties=1, losses=3 - w,
                         n=4, mean_reward=0.1 * w, base_mean_reward=0.1)
                    for reward in ("m1", "m2") for step, w in ((5, 2), (10, 3))]
    evaluation = {"run": "run1", "proxy": "m1", "gold": "m2", "heldout_prompts": 2, "win_tie_loss": win_tie_loss,
                  "steps_curve": [dict(run="", step=0, adapter="base", proxy=0.1, gold=0.2),
                                  dict(run="run1", step=5, adapter="step 5", proxy=0.2, gold=0.25),
                                  dict(run="run1", step=10, adapter="step 10", proxy=0.3, gold=0.22)],
                  "best_of_n_curve": [dict(n=1, kl=0.0, sqrt_kl=0.0, proxy=0.1, gold=0.2),
                                      dict(n=2, kl=0.19, sqrt_kl=0.44, proxy=0.15, gold=0.21)],
                  "images": images}
    return {
        "ingest": {"new_rows": {"prompts": 6, "labels": 72}},
        "selected": None,
        "contrast": {"rows_added": 0, "method": "rules", "prompts": 0},
        "generated": {"generator": GENERATOR, "identity": IDENTITY, "images": 2 * len(prompts), "shards": 2,
                      "already_present": 0, "images_per_second": 1.5, "sets": sets, "max_prompts": None,
                      "images_per_prompt": PER_PROMPT, "steps": STEPS, "guidance": GUIDANCE},
        "image_folders": [],
        "scores": [{"reward_model": m, "images": 12, "rows_added": 48, "rows_superseded": 0, "failures": 0,
                    "shards": 1, "images_per_second": 3.0} for m in ("m1", "m2")],
        "score_imports": [{"file": "/data/scores.parquet", "rows": 96, "added": 96, "already_present": 0,
                           "replaced": 0, "reward_models": ["m1", "m2"]}],
        "caption_ranking": None, "mlflow_run_id": "0" * 32,
        "table2": format_table2(means) if with_metrics else None,
        "set_means": means.to_dict("records") if with_metrics else None,
        "finetune": [{"algo": "refl", "run": "run1", "folder": "/store/adapters/refl-run1", "final_step": 10,
                      "selected_step": 5, "base_mean_reward": 0.1, "final_mean_reward": 0.3, "final_wins": "3/4",
                      "evaluation": evaluation}],
    }


def markdown_tables(markdown: str) -> list[list[str]]:
    """The markdown's tables, each as its lines."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def assert_well_formed(table: list[str]) -> None:
    """A header, a separator, then rows, every line with the header's number of cells."""
    cells = [len(re.split(r"(?<!\\)\|", line)) - 2 for line in table]
    assert len(table) >= 3 and re.fullmatch(r"\|(-{3,}:?\|)+", table[1]), table
    assert len(set(cells)) == 1, table


def test_the_report_shows_every_stage_table2_plots_and_an_image_per_prompt(store):
    summary = summary_of(store)
    ranking = caption_ranking(store, ["m1", "m2"])
    page = build_report(store, summary, ranking)

    assert "\\n" not in page  # no text tables pasted as strings
    for stage in ("ingest-tia2", "generate", "score", "import-scores", "metrics", "finetune", "evaluate"):
        assert f"<td>{stage}</td>" in page, stage
    # Table 2 as a table: a row per (set, spec), the set's label and caption count on its first row
    table2 = page.split("Table 2)</h2>")[1].split("</table>")[0]
    assert "<table class=data>" in table2 and "<th>AUROC</th>" in table2 and "<th>Kendall</th>" in table2
    assert table2.count("<tr>") == 1 + 3 * 2 and "C150 (2)" in table2 and "textnorm(m1, tau=0.5)" in table2
    assert "<b>" in table2  # each set's best value
    # plots: score distributions, the fine-tune curve, win/tie/loss, best-of-n
    assert page.count('<img src="data:image/png;base64,') == 4
    # every generated prompt with its images and its whole caption; the held-out images beside the base's
    gallery = page.split("<h2>Images of tiny-sd</h2>")[1]
    for _, text, _ in prompts_to_generate(store, None):
        figure = gallery.split(f"<figcaption>{text}</figcaption>")[0].rsplit("<figure>", 1)[1]
        assert figure.count("<img class=thumb") == PER_PROMPT, text
    heldout = page.split("Held-out images")[1].split("</table>")[0]
    assert heldout.count("<img class=thumb") == 2 * PER_PROMPT * 3 and "<th>step 10</th>" in heldout
    assert "wins against the base" in page  # at a glance: the last checkpoint's wins by the gold reward


def test_without_reward_specs_the_report_and_the_table2_artifact_say_why(store):
    summary = summary_of(store, with_metrics=False)
    page = build_report(store, summary, None)
    assert "No metrics against human labels in this run" in page and "<h2>Fine-tuning" in page
    markdown = table2_markdown(summary)
    assert markdown.startswith("## Alignment with human labels") and "no reward specs are configured" in markdown


def test_the_artifacts_are_markdown_tables_without_file_links(store):
    summary = summary_of(store)
    with stage_run("tia2-benchmark", {}) as run:
        summary["mlflow_run_id"] = run.info.run_id
        uri = record_report(store, summary, caption_ranking(store, ["m1", "m2"]))
    assert uri.startswith("file://")  # a local store: no UI to link to
    report, table2 = report_markdown(summary), table2_markdown(summary)
    assert "file://" not in report + table2
    assert f"`{uri.removeprefix('file://')}`" in report  # the plain path, as text
    stages = [line for line in report.split("### Stages")[1].splitlines() if line]
    assert len(stages) == 9 and all(line.startswith("- **") for line in stages)  # one line a stage, no stray lines
    assert "- **evaluate**: run run1: 2 checkpoint(s)" in report
    tables = markdown_tables(table2)
    assert len(tables) == 3 and "### C150 (2 captions)" in table2  # a table per set
    for table in tables:
        assert_well_formed(table)
        assert table[0] == "| AUROC | AUPRC | AP@5 | AP@10 | AP@25 | Spearman | Kendall | Reward |"
        assert len(table) == 2 + 2  # header, separator, a row per spec


def test_with_a_tracking_server_artifacts_link_to_the_mlflow_ui(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setattr(mlflow.tracking.MlflowClient, "get_run",
                        lambda self, run_id: SimpleNamespace(info=SimpleNamespace(experiment_id="7")))
    page = "http://mlflow.example:5000/#/experiments/7/runs/abc"
    assert run_page_url("abc") == page + WORKFLOW_QUERY
    assert artifact_reference("abc", "plots/a.png") == f"[plots/a.png]({page}/artifacts/plots/a.png{WORKFLOW_QUERY})"
    assert run_page_url("abc", server="http://127.0.0.1:5000").startswith("http://127.0.0.1:5000/#/experiments/7/")


def test_the_parent_run_gets_the_headline_numbers_and_stage_runs_are_named_by_model(store):
    summary = summary_of(store)
    ranking = caption_ranking(store, ["m1", "m2"])
    with stage_run("tia2-benchmark", {}) as parent:
        summary["mlflow_run_id"] = parent.info.run_id
        for model, shard in (("tiny-clip", (0, 1)), ("tiny-blip2", (1, 2))):
            with stage_run("score", {}, parent.info.run_id, label=run_label(model, shard)):
                pass
        record_report(store, summary, ranking)
    client = mlflow.MlflowClient()
    metrics = client.get_run(parent.info.run_id).data.metrics
    assert metrics["images_generated"] == 12 and metrics["rows_scored"] == 96 and "caption_top1/m1" in metrics
    assert metrics[metric_key("counting", "textnorm(m1, tau=0.5)", "auroc")] == pytest.approx(
        next(r["auroc"] for r in summary["set_means"] if r["set"] == "counting" and r["reward"] != "m1"))
    history = client.get_metric_history(parent.info.run_id, "finetune/refl/heldout_win_rate/m2")
    assert sorted((m.step, m.value) for m in history) == [(5, 0.5), (10, 0.75)]
    assert {k for k, _, _ in headline_metrics(summary, ranking)} <= set(metrics)
    children = mlflow.search_runs(experiment_names=["tia2"], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.info.run_name for r in children} == {"score tiny-clip", "score tiny-blip2 shard 2/2"}
    assert {r.data.tags["tia2.stage"] for r in children} == {"score"}
    experiment = mlflow.get_experiment_by_name("tia2")
    assert EXPERIMENT_KIND.items() <= experiment.tags.items()


def test_shards_in_threads_get_one_labelled_bar_each(monkeypatch):
    from tia2 import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    both_open, seen = threading.Barrier(2), []

    def shard(label):
        with progress.progress_bar(label, 3) as advance:
            both_open.wait()
            seen.append(sorted(task.description for task in progress._display.tasks))
            advance(3, 1.0)
            both_open.wait()

    threads = [threading.Thread(target=shard, args=(f"generating (tiny-sd shard {i}/2)",)) for i in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == [["generating (tiny-sd shard 1/2)", "generating (tiny-sd shard 2/2)"]] * 2  # one display
    assert progress._display is None  # the last bar to close ended it


FLOW_THAT_LOGS = """
import json

from tia2.config import set_prefect_defaults

set_prefect_defaults()
from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogWorker
from prefect.runtime import flow_run


@flow
def stage():
    get_run_logger().info("ingest: 6 new prompts")
    return str(flow_run.id)


run_id = stage()
APILogWorker.drain_all(timeout=30)  # logs go to the API in the background
with get_client(sync_client=True) as client:
    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
print(json.dumps([log.message for log in logs]))
"""


@pytest.mark.slow
@pytest.mark.prefect_server
def test_info_lines_reach_the_prefect_api_but_not_the_console(tmp_path, prefect_api):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=str(PROJECT), PREFECT_API_URL=prefect_api)
    done = subprocess.run([sys.executable, "-c", FLOW_THAT_LOGS], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ingest: 6 new prompts" in json.loads(done.stdout.strip().splitlines()[-1])  # in the Prefect UI
    assert "ingest: 6 new prompts" not in done.stderr and "Finished in state" not in done.stderr


def test_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    out = subprocess.run([sys.executable, "-m", "cli", "--version"], capture_output=True, text=True, cwd=PROJECT)
    assert out.returncode == 0 and out.stdout.strip() == f"tia2 {version('tia2')}"
