"""Reward-model training (tia2/reward_training.py, tasks/train_reward.py, `tia2 train-reward`):
pairs and splits, eq. 1 learning a synthetic colour preference (and its reverse) on tiny twins,
freezing and ImageReward's new head, exact resume, two processes against one, early stopping,
user mistakes, and the trained model as a reward model of the registry: `tia2 score`, a TextNorm
spec, a config, a short fine-tune."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cli.main import main
from tasks.preferences import compute_preference_metrics, ingest_preferences
from tasks.train_reward import record_train_reward
from tests.support.reward_training import colour_items, one_torch_thread, ranked_images, train_in_process_group
from tests.support.stores import copy_store
from tia2.errors import UserError
from tia2.models import create_reward_model, list_models, model_config
from tia2.preference import Items, figures, item_counts
from tia2.reward_training import (MicroBatches, RankedImages, image_rewards, paper_settings, prepare_for_training,
                                  split_items, train_reward_model)
from tia2.specs import parse_spec
from tia2.store import Store

# what learns the colour preference in about 5 s here: tiny-pickscore, lr 1e-3, 60 steps of 16 pairs
LEARN = dict(steps=60, batch_size=16, learning_rate=1e-3, validate_every=20, warmup=0.0)
QUICK = dict(steps=4, batch_size=8, learning_rate=1e-2, validate_every=2)  # runs a few steps, learns nothing


@pytest.fixture(autouse=True)
def one_thread():
    with one_torch_thread():
        yield


def colour_store(root: Path, seed: int = 0, items_per_colour: int = 10, **options) -> Store:
    """A store whose preference set `colours` is `colour_items`' (the image files registered)."""
    items = colour_items(root / "images", items_per_colour=items_per_colour, seed=seed, **options)
    store = Store(root / "store")
    ingest_preferences(store, items, "imagereward", "colours", items.parent)
    return store


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store with `colour-rm` trained from tiny-pickscore on its colours (tests copy it), and
    the MLflow store its run went to."""
    import mlflow

    root = tmp_path_factory.mktemp("trained")
    store = colour_store(root)
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        result = record_train_reward(store, "tiny-pickscore", ["colours"], "colour-rm",
                                     {**LEARN, "split": "item", "validation_fraction": 0.25})
    return store, result, uri


# --- pairs and splits ------------------------------------------------------------------------
def test_pairs_are_every_differently_ranked_pair_of_an_item_and_splits_keep_groups_whole():
    ranks = [[1, 2, 2, 3], [2, 1], [1, 1, 1], [3, 1, 2]]
    rows = [(i, r) for i, item in enumerate(ranks) for r in item]
    prompts = ["red", "blue", "red", "green"]
    images = RankedImages(tuple(f"{i}-{n}.png" for n, (i, _) in enumerate(rows)),
                          tuple(prompts[i] for i, _ in rows),
                          Items.from_item_index(np.array([i for i, _ in rows]), np.array([r for _, r in rows], float)),
                          tuple(prompts))
    better, worse = images.pairs()
    expected = set()
    start = 0
    for item in ranks:
        for a, b in itertools.combinations(range(len(item)), 2):
            if item[a] != item[b]:
                expected.add((start + a, start + b) if item[a] < item[b] else (start + b, start + a))
        start += len(item)
    assert set(zip(better.tolist(), worse.tolist())) == expected and len(better) == len(expected) == 9
    for seed in range(6):
        train, validation = split_items(images, 0.34, seed)
        assert {train.groups, validation.groups} != set() and not set(train.groups) & set(validation.groups)
        assert sorted(train.groups + validation.groups) == sorted(prompts)  # both "red" items on one side
        assert len(set(validation.groups)) == 1
        again = split_items(images, 0.34, seed)
        assert again[1].paths == validation.paths
    assert len({split_items(images, 0.34, seed)[1].groups for seed in range(6)}) > 1
    with pytest.raises(UserError, match="at least two"):
        split_items(images.subset(np.array([0])), 0.5, 0)


def test_an_epoch_visits_every_pair_once_and_processes_share_each_step():
    ranks = np.tile([1.0, 2.0, 3.0], 8)  # 8 items of 3 images: 24 pairs
    data = RankedImages(tuple(map(str, range(24))), ("p",) * 24,
                        Items.from_item_index(np.repeat(np.arange(8), 3), ranks), tuple(map(str, range(8))))
    settings = paper_settings("open_clip", batch_size=8, accumulation_steps=2, seed=3)
    one = MicroBatches(data, None, settings, 0, 1, 0, 6)
    epoch = np.concatenate([one.pair_indices(step, m) for step in range(3) for m in range(2)])
    assert sorted(epoch.tolist()) == list(range(24))
    second = np.concatenate([one.pair_indices(step, m) for step in range(3, 6) for m in range(2)])
    assert sorted(second.tolist()) == list(range(24)) and second.tolist() != epoch.tolist()
    two = [MicroBatches(data, None, replace_settings(settings, accumulation_steps=1), r, 2, 0, 6) for r in range(2)]
    for step in range(6):
        assert np.concatenate([one.pair_indices(step, m) for m in range(2)]).tolist() == \
            np.concatenate([two[r].pair_indices(step, 0) for r in range(2)]).tolist()


def replace_settings(settings, **changes):
    from dataclasses import replace

    return replace(settings, **changes)


# --- learning --------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_the_colour_preference_is_learned_and_its_reverse_unlearned(tmp_path, seed):
    """Held-out accuracy above 0.9 from an untrained model near 0.5; trained on the reversed
    preference, below 0.1 on the true one (the same held-out items)."""
    accuracies = {}
    for reverse in (False, True):
        items = colour_items(tmp_path / f"images-{reverse}", items_per_colour=10, seed=seed, reverse=reverse)
        train, validation = split_items(ranked_images(items), 0.25, seed)
        true_validation = split_items(ranked_images(colour_items(tmp_path / "true", items_per_colour=10, seed=seed)),
                                      0.25, seed)[1]
        settings = paper_settings("hf_clip", **LEARN, seed=seed)
        model = create_reward_model("tiny-pickscore", seed=seed)
        result = train_reward_model(model, train, validation, settings, tmp_path / f"run-{reverse}")
        assert result.finished and 0.3 < result.untrained_accuracy < 0.7
        accuracies[reverse] = figures(item_counts(true_validation.items,
                                                  image_rewards(model, true_validation, settings)))["accuracy"]
        assert accuracies[reverse] == pytest.approx(1 - result.best_accuracy if reverse else result.best_accuracy)
    assert accuracies[False] > 0.9 and accuracies[True] < 0.1, accuracies


# --- the model -------------------------------------------------------------------------------
@pytest.mark.parametrize("name, frozen_prefixes", [
    ("tiny-imagereward", ("text.embeddings.", "text.encoder.layer.0.", "vision.embeddings.",
                          "vision.encoder.layers.0.")),
    ("tiny-pickscore", ("clip.text_model.embeddings.", "clip.text_model.encoder.layers.0.",
                        "clip.vision_model.embeddings.", "clip.vision_model.pre_layrnorm.",
                        "clip.vision_model.encoder.layers.0.")),
    ("tiny-clip", ("clip.token_embedding.", "clip.positional_embedding", "clip.transformer.resblocks.0.",
                   "clip.visual.conv1.", "clip.visual.class_embedding", "clip.visual.positional_embedding",
                   "clip.visual.ln_pre.", "clip.visual.transformer.resblocks.0.", "clip.logit_scale")),
])
def test_the_lower_layers_are_frozen_and_the_rest_trained(tmp_path, name, frozen_prefixes):
    """fix_rate 0.5 of two blocks: the stem and block 0 of each tower stay as they were, every
    other parameter changes (tiny-clip's logit_scale too is frozen: its score is a plain cosine)."""
    family = model_config(name)["family"]
    data = ranked_images(colour_items(tmp_path / "images", items_per_colour=2))
    model = create_reward_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extra = {"text_dropout": 0.0, "new_head": False} if family == "imagereward" else {}
    result = train_reward_model(model, *split_items(data, 0.34, 0), paper_settings(
        family, **QUICK, fix_rate=0.5, weight_decay=0.0, **extra), tmp_path / "run")
    frozen = {k for k in result.frozen}
    assert frozen == {k for k, _ in model.named_parameters() if k.startswith(frozen_prefixes)}
    unchanged = {k for k, p in model.named_parameters() if torch.equal(p, before[k])}
    # ImageReward's head has no activations: its last bias adds the same to both sides of eq. 1's
    # difference, gets no gradient (as in the reference) and stays as initialised
    no_gradient = {"head.7.bias"} if family == "imagereward" else set()
    assert unchanged == frozen | no_gradient


def test_imagereward_gets_a_new_head_drawn_as_the_paper_says():
    model = create_reward_model("tiny-imagereward")
    prepare_for_training(model, paper_settings("imagereward", seed=4))
    width = model.head[0].in_features
    weights = torch.cat([m.weight.detach().flatten() for m in model.head if isinstance(m, torch.nn.Linear)])
    assert abs(float(weights.std()) * (width + 1) - 1) < 0.1 and abs(float(weights.mean())) * (width + 1) < 0.1
    assert all(not m.bias.any() for m in model.head if isinstance(m, torch.nn.Linear))
    again = create_reward_model("tiny-imagereward")
    prepare_for_training(again, paper_settings("imagereward", seed=4))
    assert torch.equal(again.head[0].weight, model.head[0].weight)
    assert all(m.p == 0.1 for m in model.text.modules() if isinstance(m, torch.nn.Dropout))  # med_config.json's


def test_resume_is_exact_with_dropout(tmp_path):
    """N steps in one call == k steps, a new process's model, then the rest: the same weights,
    optimizer state and curves, bit for bit (ImageReward's dropout draws included)."""
    train, validation = split_items(ranked_images(colour_items(tmp_path / "images", items_per_colour=2)), 0.34, 0)
    settings = paper_settings("imagereward", steps=6, batch_size=8, accumulation_steps=2, learning_rate=1e-3,
                              validate_every=3)
    whole = create_reward_model("tiny-imagereward")
    done = train_reward_model(whole, train, validation, settings, tmp_path / "whole")
    first = train_reward_model(create_reward_model("tiny-imagereward"), train, validation, settings,
                               tmp_path / "parts", stop_after=2)
    assert not first.finished and first.state.step == 2
    resumed = create_reward_model("tiny-imagereward")
    rest = train_reward_model(resumed, train, validation, settings, tmp_path / "parts")
    assert rest.finished and rest.steps_done == 4
    assert json.dumps(rest.state.history) == json.dumps(done.state.history)  # NaN: step 0's training loss
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    saved = [torch.load(folder / "step-000006" / "training_state.pt", weights_only=False)["optimizer"]["state"]
             for folder in (tmp_path / "whole", tmp_path / "parts")]
    assert all(torch.equal(saved[0][k]["exp_avg_sq"], saved[1][k]["exp_avg_sq"]) for k in saved[0])
    different = create_reward_model("tiny-imagereward")
    train_reward_model(different, train, validation, replace_settings(settings, seed=1), tmp_path / "other")
    assert not torch.equal(different.head[0].weight, whole.head[0].weight)


@pytest.mark.slow
def test_two_processes_give_the_one_process_result_on_the_same_global_batch(tmp_path):
    items = colour_items(tmp_path / "images", items_per_colour=2)
    # adam_eps 1e-4: a gradient that is 0 but for rounding (attention's key bias, say) would
    # otherwise take a full step of lr whose sign is the rounding's, which the order of the sum decides
    settings = dict(steps=3, batch_size=8, learning_rate=1e-3, validate_every=3, adam_eps=1e-4)
    torch.multiprocessing.spawn(train_in_process_group, nprocs=2, args=(
        2, str(tmp_path / "init"), str(items), settings, str(tmp_path / "two"), str(tmp_path / "two.pt")))
    one = create_reward_model("tiny-clip", seed=0)
    train, validation = split_items(ranked_images(items), 0.25, 0)
    train_reward_model(one, train, validation, paper_settings("open_clip", **settings), tmp_path / "one")
    two = torch.load(tmp_path / "two.pt")
    before = create_reward_model("tiny-clip", seed=0).state_dict()
    moved = max(float((v - before[k]).abs().max()) for k, v in one.state_dict().items())
    assert moved > 1e-3  # three AdamW steps of lr 1e-3
    for key, value in one.state_dict().items():
        torch.testing.assert_close(two[key], value, rtol=1e-5, atol=1e-6)


def test_early_stopping_keeps_the_best_and_stops_after_patience(tmp_path):
    train, validation = split_items(ranked_images(colour_items(tmp_path / "images", items_per_colour=2)), 0.34, 0)
    settings = paper_settings("open_clip", steps=20, batch_size=8, learning_rate=1e-12, validate_every=2, patience=2)
    result = train_reward_model(create_reward_model("tiny-clip"), train, validation, settings, tmp_path / "run")
    # an update of 1e-12 moves nothing: no validation after step 2's beats it
    assert result.finished and result.state.stopped_early and result.state.step == 6
    assert result.state.best_step == 2 and [h["step"] for h in result.state.history] == [0, 2, 4, 6]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best-000002", "step-000006"]


def test_gradient_checkpointing_changes_nothing_and_bf16_trains(tmp_path):
    from transformers.modeling_layers import GradientCheckpointingLayer

    for name in ("tiny-imagereward", "tiny-pickscore"):  # every transformers block of each tower is checkpointed
        model = create_reward_model(name)
        prepare_for_training(model, paper_settings(model_config(name)["family"], gradient_checkpointing=True))
        blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert len(blocks) == 4 and all(b.gradient_checkpointing for b in blocks)
    train, validation = split_items(ranked_images(colour_items(tmp_path / "images", items_per_colour=2)), 0.34, 0)
    runs = {}
    for label, extra in (("plain", {}), ("checkpointed", {"gradient_checkpointing": True}),
                         ("bf16", {"mixed_precision": "bf16"})):
        model = create_reward_model("tiny-imagereward")  # its dropout too: the recomputation draws the same masks
        result = train_reward_model(model, train, validation, paper_settings("imagereward", **QUICK, **extra),
                                    tmp_path / label)
        runs[label] = (model.state_dict(), result)
    plain, checkpointed, bf16 = (runs[k][0] for k in ("plain", "checkpointed", "bf16"))
    assert all(torch.equal(plain[k], checkpointed[k]) for k in plain)
    assert any(not torch.equal(plain[k], bf16[k]) for k in plain)
    assert all(np.isfinite(h["validation_loss"]) for h in runs["bf16"][1].state.history)


# --- the stage and the command ---------------------------------------------------------------
def test_mistakes_are_one_line_before_any_work(tmp_path, capsys):
    store = colour_store(tmp_path, items_per_colour=2)
    unpixelled = colour_items(tmp_path / "elsewhere", items_per_colour=2)
    ingest_preferences(store, unpixelled, "imagereward", "no-pixels")
    fake = store.reward_models_dir / "taken"
    fake.mkdir(parents=True)
    (fake / "config.json").write_text(json.dumps(model_config("tiny-clip")))
    base = ["--store", str(store.root), "train-reward"]
    cases = [
        (["--base", "nosuch", "--name", "x", "--set", "colours"], "unknown reward model 'nosuch'"),
        (["--base", "tiny-blip2", "--name", "x", "--set", "colours"], "blip2_itm family cannot be trained"),
        (["--base", "tiny-clip", "--name", "x", "--set", "nosuch"], "unknown set(s) nosuch"),
        (["--base", "tiny-clip", "--name", "x", "--set", "no-pixels"], "no training pairs in set(s) no-pixels"),
        (["--base", "tiny-clip", "--name", "taken"], "'taken' is already registered in the store"),
        (["--base", "tiny-clip", "--name", "clip"], "'clip' is a built-in reward model"),
        (["--base", "tiny-clip", "--name", "a b"], "a reward model's name is letters"),
        (["--base", "tiny-clip", "--name", "x", "--fix-rate", "2"], "fix_rate must be in [0, 1]"),
        (["--base", "tiny-clip", "--name", "x", "--batch-size", "10", "--accumulation-steps", "3"],
         "batch_size (10) must be a multiple of accumulation_steps (3)"),
        (["--base", "tiny-clip", "--name", "x", "--text-dropout", "0.1"], "new_head and text_dropout are ImageReward's"),
        (["--base", "tiny-clip", "--name", "x", "--validation-fraction", "1"], "validation_fraction must be between"),
        (["--base", "tiny-clip", "--name", "x", "--learning-rate", "0"], "--learning-rate: must be a finite number"),
    ]
    for arguments, message in cases:
        code = main([*base, *arguments, *([] if "--set" in arguments else ["--set", "colours"])])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, (arguments, err)
    assert not store.reward_training_dir.exists() and store.read("reward_model_cards").num_rows == 0


def test_a_trained_model_is_registered_with_its_card(trained):
    store, result, uri = trained
    assert result.training.finished and result.version.startswith("colour-rm@sha256:")
    card = store.read("reward_model_cards").to_pylist()
    assert [(c["name"], c["version"], c["base"], c["family"], c["sets"]) for c in card] == \
        [("colour-rm", result.version, "tiny-pickscore", "hf_clip", ["colours"])]
    assert card[0]["validation_accuracy"] > 0.9 and card[0]["pairs_train"] + card[0]["pairs_validation"] == \
        result.data["pairs"]
    folder = store.reward_models_dir / "colour-rm"
    config = json.loads((folder / "config.json").read_text())
    assert config["family"] == "hf_clip" and config["trained"]["base"] == "tiny-pickscore"
    assert json.loads((folder / "card.json").read_text())["best_step"] == card[0]["best_step"]
    import mlflow

    mlflow.set_tracking_uri(uri)
    [run] = mlflow.search_runs(experiment_names=["tia2"], filter_string="tags.`tia2.stage` = 'train-reward'",
                               output_format="list")
    assert run.data.metrics["best_validation_accuracy"] == card[0]["validation_accuracy"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)} | \
        {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "model")}
    assert {"curves.png", "model/config.json", "model/model.safetensors", "model/card.json"} <= artifacts
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "validation_accuracy")
    assert [m.step for m in history] == [h["step"] for h in result.training.state.history]


