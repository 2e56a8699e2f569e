"""Evaluation of fine-tuned adapters (tasks/evaluate_finetune.py): a tiny ReFL run of tiny-sd with two
checkpoints and a zero LoRA against the base model on held-out prompts, scored by tiny reward twins;
every number is checked against a direct computation from the stored images and scores."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from types import SimpleNamespace

import mlflow
import numpy as np
import pyarrow as pa
import pytest
import torch

from tasks.contrast import rule_contrasts
from tasks.evaluate_finetune import best_of_n_kl, evaluate_finetune, record_evaluate_finetune
from tasks.finetune import OnlineReward, finetune, paper_config, training_prompts
from tests.support.prefect_server import SERVER_GROUP
from tests.support.project import PROJECT
from tests.support.stores import copy_store
from cli.main import main
from tia2.models.diffusion import create_pipeline, save_adapter
from tia2.models.diffusion_training import add_lora
from tia2.store import Store, stable_id

# Every test reads `evaluated`, a fine-tuning run and its evaluation (about 40 s), built once per
# xdist worker: all of them on the worker of the Prefect-server tests (tests/conftest.py), which the
# artifacts test below needs, build it once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(SERVER_GROUP)]
TEXTS = ["a photo of two cats", "three red apples on a table", "a blue car next to a tree",
         "four dogs on the grass", "a red ball under a chair"]
GOLD = "tiny-pickscore"
TEXTNORM = "textnorm(tiny-clip, tau=0.05, contrast=rules)"
TOL = 1e-6
SETTINGS = dict(sets=["test"], images_per_prompt=4, denoise_steps=2, guidance=1.0)
CLI_SETTINGS = ["--model", "tiny-sd", "--set", "test", "--images-per-prompt", "4", "--steps", "2", "--guidance", "1"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Five prompts of one set, the first two the training prompts of a 2-step ReFL run against
    tiny-clip (checkpoints at steps 1 and 2), a zero adapter, and the recorded evaluation."""
    root = tmp_path_factory.mktemp("evaluate_finetune")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # module scope: the per-test MLflow store of conftest is not set up yet, so this one is its own
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        store = Store(root / "store")
        store.upsert("prompts", pa.Table.from_pylist([
            dict(prompt_id=stable_id("test", t), text=t, set="test", category=None, subcategory=None, source="test")
            for t in TEXTS]))
        now = datetime.now(timezone.utc)
        store.upsert("contrast_prompts", pa.Table.from_pylist([
            dict(prompt_id=stable_id("test", t), text=c, method="rules", generator="rules-v1", created_at=now,
                 note=None) for t in TEXTS for c in rule_contrasts(t)]))
        prompts = training_prompts(store, ["test"], 2)
        config = paper_config("refl", "tiny-clip", denoise_steps=4, guidance=1.0, batch_size=4, refl_start=2,
                              refl_end=3, eval_images_per_prompt=2, steps=2, checkpoint_every=1,
                              learning_rate=5e-2, refl_lambda=100.0)
        trained = finetune(store, create_pipeline("tiny-sd"), config, prompts, OnlineReward("tiny-clip", store, prompts))
        generator = create_pipeline("tiny-sd")
        add_lora(generator.pipeline.unet, rank=4, alpha=4.0, seed=0)  # B = 0: the base model exactly
        zero = save_adapter(generator.pipeline.unet, root / "zero")
        result = record_evaluate_finetune(store, "tiny-sd", GOLD, run=trained.run, adapters=[zero.parent],
                                          rewards=[TEXTNORM], tol=TOL, **SETTINGS)
    torch.set_num_threads(threads)
    return SimpleNamespace(store=store, run=trained.run, training=[p for p, _ in prompts], zero=zero,
                           result=result, uri=uri, root=root)


def stored_values(store: Store) -> dict:
    """{(lora, prompt_id, ordinal): {reward: value}} computed directly from the scores table:
    raw caption scores, and TextNorm by hand over the rules contrast prompts."""
    rows = store.connect().execute(
        """SELECT coalesce(i.lora, '') AS lora, i.prompt_id, i.ordinal, s.reward_model, s.text = p.text AS is_caption,
                  c.text IS NOT NULL AS is_contrast, s.score
           FROM images i JOIN prompts p USING (prompt_id) JOIN scores s USING (image_id)
           LEFT JOIN (SELECT DISTINCT prompt_id, text FROM contrast_prompts WHERE method = 'rules') c
             ON c.prompt_id = i.prompt_id AND c.text = s.text""").df()
    values = {}
    for (lora, prompt_id, ordinal, model), image in rows.groupby(["lora", "prompt_id", "ordinal", "reward_model"]):
        caption = image[image.is_caption]["score"].item()
        mine = values.setdefault((lora, prompt_id, ordinal), {})
        mine[model] = caption
        if model == "tiny-clip":
            logits = np.concatenate([[caption], image[image.is_contrast]["score"].to_numpy()]) / 0.05
            mine[TEXTNORM] = float(np.exp(logits[0] - np.logaddexp.reduce(logits)))
    return values


