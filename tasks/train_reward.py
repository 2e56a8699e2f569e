"""Stage: a reward model trained on people's preferences in the store (ImageReward §2.2; the
mechanics are tia2/reward_training.py), then registered under a name: a reward model like any
other, which `tia2 score`, specs, fine-tuning and the benchmarks build by that name.

Pairs come from the sets asked for, each either
- a preference set (`tia2 ingest-preferences`, or an annotation batch: its rankings, pairs and
  best-worst answers are in `preference_ranks` under the batch's name): an item is one prompt's
  images ranked together, by the file's consensus where the set has one, else by each image's
  mean rank over the item's annotators (`annotator` picks another);
- a set of labelled images (TIA2's labels, and people's ratings from the annotation app): each
  caption's images are an item, every good image (the binary label of the TIA2 protocol, z = 1:
  at least two annotators said good) over every bad one.
Only images with pixels (a file) take part; pairs never cross items. Validation holds out whole
prompts (or items) drawn with the seed, never single pairs.

A run is keyed by its settings, the base model's version and the pairs: re-running the same
command continues from its last checkpoint (`<store>/reward_training/<run>/`). When it is done,
the best checkpoint's weights are registered as `<store>/reward_models/NAME/` (the base's config
with a `trained` section, `model.safetensors`, `card.json`), its card goes to
`reward_model_cards`, and the model is built back through the registry and checked to score as
the trained one did. `--replace` replaces a registered NAME and removes the scores of its old
versions.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from tia2.errors import UserError
from tia2.preference import Items
from tia2.reward_training import (WEIGHTS_FILE, RankedImages, RewardTrainingSettings, TrainingResult, check_settings,
                                  image_rewards, imagereward_statistics, join_torchrun, paper_settings, process_group,
                                  split_items, train_reward_model)
from tia2.store import Store, stable_id

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
SPEC_WORDS = ("textnorm", "mean", "ur")  # a spec's functions: never a model's name
CARD_FILE = "card.json"
CHECKED_IMAGES = 8  # validation images the registered model is checked on


# --- the pairs -------------------------------------------------------------------------------
def training_images(store: Store, sets: list[str], annotator: str | None = None,
                    split: str = "prompt") -> tuple[RankedImages, dict]:
    """The ranked images of `sets` with pixels, grouped by item, and what was found per set.
    `split` says what a group is: a prompt (its text) or an item."""
    from tasks.preferences import default_annotator, preference_frame, preference_sets

    if not sets:
        raise UserError("give at least one --set: a preference set, an annotation batch or a labelled image set")
    ranked = set(preference_sets(store))
    con = store.connect("images", "labels", "prompts")
    labelled = {s for (s,) in con.execute(
        "SELECT DISTINCT i.set FROM images i JOIN labels USING (image_id)").fetchall()}
    unknown = [s for s in sets if s not in ranked | labelled]
    if unknown:
        raise UserError(f"unknown set(s) {', '.join(unknown)}: neither a preference set or annotation batch "
                        f"({', '.join(sorted(ranked)) or 'none'}) nor a set with labels "
                        f"({', '.join(sorted(labelled)) or 'none'})")
    frames, report = [], {}
    for name in dict.fromkeys(sets):
        if name in ranked:
            whose = annotator or default_annotator(store, [name])
            frame = preference_frame(store, [name], whose)[["set", "item", "caption", "image_id", "rank"]]
            report[name] = {"kind": "preferences", "annotator": whose}
        else:
            frame = con.execute(
                """SELECT i.set, i.prompt_id AS item, p.text AS caption, i.image_id, 2.0 - l.z AS rank
                   FROM images i JOIN prompts p USING (prompt_id) JOIN image_labels l USING (image_id)
                   WHERE i.set = ? ORDER BY i.prompt_id, i.ordinal, i.image_id""", [name]).df()
            report[name] = {"kind": "labels (good over bad)"}
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    paths = dict(con.execute("SELECT image_id, path FROM images WHERE path IS NOT NULL").fetchall())
    frame["path"] = frame["image_id"].map(paths)
    with_pixels = frame["path"].map(lambda p: isinstance(p, str) and Path(p).is_file())
    missing = int((~with_pixels).sum())
    frame = frame[with_pixels]
    # an item with one image, or whose images people all tie, makes no pair
    usable = frame.groupby(["set", "item"], sort=False)["rank"].transform("nunique") > 1
    frame = frame[usable].reset_index(drop=True)
    key = frame["set"] + "\0" + frame["item"]
    codes, first = np.unique(key, return_index=True)
    order = np.argsort(first)  # items in the order they come
    item_index = np.argsort(order)[np.searchsorted(codes, key)]
    frame = frame.assign(item_index=item_index).sort_values("item_index", kind="stable")
    heads = frame.drop_duplicates("item_index")
    groups = heads["caption"] if split == "prompt" else heads["set"] + "\0" + heads["item"]
    images = RankedImages(tuple(frame["path"]), tuple(frame["caption"]),
                          Items.from_item_index(frame["item_index"].to_numpy(), frame["rank"].to_numpy(float)),
                          tuple(groups))
    for name in report:
        part = frame[frame["set"] == name]
        report[name] |= {"items": int(part["item"].nunique()), "images": len(part)}
    report = {"sets": report, "images_without_pixels": missing, "pairs": len(images.pairs()[0])}
    if not report["pairs"]:
        raise UserError(f"no training pairs in set(s) {', '.join(sets)}: no item has two images with pixels that "
                        f"people rank differently ({missing} of their images have no file: register them with "
                        f"tia2 import-images or ingest-preferences --images)")
    return images, report


# --- checks ----------------------------------------------------------------------------------
def check_name(store: Store, name: str, replace: bool) -> None:
    """A name the registry and specs can take, and free unless `replace`."""
    from tia2.models import REWARD_MODELS, trained_models

    if not NAME_PATTERN.fullmatch(name) or name in SPEC_WORDS:
        raise UserError(f"--name {name!r}: a reward model's name is letters, digits and _ . + - (first a letter or "
                        f"digit), and not {', '.join(SPEC_WORDS)}")
    if name in REWARD_MODELS.names():
        raise UserError(f"--name {name!r} is a built-in reward model: choose another name")
    if name in trained_models(store) and not replace:
        raise UserError(f"reward model {name!r} is already registered in the store at {store.root}: give --replace "
                        f"to replace it (its old scores are removed), or another --name")


@dataclass
class TrainingPlan:
    config: dict                       # the base's registry config
    settings: RewardTrainingSettings
    train: RankedImages
    validation: RankedImages
    data: dict                         # what training_images found


def plan_training(store: Store, base: str, sets: list[str], name: str, settings: dict | None = None,
                  replace: bool = False, annotator: str | None = None, world: int = 1) -> TrainingPlan:
    """Every argument checked and the pairs read and split: what a run trains on, before any work."""
    from tia2.models import model_config

    check_name(store, name, replace)
    config = model_config(base, store)
    training = paper_settings(config["family"], **(settings or {}))
    check_settings(training, config["family"], world)
    images, data = training_images(store, sets, annotator, training.split)
    train, validation = split_items(images, training.validation_fraction, training.seed)
    if not len(validation.pairs()[0]) or not len(train.pairs()[0]):
        raise UserError(f"the split leaves no pairs to {'validate' if len(train.pairs()[0]) else 'train'} on: "
                        f"give more sets or another validation_fraction")
    return TrainingPlan(config, training, train, validation, data)


# --- the stage -------------------------------------------------------------------------------
@dataclass
class TrainRewardResult:
    name: str
    base: str
    base_version: str
    run: str
    training: TrainingResult
    data: dict                   # what training_images found
    items_train: int
    items_validation: int
    version: str | None = None   # the registered model's, once registered
    scores_removed: int = 0      # the old versions' scores, with --replace
    run_id: str | None = None


def record_train_reward(store: Store, base: str, sets: list[str], name: str, settings: dict | None = None,
                        weights: str = "pretrained", device: str = "cpu", replace: bool = False,
                        annotator: str | None = None, stop_after: int | None = None,
                        parent_run_id: str | None = None) -> TrainRewardResult:
    """Train a reward model from `base` (a registered model: released, a local path through
    `weights`, a tiny twin or one trained before) on the pairs of `sets`, with `settings`
    (training setting names, on top of the base family's reference values), and register it as
    `name`. Every argument is checked before any work; under torchrun each process trains its
    share and process 0 logs, checkpoints and registers. `stop_after` ends this call after that
    many steps (a checkpoint; re-run to continue)."""
    import mlflow

    from tia2.models import create_reward_model
    from tia2.tracking import stage_run

    if stop_after is not None and stop_after < 1:
        raise UserError(f"stop_after must be at least 1 (got {stop_after})")
    device = join_torchrun(device)
    rank, world = process_group()
    plan = plan_training(store, base, sets, name, settings, replace, annotator, world)
    config, training, train, validation, data = plan.config, plan.settings, plan.train, plan.validation, plan.data
    if rank == 0:
        store.check_writable()
    model = create_reward_model(base, weights=weights, seed=training.seed, device=device, store=store)
    run = stable_id("train-reward", json.dumps(training.key(), sort_keys=True), model.version,
                    train.fingerprint(), validation.fingerprint())[:12]
    result = TrainRewardResult(name, base, model.version, run, None, data, train.items.count, validation.items.count)
    params = {"base": base, "base_version": model.version, "name": name, "sets": sets, "annotator": annotator or "auto",
              "items_train": result.items_train, "items_validation": result.items_validation,
              "pairs": data["pairs"], "processes": world, "device": device, "run": run, **training.key()}
    logged = stage_run("train-reward", params, parent_run_id, tags={"tia2.base_model": model.version},
                       label=name) if rank == 0 else contextlib.nullcontext()
    with logged as mlflow_run:
        def on_validation(step: int, entry: dict) -> None:
            mlflow.log_metrics({k: v for k, v in entry.items() if k != "step" and np.isfinite(v)}, step=step)

        result.training = train_reward_model(
            model, train, validation, training, store.reward_training_dir / run, stop_after,
            on_step=(lambda step, metrics: mlflow.log_metrics(
                {f"train_{k}" if k != "learning_rate" else k: v for k, v in metrics.items()}, step=step))
            if rank == 0 else None, on_validation=on_validation if rank == 0 else None)
        if rank == 0 and result.training.finished:
            result.run_id = mlflow_run.info.run_id
            _register(store, result, model, config, sets, training, validation, replace)
            _log_registration(result, store)
    return result


def _register(store: Store, result: TrainRewardResult, model, base_config: dict, sets: list[str],
              settings: RewardTrainingSettings, validation: RankedImages, replace: bool) -> None:
    """The best weights (loaded in `model`) as reward model `result.name` in the store, its card
    in `reward_model_cards`, then built back through the registry and checked."""
    from safetensors.torch import save_model

    from tia2.models import TRAINED_CONFIG, create_reward_model
    from tia2.models.base import weights_identity

    config = {**base_config, "weights": None,
              "description": f"{result.name}: {base_config.get('family')} reward model trained from {result.base} "
                             f"on {', '.join(sets)} (tia2 train-reward, run {result.run})",
              "trained": {"base": result.base, "base_version": result.base_version, "run": result.run}}
    rewards = image_rewards(model, validation, settings)
    if base_config["family"] == "imagereward":
        config["score"] = imagereward_statistics(model, rewards)
        model.reward_mean, model.reward_std = config["score"]["mean"], config["score"]["std"]
    folder = store.reward_models_dir
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{result.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    state = result.training.state
    try:
        (tmp / TRAINED_CONFIG).write_text(json.dumps(config, indent=2))
        save_model(model, str(tmp / WEIGHTS_FILE))
        shutil.copymode(tmp / TRAINED_CONFIG, tmp / WEIGHTS_FILE)  # safetensors writes 0600: others read a shared store
        result.version = f"{weights_identity(result.name, tmp / WEIGHTS_FILE)}/scorer-{model.scorer_revision}"
        card = dict(name=result.name, version=result.version, family=base_config["family"], base=result.base,
                    base_version=result.base_version, sets=list(sets), items_train=result.items_train,
                    items_validation=result.items_validation, pairs_train=result.training.train_pairs,
                    pairs_validation=result.training.validation_pairs, steps=state.step, best_step=state.best_step,
                    validation_accuracy=state.best[0], untrained_validation_accuracy=result.training.untrained_accuracy,
                    settings=json.dumps(settings.key(), sort_keys=True), run=result.run, run_id=result.run_id)
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2))
        target = folder / result.name
        old = folder / f".{result.name}.{uuid.uuid4().hex}.old"
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    store.upsert("reward_model_cards", pa.Table.from_pylist([{**card, "created_at": datetime.now(timezone.utc)}]))
    if replace:
        result.scores_removed = store.delete_rows(
            "scores", "reward_model = $name AND model_version <> $version",
            {"name": result.name, "version": result.version})
    built = create_reward_model(result.name, device=str(next(model.parameters()).device), store=store)
    check = validation.subset(np.arange(min(CHECKED_IMAGES, validation.items.count)))
    again = image_rewards(built, check, settings)
    if built.version != result.version or not np.allclose(again, rewards[:len(again)], rtol=1e-5, atol=1e-6):
        raise RuntimeError(f"{result.name}: the registered model does not score as the trained one "
                           f"({again[:3]} against {rewards[:3]})")


def _log_registration(result: TrainRewardResult, store: Store) -> None:
    """The card, the curves and the registered model's files in the stage's MLflow run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    from tia2.tracking import log_figure

    state = result.training.state
    mlflow.log_metrics({"untrained_validation_accuracy": result.training.untrained_accuracy,
                        "best_validation_accuracy": state.best[0], "best_step": state.best_step,
                        "pairs_per_second": result.training.pairs_per_second})
    mlflow.set_tags({"tia2.reward_model": result.name, "tia2.model_version": result.version})
    mlflow.log_artifacts(str(store.reward_models_dir / result.name), "model")
    steps = [h["step"] for h in state.history]
    fig, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    loss_axis.plot(steps[1:], [h["train_loss"] for h in state.history[1:]], label="training")
    loss_axis.plot(steps, [h["validation_loss"] for h in state.history], label="validation")
    loss_axis.set(title="loss, −log σ(f(better) − f(worse))", xlabel="step")
    loss_axis.legend()
    accuracy_axis.plot(steps, [h["validation_accuracy"] for h in state.history], marker="o")
    accuracy_axis.axvline(state.best_step, color="grey", linestyle=":", label=f"best, step {state.best_step}")
    accuracy_axis.set(title="validation preference accuracy", xlabel="step")
    accuracy_axis.legend()
    fig.tight_layout()
    log_figure(fig, "curves.png")