def test_the_registry_builds_trained_models_of_a_store(trained, tmp_path):
    from tia2.config import check_config

    store, result, _ = trained
    assert "colour-rm" in list_models(store) and "colour-rm" not in list_models()
    assert create_reward_model("colour-rm", store=store).version == result.version
    assert create_reward_model("colour-rm", store=store.root, weights="random").version == "random-init:0/scorer-2"
    with pytest.raises(UserError, match="unknown reward model 'colour-rm'"):
        create_reward_model("colour-rm")
    check_config({"store": str(store.root), "reward_models": ["colour-rm"]})
    with pytest.raises(UserError, match="unknown reward model.s. 'colour-rm'"):
        check_config({"store": str(tmp_path / "elsewhere"), "reward_models": ["colour-rm"]})


def test_the_trained_model_scores_through_tia2_score_a_textnorm_spec_and_replace(trained, tmp_path, capsys):
    store = copy_store(trained[0], tmp_path / "store")
    assert main(["--store", str(store.root), "contrast", "--method", "rules"]) == 0
    assert main(["--store", str(store.root), "score", "--reward-model", "colour-rm"]) == 0
    version = trained[1].version
    rows = store.connect().execute("SELECT model_version, count(*) FROM scores GROUP BY ALL").fetchall()
    [(contrasts,)] = store.connect().execute("SELECT count(*) FROM contrast_prompts").fetchall()
    assert rows == [(version, 120 * (1 + contrasts // 3))]  # every image: its caption, its prompt's contrasts
    specs = [parse_spec("colour-rm"), parse_spec("textnorm(colour-rm, tau=1, contrast=rules)"),
             parse_spec("tiny-pickscore")]
    assert main(["--store", str(store.root), "score", "--reward-model", "tiny-pickscore"]) == 0
    result = compute_preference_metrics(store, specs, ["colours"], resamples=10)
    accuracy = {a.reward: a.figures["accuracy"] for a in result.rewards}
    assert accuracy["colour-rm"] > 0.85 and accuracy["textnorm(colour-rm, tau=1, contrast=rules)"] > 0.85
    assert accuracy["tiny-pickscore"] < 0.75  # its base, untrained
    capsys.readouterr()
    # retrained under the same name: another version, and the old one's scores go
    code = main(["--store", str(store.root), "train-reward", "--base", "tiny-pickscore", "--set", "colours",
                 "--name", "colour-rm", "--replace", "--steps", "2", "--batch-size", "8", "--split", "item"])
    out = capsys.readouterr().out
    assert code == 0 and "registered as colour-rm" in out and f"{rows[0][1]} score rows of its old version" in out
    assert store.connect().execute(
        "SELECT count(*) FROM scores WHERE reward_model = 'colour-rm'").fetchall() == [(0,)]


def test_a_short_finetune_maximises_the_trained_reward(trained, tmp_path):
    from tasks.finetune import paper_config, record_finetune

    store = copy_store(trained[0], tmp_path / "store")
    config = paper_config("refl", "textnorm(colour-rm, tau=1, contrast=rules)", steps=2, checkpoint_every=2,
                          denoise_steps=4, refl_start=2, refl_end=3, guidance=1.0, batch_size=2,
                          eval_images_per_prompt=1)
    result = record_finetune(store, "tiny-sd", config, max_prompts=1)
    [checkpoint] = result.checkpoints
    assert checkpoint.step == 2 and np.isfinite(checkpoint.loss) and np.isfinite(checkpoint.mean_reward)
    assert f"colour-rm@{trained[1].version}" in json.loads((result.folder / "config.json").read_text())["reward_models"]


@pytest.mark.slow
@pytest.mark.prefect_server
def test_the_train_reward_flow_trains_scores_and_measures(trained, tmp_path, prefect_api):
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from flows.train_reward import tia2_train_reward

    store = copy_store(trained[0], tmp_path / "store")
    shutil.rmtree(store.reward_models_dir)
    with temporary_settings({PREFECT_API_URL: prefect_api, PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "results"}):
        summary = tia2_train_reward(base="tiny-pickscore", sets=["colours"], name="flow-rm", store=str(store.root),
                                    settings={**LEARN, "steps": 4, "split": "item", "validation_fraction": 0.25})
        APILogWorker.drain_all(timeout=5)  # the run's logs reach the server while it is up
    assert summary["trained"]["name"] == "flow-rm" and summary["scores"]["rows_added"] == 120
    assert set(summary["preference_accuracy"]) == {"colours"}
    assert store.read("preference_metrics").column("reward").to_pylist() == ["flow-rm"] * 30