def pairs(values: dict, lora: str, reward: str) -> tuple[np.ndarray, np.ndarray]:
    """(adapter values, base values) over the matched (prompt, ordinal) pairs."""
    keys = sorted((p, o) for lo, p, o in values if lo == lora)
    return (np.array([values[(lora, p, o)][reward] for p, o in keys]),
            np.array([values[("", p, o)][reward] for p, o in keys]))


def test_held_out_prompts_and_matched_images(evaluated):
    con = evaluated.store.connect()
    heldout = sorted(p for p, _, _ in evaluated.result.prompts)
    assert len(heldout) == 3 and not set(heldout) & set(evaluated.training)
    made = con.execute("SELECT coalesce(lora, ''), list(DISTINCT prompt_id ORDER BY prompt_id), count(*), "
                       "list(DISTINCT seed ORDER BY seed) FROM images GROUP BY 1").fetchall()
    assert len(made) == 4  # the base and three adapters
    seeds = {tuple(s) for _, _, _, s in made}
    assert all(prompts == heldout and n == 12 for _, prompts, n, _ in made) and len(seeds) == 1


def test_win_tie_loss_equals_a_direct_computation_from_stored_scores(evaluated):
    values = stored_values(evaluated.store)
    rows = evaluated.store.connect().execute(
        "SELECT adapter, lora, run, step, reward, wins, ties, losses, n, mean_reward, base_mean_reward "
        "FROM finetune_evaluation").fetchall()
    assert {r[4] for r in rows} == {"tiny-clip", GOLD, TEXTNORM}
    assert {(r[2], r[3]) for r in rows} == {(None, None), (evaluated.run, 1), (evaluated.run, 2)}
    moved = 0
    for adapter, lora, run, step, reward, wins, ties, losses, n, mean, base_mean in rows:
        mine, base = pairs(values, lora, reward)
        assert n == len(mine) == 12
        assert (wins, ties, losses) == ((mine > base + TOL).sum(), (abs(mine - base) <= TOL).sum(),
                                        (mine < base - TOL).sum()), (adapter, reward)
        assert mean == pytest.approx(mine.mean(), abs=1e-12) and base_mean == pytest.approx(base.mean(), abs=1e-12)
        moved += wins + losses if run else 0
    assert moved > 0  # the trained checkpoints change the images: the counts are not all ties


def test_a_zero_lora_ties_the_base_model_everywhere(evaluated):
    rows = evaluated.store.connect().execute(
        "SELECT reward, wins, ties, losses FROM finetune_evaluation WHERE adapter = ?", [str(evaluated.zero)]).fetchall()
    assert sorted(rows) == sorted((reward, 0, 12, 0) for reward in ("tiny-clip", GOLD, TEXTNORM))
    zero_lora = evaluated.result.adapters[-1].lora
    same = evaluated.store.connect().execute(
        """SELECT count(*), count(*) FILTER (WHERE a.sha256 = b.sha256) FROM images a JOIN images b
           ON a.prompt_id = b.prompt_id AND a.ordinal = b.ordinal WHERE a.lora = ? AND b.lora IS NULL""",
        [zero_lora]).fetchall()
    assert same == [(12, 12)]  # a zero adapter makes the base model's pixels


def test_step_curve_has_step_zero_and_each_checkpoint_with_direct_means(evaluated):
    values = stored_values(evaluated.store)
    curve = evaluated.result.steps_curve
    assert curve["step"].tolist() == [0, 1, 2] and curve["adapter"].tolist() == ["base", "step 1", "step 2"]
    assert curve["run"].iloc[0] == "" and curve["run"].iloc[1:].str.len().min() > 0  # prints without NaN
    loras = {a.step: a.lora for a in evaluated.result.adapters if a.step is not None}
    loras[0] = ""  # the base model's images
    for row in curve.itertuples():
        for reward, mean in (("tiny-clip", row.proxy), (GOLD, row.gold)):
            assert mean == pytest.approx(np.mean([v[reward] for (lora, _, _), v in values.items()
                                                  if lora == loras[row.step]]), abs=1e-12)


def test_best_of_n_curve_picks_by_the_proxy_with_the_analytic_kl(evaluated):
    values = stored_values(evaluated.store)
    curve = evaluated.result.best_of_n_curve
    assert curve["n"].tolist() == [1, 2, 4]
    assert curve["kl"].tolist() == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75], abs=1e-15)
    assert curve["sqrt_kl"].tolist() == pytest.approx(np.sqrt(curve["kl"]).tolist())
    assert best_of_n_kl(1) == 0
    heldout = [p for p, _, _ in evaluated.result.prompts]
    for row in curve.itertuples():
        picks = []
        for prompt_id in heldout:
            candidates = [(values[("", prompt_id, o)]["tiny-clip"], -o) for o in range(row.n)]
            picks.append(values[("", prompt_id, -max(candidates)[1])])
        assert row.proxy == pytest.approx(np.mean([p["tiny-clip"] for p in picks]), abs=1e-12)
        assert row.gold == pytest.approx(np.mean([p[GOLD] for p in picks]), abs=1e-12)
    assert curve["proxy"].is_monotonic_increasing  # more candidates: a pick at least as good by the proxy


def test_plots_grids_and_tables_are_logged_to_mlflow(evaluated):
    client = mlflow.MlflowClient(tracking_uri=evaluated.uri)
    [run] = client.search_runs([client.get_experiment_by_name("tia2").experiment_id],
                               "tags.`tia2.stage` = 'evaluate'")
    assert run.data.params["proxy"] == "tiny-clip" and run.data.params["heldout_prompts"] == "3"

    def names(folder=None):
        return {a.path for a in client.list_artifacts(run.info.run_id, folder)}

    assert {"win_tie_loss.csv", "images.csv", "plots", "grids", "curves"} <= names()
    assert names("plots") == {"plots/overoptimization_steps.png", "plots/overoptimization_best_of_n.png",
                              "plots/win_tie_loss.png"}
    assert names("curves") == {"curves/steps.csv", "curves/best_of_n.csv"}
    assert names("grids") == {"grids/heldout_01.png"}
    from PIL import Image

    grid = Image.open(client.download_artifacts(run.info.run_id, "grids/heldout_01.png", str(evaluated.root)))
    assert grid.size == (4 * 128, 20 + 3 * (128 + 18))  # columns base + 3 adapters, a row per held-out prompt
    history = client.get_metric_history(run.info.run_id, "mean_reward/tiny-clip")
    assert sorted(m.step for m in history) == [0, 1, 2]


def test_rerun_generates_and_scores_nothing_new(evaluated, tmp_path):
    store = copy_store(evaluated.store, tmp_path / "store")
    count = "SELECT (SELECT count(*) FROM images), (SELECT count(*) FROM scores)"
    before = store.connect().execute(count).fetchall()
    again = evaluate_finetune(store, "tiny-sd", GOLD, run=evaluated.run, adapters=[evaluated.zero],
                              rewards=[TEXTNORM], tol=TOL, **SETTINGS)
    assert (again.images_made, again.rows_scored) == (0, 0)
    assert store.connect().execute(count).fetchall() == before
    assert again.win_tie_loss.equals(evaluated.result.win_tie_loss)
    # a new held-out prompt: only its images (base + 3 adapters) are made and scored
    store.upsert("prompts", pa.Table.from_pylist([dict(prompt_id=stable_id("test", "a green kite"), text="a green kite",
                                                       set="test", category=None, subcategory=None, source="test")]))
    more = evaluate_finetune(store, "tiny-sd", GOLD, run=evaluated.run, adapters=[evaluated.zero], tol=TOL, **SETTINGS)
    assert more.images_made == 16 and len(more.prompts) == 4
    assert more.rows_scored == 16 * 2  # two models, the new prompt has no contrast prompts


def test_human_labels_as_the_gold(evaluated, tmp_path):
    store = copy_store(evaluated.store, tmp_path / "store")
    images = store.connect().execute("SELECT image_id FROM images").fetchall()
    votes = {i: [int(c, 16) % 3 - 1 for c in i[:3]] for (i,) in images}  # varied annotations per image
    store.upsert("labels", pa.Table.from_pylist([dict(image_id=i, annotator=a, label=v)
                                                 for i, vs in votes.items() for a, v in enumerate(vs)]))
    result = evaluate_finetune(store, "tiny-sd", "human", run=evaluated.run, tol=TOL, **SETTINGS)
    graded = {i: np.mean([{1: 1.0, 0: 0.0, -1: 0.5}[v] for v in vs]) for i, vs in votes.items()}
    means = result.frame.assign(expected=result.frame["image_id"].map(graded)).groupby("variant", sort=False)["expected"].mean()
    assert result.gold == "human"
    assert result.steps_curve["gold"].tolist() == pytest.approx(means[["base", "step 1", "step 2"]].tolist())
    human = result.win_tie_loss[result.win_tie_loss["reward"] == "human"]
    assert human["mean_reward"].tolist() == pytest.approx(means[["step 1", "step 2"]].tolist())


def write_run_folder(root, zero, generator: str, prompts) -> str:
    """An adapter in a run folder whose config.json names its base model and training prompts."""
    step = root / "step-000001"
    step.mkdir(parents=True)
    shutil.copy(zero, step / zero.name)
    (root / "config.json").write_text(json.dumps({"generator": generator, "reward": "tiny-clip", "prompts": prompts}))
    return str(step)


def test_cli_prints_the_table_and_reports_bad_input_in_one_line(evaluated, tmp_path, capsys):
    store = copy_store(evaluated.store, tmp_path / "store")
    base = ["--store", str(store.root), "evaluate", *CLI_SETTINGS]
    assert main(base + ["--run", evaluated.run, "--gold", GOLD, "--tol", str(TOL)]) == 0
    out = capsys.readouterr().out
    assert "(0 images made, 0 score rows added)" in out and "step 1" in out
    assert out.split("\ntiny-clip", 1)[1].split()[:2] == [
        f"{r.wins}/{r.ties}/{r.losses}" for r in evaluated.result.win_tie_loss.query("reward == 'tiny-clip'")
        .itertuples() if r.adapter.startswith("step")]
    everything = [[stable_id("test", t), t] for t in TEXTS]
    for args, message in [
        (["--run", "nope", "--gold", GOLD], "no fine-tuning run 'nope'"),
        (["--adapter", str(tmp_path / "missing"), "--gold", GOLD], "no LoRA adapter at"),
        (["--run", evaluated.run, "--gold", "tiny-clip"], "must differ from the proxy"),
        (["--run", evaluated.run, "--gold", "textnorm(tiny-clip"], "bad reward spec"),
        (["--run", evaluated.run, "--gold", "no-such-model"], "unknown reward model"),
        (["--run", evaluated.run, "--gold", GOLD, "--reward", "textnorm(tiny-clip, tau=1)"], "no contrast prompts of method 'dataset'"),
        (["--run", evaluated.run, "--gold", GOLD, "--set", "nope"], "no prompts in set(s) nope"),
        (["--run", evaluated.run, "--gold", GOLD, "--images-per-prompt", "0"], "must be a whole number of at least 1"),
        (["--run", evaluated.run, "--adapter", str(evaluated.zero), "--gold", GOLD], "not allowed with argument"),
        (["--adapter", str(evaluated.zero), "--gold", GOLD], "give the proxy reward (--proxy)"),
        (["--adapter", write_run_folder(tmp_path / "all", evaluated.zero, "tiny-sd@random-init:0", everything),
          "--gold", GOLD], "no held-out prompts"),
        (["--adapter", write_run_folder(tmp_path / "other", evaluated.zero, "sd-2-1@sha256:0123", everything[:1]),
          "--gold", GOLD], "was trained on sd-2-1@sha256:0123"),
    ]:
        assert main(base + args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


@pytest.mark.prefect_server
def test_prefect_artifacts_inside_a_flow_run(evaluated, tmp_path, prefect_api):
    """Inside a Prefect flow the stage posts a table and a markdown artifact (the session's server:
    this flow run's artifacts alone are read)."""
    import os

    store = copy_store(evaluated.store, tmp_path / "store")
    script = f"""
import json
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from tasks.evaluate_finetune import record_evaluate_finetune
from tia2.store import Store

@flow
def evaluate():
    record_evaluate_finetune(Store({str(store.root)!r}), "tiny-sd", {GOLD!r}, run={evaluated.run!r}, **{SETTINGS!r})

run = evaluate(return_state=True).state_details.flow_run_id
with get_client(sync_client=True) as client:
    mine = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run]))
    print(json.dumps({{a.key: a.data for a in client.read_artifacts(artifact_filter=mine)}}))
"""
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=str(PROJECT),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", PREFECT_API_URL=prefect_api,
               DO_NOT_TRACK="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    artifacts = json.loads(done.stdout.strip().splitlines()[-1])
    table = json.loads(artifacts["tia2-finetune-evaluation"])
    assert len(table) == 2 * 2 and {r["reward"] for r in table} == {"tiny-clip", GOLD}
    assert {(r["step"], r["reward"], r["wins"], r["ties"], r["losses"]) for r in table} == {
        (r.step, r.reward, r.wins, r.ties, r.losses) for r in evaluated.result.win_tie_loss.itertuples()
        if r.adapter.startswith("step") and r.reward != TEXTNORM}
    markdown = artifacts["tia2-finetune-overoptimization"]
    assert "plots/overoptimization_steps.png" in markdown and "Best-of-n" in markdown
