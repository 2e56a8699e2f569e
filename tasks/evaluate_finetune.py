"""Stage: fine-tuned adapters against their base model on held-out prompts (`tia2 evaluate`).

The base model and every adapter (a LoRA checkpoint of `tasks/finetune.py`) make images of the
held-out prompts: the prompts of the given sets that the adapters were not trained on (their run
folder's config.json lists the training prompts). Image i of prompt p is seeded from (p, i, seed)
whatever the adapter, so image i of an adapter and image i of the base are a matched pair. Images
and scores are cached in the store: a re-run makes and scores only what is missing.

Per reward spec and adapter, the pairs the adapter's image wins (value above the base image's by
more than `tol`), ties and loses, with both means, go to `finetune_evaluation` (TextNorm paper §5.1
counts wins against the base model). Over-optimisation, after Gao et al. 2023: the proxy reward
(the spec the adapters were trained on) and a gold reward (another spec, or people) over training
steps, and over best-of-n's n on the base model's images, plotted against sqrt(KL) with
best-of-n's analytic KL = log n - (n - 1)/n.

The gold "human" is people's judgement: the labels' graded value of each image where every
evaluated image has labels (the TIA2 protocol's), else a pairwise annotation batch of the base
image against each adapter's image of the same prompt and seed (TextNorm §5.4,
tasks/human_evaluation.py). Its answered pairs give the "human" rows (the majority verdict per
pair; n = the answered pairs) and the gold of the steps curve: the adapter's win share against the
base, a tie one half (0.5 at step 0, the base against itself); the best-of-n curve has no such gold.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from tasks.human_evaluation import HumanEvaluation, describe, evaluation_verdicts
from tasks.rewards import RewardEvaluator
from tia2.errors import UserError
from tia2.models.diffusion import ADAPTER_FILE
from tia2.specs import Model, Spec, TextNorm, parse_spec, scores_needed
from tia2.store import Store, stable_id

HUMAN = "human"  # the gold reward read from the labels table instead of a reward model
BASE = "base"


@dataclass(frozen=True)
class Adapter:
    path: Path            # the adapter file (pytorch_lora_weights.safetensors)
    lora: str             # its identity, as images.lora records it
    run: str | None       # the fine-tuning run whose checkpoint it is (finetune_checkpoints)
    step: int | None      # its training step, when known
    training: dict | None  # the run folder's config.json: generator, reward, training prompts
    label: str


@dataclass
class FinetuneEvaluation:
    evaluation: str                    # key of the setting in finetune_evaluation
    generator: str                     # name@identity of the base model
    prompts: list[tuple[str, str, str]]  # held-out (prompt_id, text, set)
    adapters: list[Adapter]
    proxy: str
    gold: str
    frame: pd.DataFrame                # every image (base first, then each adapter) with each reward's value
    win_tie_loss: pd.DataFrame         # a row per (adapter, reward)
    steps_curve: pd.DataFrame          # proxy and gold means at step 0 (base) and each checkpoint
    best_of_n_curve: pd.DataFrame      # proxy and gold means of the base model's best-of-n picks
    images_made: int
    rows_scored: int
    human: HumanEvaluation | None = None  # the pairwise batch of the gold "human", where it is one


def best_of_n_kl(n: int) -> float:
    """KL of best-of-n sampling to the base distribution (Stiennon et al. 2020; Gao et al. 2023)."""
    return math.log(n) - (n - 1) / n


def win_tie_loss(adapter: np.ndarray, base: np.ndarray, tol: float) -> tuple[int, int, int]:
    """Matched pairs the adapter wins (above base + tol), ties and loses (below base - tol)."""
    wins, losses = int((adapter > base + tol).sum()), int((adapter < base - tol).sum())
    return wins, len(adapter) - wins - losses, losses


# --- what is evaluated -------------------------------------------------------------------------
def resolve_adapters(store: Store, run: str | None = None, paths=()) -> list[Adapter]:
    """A fine-tuning run's checkpoints (ordered by step), then adapters given as files or folders."""
    from tia2.models.base import weights_identity

    con = store.connect()
    files = []
    if run is not None:
        rows = con.execute("SELECT path FROM finetune_checkpoints WHERE run = ? ORDER BY step", [run]).fetchall()
        if not rows:
            runs = con.execute("SELECT DISTINCT run, algo FROM finetune_checkpoints ORDER BY 1").fetchall()
            raise UserError(f"no fine-tuning run {run!r} in the store (runs: "
                            f"{', '.join(f'{r} ({a})' for r, a in runs) or 'none'})")
        files += [Path(p) for (p,) in rows]
    for path in paths:
        path = Path(path).expanduser().resolve()
        files.append(path / ADAPTER_FILE if path.is_dir() else path)
    files = list(dict.fromkeys(files))
    for file in files:
        if not file.is_file():
            raise UserError(f"no LoRA adapter at {file} (give {ADAPTER_FILE} or its folder)")
    recorded = {Path(p): (r, s) for p, r, s in con.execute(
        "SELECT path, run, step FROM finetune_checkpoints WHERE path IN (SELECT unnest(?))",
        [[str(f) for f in files]]).fetchall()}
    runs_and_steps = [recorded.get(f) or (None, _folder_step(f)) for f in files]
    labels = [f"step {step}" if step is not None else f.parent.name for f, (_, step) in zip(files, runs_and_steps)]
    if len(set(labels)) < len(labels):  # checkpoints of several runs: the run folder's name in front
        labels = [f"{f.parent.parent.name}/{label}" for f, label in zip(files, labels)]
    if len(set(labels)) < len(labels):
        labels = [str(f) for f in files]
    adapters = []
    for file, (run_key, step), label in zip(files, runs_and_steps, labels):
        config = file.parent.parent / "config.json"
        training = json.loads(config.read_text()) if config.is_file() else None
        adapters.append(Adapter(file, weights_identity(file.name, file), run_key, step, training, label))
    return adapters


def _folder_step(file: Path) -> int | None:
    """The step of a checkpoint not in this store's table (an MLflow download), from its step-N folder."""
    named = re.fullmatch(r"step-(\d+)", file.parent.name)
    return int(named.group(1)) if named else None


def heldout_prompts(store: Store, sets: list[str] | None, max_prompts: int | None,
                    training_ids: set[str]) -> list[tuple[str, str, str]]:
    """(prompt_id, text, set) of the given sets that are not training prompts, the first
    `max_prompts` of each set."""
    from tasks.generate import prompts_to_generate

    candidates = prompts_to_generate(store, sets)
    kept, per_set = [], {}
    for prompt in candidates:
        if prompt[0] not in training_ids and per_set.get(prompt[2], 0) < (max_prompts or len(candidates)):
            kept.append(prompt)
            per_set[prompt[2]] = per_set.get(prompt[2], 0) + 1
    if not kept:
        where = f"set(s) {', '.join(sets)}" if sets else "the store"
        raise UserError(f"no held-out prompts: all {len(candidates)} prompts of {where} are training prompts "
                        f"of the adapters (give other sets with --set)")
    return kept


def reward_specs(proxy: str, gold: str, rewards=()) -> dict[str, Spec | None]:
    """The specs evaluated, by canonical name: the proxy, the reward models it combines, the gold
    (None for the human labels) and any others asked for."""
    proxy_spec = parse_spec(proxy)
    specs: dict[str, Spec | None] = {str(proxy_spec): proxy_spec}
    if not isinstance(proxy_spec, Model):
        specs.update({str(m): m for m in sorted(proxy_spec.models(), key=str)})
    gold_spec = None if gold == HUMAN else parse_spec(gold)
    if gold_spec is not None and str(gold_spec) == str(proxy_spec):
        raise UserError(f"the gold reward must differ from the proxy ({proxy_spec})")
    specs[HUMAN if gold_spec is None else str(gold_spec)] = gold_spec
    for text in rewards:
        spec = parse_spec(text)
        specs.setdefault(str(spec), spec)
    return specs


def _trained_reward(adapters: list[Adapter]) -> str:
    rewards = sorted({a.training["reward"] for a in adapters if a.training})
    if len(rewards) != 1:
        raise UserError("give the proxy reward (--proxy): " + (
            f"the adapters were trained on different rewards ({'; '.join(rewards)})" if rewards
            else "the adapters' folders have no fine-tuning config.json naming it"))
    return rewards[0]


def _check_contrast_prompts(store: Store, specs: list[Spec], prompts) -> None:
    """TextNorm specs need contrast prompts of their method for every held-out prompt: checked
    before any image is made."""
    methods = sorted({m for needed in scores_needed(specs).values() for m in needed if m is not None})
    con = store.connect()
    for method in methods:
        covered = {pid for (pid,) in con.execute(
            "SELECT DISTINCT prompt_id FROM contrast_prompts WHERE method = ? AND prompt_id IN (SELECT unnest(?))",
            [method, [p for p, _, _ in prompts]]).fetchall()}
        lacking = [text for pid, text, _ in prompts if pid not in covered]
        if lacking:
            raise UserError(f"{len(lacking)} of {len(prompts)} held-out prompts have no contrast prompts of method "
                            f"{method!r} (e.g. {lacking[0]!r}): TextNorm needs them (tia2 contrast --method rules, "
                            f"then textnorm(..., contrast=rules))")


def _pinned(spec: Spec, versions: dict[str, str]) -> Spec:
    """The spec with every reward model at the version scored here (other versions may be stored)."""
    if isinstance(spec, Model):
        return Model(spec.name, spec.version_among([versions[spec.name]], built=True))
    if isinstance(spec, TextNorm):
        return replace(spec, inner=_pinned(spec.inner, versions))
    return replace(spec, parts=tuple(_pinned(p, versions) for p in spec.parts))


# --- images and scores -------------------------------------------------------------------------
def _image_frame(generator, adapters: list[Adapter], prompts, images_per_prompt: int, denoise_steps: int,
                 guidance: float, seed: int) -> pd.DataFrame:
    """The images the evaluation needs, base first then each adapter, each block in the same
    (prompt, ordinal) order: row k of one block and of another are a matched pair."""
    from tasks.generate import image_id

    rows = [dict(variant=variant, adapter=str(path), lora=lora, step=step, set=set_name, prompt_id=pid,
                 caption=text, ordinal=i,
                 image_id=image_id(pid, generator.identity, lora, i, seed, denoise_steps, guidance))
            for variant, path, lora, step in [(BASE, "", None, 0),
                                              *((a.label, a.path, a.lora, a.step) for a in adapters)]
            for pid, text, set_name in prompts for i in range(images_per_prompt)]
    frame = pd.DataFrame(rows).astype({"step": "Int64"})
    frame.index.name = "row"
    return frame


def _make_images(store: Store, generator, adapters: list[Adapter], frame: pd.DataFrame, images_per_prompt: int,
                 denoise_steps: int, guidance: float, seed: int, batch_size: int | None) -> int:
    """Generate the frame's missing images, loading each adapter only when it has some to make."""
    from tasks.generate import generate_images
    from tia2.models.diffusion import apply_lora

    existing = set(store.read("images").column("image_id").to_pylist())
    made = 0
    for adapter in [None, *adapters]:
        block = frame[frame["variant"] == (adapter.label if adapter else BASE)]
        if block["image_id"].isin(existing).all():
            continue
        if adapter:
            from diffusers.utils import logging as diffusers_logging

            verbosity = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()  # its note that the (UNet-only) adapter has no text-encoder keys
            try:
                apply_lora(generator, adapter.path)
            finally:
                diffusers_logging.set_verbosity(verbosity)
        try:
            prompts = list(block[["prompt_id", "caption", "set"]].drop_duplicates().itertuples(index=False, name=None))
            made += generate_images(store, generator, images_per_prompt=images_per_prompt, steps=denoise_steps,
                                    guidance=guidance, base_seed=seed, batch_size=batch_size, prompts=prompts,
                                    label=adapter.label if adapter else BASE).images
        finally:
            if adapter:
                generator.pipeline.unload_lora_weights()
                generator.lora = None
    return made


def _score(store: Store, names: list[str], sets: list[str], weights: str, device: str,
           batch_size: int) -> tuple[dict[str, str], int]:
    """Score the sets' missing (image, text) pairs with each reward model; their versions."""
    from tasks.score import score_images
    from tia2.models import create_reward_model

    versions, added = {}, 0
    for name in names:
        model = create_reward_model(name, weights=weights, device=device, store=store)
        versions[name] = model.version
        added += score_images(store, model, sets, batch_size).rows_added
        del model
    return versions, added


def _graded_labels(store: Store, frame: pd.DataFrame) -> np.ndarray | None:
    """Each image's graded human label (the store's `image_labels`: the TIA2 protocol's); None
    when some image has none."""
    con = store.connect()
    con.register("frame", frame.reset_index()[["row", "image_id"]])
    graded = con.execute(
        "SELECT l.graded FROM frame f LEFT JOIN image_labels l USING (image_id) ORDER BY f.row").df()
    values = graded.iloc[:, 0].to_numpy(dtype=float)
    return None if np.isnan(values).any() else values


def _people_verdicts(store: Store, frame: pd.DataFrame, key: str, seed: int) -> tuple[np.ndarray, HumanEvaluation]:
    """The evaluation's pairwise batch (made once: the base image against each adapter's image
    of the same prompt and seed) and, per image, people's verdict on its pair from the adapter's
    side: 1 won, 0.5 tie, 0 lost; NaN for the base's images and for pairs nobody answered."""
    base = frame[frame["variant"] == BASE]
    adapters = frame[frame["variant"] != BASE]
    bases = np.tile(base["image_id"].to_numpy(), len(adapters) // len(base))  # the matched pair of each row
    verdicts, status = evaluation_verdicts(store, key, list(zip(adapters["prompt_id"], bases, adapters["image_id"])),
                                           sorted(set(frame["set"])), seed)
    return frame["image_id"].map(verdicts).where(frame["variant"] != BASE).to_numpy(dtype=float), status


# --- the evaluation ----------------------------------------------------------------------------
def evaluate_finetune(store: Store, model: str, gold: str, run: str | None = None, adapters=(),
                      sets: list[str] | None = None, max_prompts: int | None = None, images_per_prompt: int = 4,
                      denoise_steps: int = 50, guidance: float = 7.5, seed: int = 0, proxy: str | None = None,
                      rewards=(), tol: float = 1e-6, weights: str = "pretrained", reward_weights: str = "pretrained",
                      device: str = "cpu", batch_size: int | None = None,
                      score_batch_size: int = 32) -> FinetuneEvaluation:
    """Evaluate a fine-tuning run's checkpoints (`run`) and/or adapter files or folders
    (`adapters`) against the base `model` on held-out prompts of `sets`. `proxy` defaults to the
    reward the adapters were trained on; `gold` is a reward spec or "human" (the labels table).
    `tol` absorbs the rounding of equal pixels scored in different batches."""
    from tia2.models import model_config
    from tia2.models.diffusion import create_pipeline

    if images_per_prompt < 1 or denoise_steps < 1 or (max_prompts is not None and max_prompts < 1):
        raise UserError("--images-per-prompt, --steps and --max-prompts must be at least 1")
    if tol < 0:
        raise UserError(f"--tol must be >= 0 (got {tol})")
    resolved = resolve_adapters(store, run, adapters)
    if not resolved:
        raise UserError("nothing to evaluate: give a fine-tuning run (--run) or adapters (--adapter)")
    proxy = str(parse_spec(proxy or _trained_reward(resolved)))
    specs = reward_specs(proxy, gold, rewards)
    training_ids = {pid for a in resolved if a.training for pid, _ in a.training["prompts"]}
    prompts = heldout_prompts(store, sets, max_prompts, training_ids)
    model_specs = [s for s in specs.values() if s is not None]
    _check_contrast_prompts(store, model_specs, prompts)
    names = sorted({m.name for s in model_specs for m in s.models()})
    for name in names:
        model_config(name, store)  # an unknown name fails here, before any image is made
    generator = create_pipeline(model, weights=weights, device=device)
    identity = f"{generator.name}@{generator.identity}"
    for a in resolved:
        if a.training and a.training["generator"] != identity:
            raise UserError(f"{a.path} was trained on {a.training['generator']}, not on {identity} "
                            f"(give its --model and --weights)")
    frame = _image_frame(generator, resolved, prompts, images_per_prompt, denoise_steps, guidance, seed)
    made = _make_images(store, generator, resolved, frame, images_per_prompt, denoise_steps, guidance, seed,
                        batch_size)
    del generator
    versions, scored = _score(store, names, sorted({s for _, _, s in prompts}), reward_weights, device,
                              score_batch_size)
    paths = dict(store.connect().execute("SELECT image_id, path FROM images WHERE image_id IN (SELECT unnest(?))",
                                         [frame["image_id"].tolist()]).fetchall())
    frame["path"] = frame["image_id"].map(paths)
    evaluator = RewardEvaluator(store, frame)
    pinned = {name: _pinned(spec, versions) for name, spec in specs.items() if spec is not None}
    evaluator.check(list(pinned.values()))
    key = stable_id("finetune-evaluation", identity, *(p for p, _, _ in prompts), str(images_per_prompt),
                    str(denoise_steps), repr(float(guidance)), str(seed), repr(float(tol)))
    people = None  # the pairwise batch, where the images lack labels
    for name in specs:
        if name != HUMAN:
            frame[name] = evaluator(pinned[name])
        elif (graded := _graded_labels(store, frame)) is not None:
            frame[name] = graded
        else:
            frame[name], people = _people_verdicts(store, frame, key, seed)
    gold_name = HUMAN if gold == HUMAN else str(parse_spec(gold))
    return FinetuneEvaluation(
        key, identity, prompts, resolved, proxy, gold_name, frame,
        _win_tie_loss(frame, resolved, list(specs), tol, people is not None),
        _steps_curve(frame, resolved, proxy, gold_name, people is not None),
        _best_of_n_curve(frame, len(prompts), images_per_prompt, proxy, gold_name), made, scored, people)


def _blocks(frame: pd.DataFrame, column: str, variants: int) -> np.ndarray:
    """A reward's values as [variant, pair]: row 0 the base, then each adapter."""
    return frame[column].to_numpy(dtype=float).reshape(variants, -1)


def _row(adapter: Adapter, reward: str, wins: int, ties: int, losses: int, mean: float, base_mean: float) -> dict:
    return dict(adapter=adapter.label, path=str(adapter.path), lora=adapter.lora, run=adapter.run, step=adapter.step,
                reward=reward, wins=wins, ties=ties, losses=losses, n=wins + ties + losses, mean_reward=mean,
                base_mean_reward=base_mean)


def _win_tie_loss(frame, adapters: list[Adapter], rewards: list[str], tol: float,
                  people_verdicts: bool = False) -> pd.DataFrame:
    """A row per reward and adapter; with `people_verdicts` the "human" column holds people's
    verdicts (_people_verdicts), counted over the answered pairs."""
    rows = []
    for reward in rewards:
        values = _blocks(frame, reward, 1 + len(adapters))
        for adapter, mine in zip(adapters, values[1:]):
            if reward == HUMAN and people_verdicts:
                rows += _people_row(adapter, mine)
            else:
                rows.append(_row(adapter, reward, *win_tie_loss(mine, values[0], tol), float(mine.mean()),
                                 float(values[0].mean())))
    return pd.DataFrame(rows).astype({"step": "Int64"})


def _people_row(adapter: Adapter, verdicts: np.ndarray) -> list[dict]:
    """People's wins, ties and losses of an adapter over its answered pairs (none: no row); the
    means are the win shares, a tie one half: the adapter's and the base's."""
    answered = verdicts[~np.isnan(verdicts)]
    if not len(answered):
        return []
    share = float(answered.mean())
    return [_row(adapter, HUMAN, int((answered == 1).sum()), int((answered == 0.5).sum()), int((answered == 0).sum()),
                 share, 1 - share)]


def _steps_curve(frame, adapters: list[Adapter], proxy: str, gold: str, win_shares: bool = False) -> pd.DataFrame:
    """Step 0 (the base model) and every adapter whose training step is known. With
    `win_shares` the gold is people's verdicts: their mean over the answered pairs (NaN where
    none), 0.5 for the base."""
    proxy_means = _blocks(frame, proxy, 1 + len(adapters)).mean(axis=1)
    if win_shares:
        verdicts = _blocks(frame, gold, 1 + len(adapters))
        answered = (~np.isnan(verdicts)).sum(axis=1)
        gold_means = np.where(answered > 0, np.nansum(verdicts, axis=1) / np.maximum(answered, 1), np.nan)
        gold_means[0] = 0.5
    else:
        gold_means = _blocks(frame, gold, 1 + len(adapters)).mean(axis=1)
    rows = [dict(run="", step=0, adapter=BASE, proxy=proxy_means[0], gold=gold_means[0])]  # the base: no run
    rows += [dict(run=a.run, step=a.step, adapter=a.label, proxy=proxy_means[k], gold=gold_means[k])
             for k, a in enumerate(adapters, start=1) if a.step is not None]
    return pd.DataFrame(rows)


def _best_of_n_curve(frame, prompts: int, images_per_prompt: int, proxy: str, gold: str) -> pd.DataFrame:
    """Per prompt the base model's image with the highest proxy among its first n (the lowest
    ordinal on ties), for n = 1, 2, 4, ... and images_per_prompt; the picks' mean proxy and gold."""
    base = frame[frame["variant"] == BASE]
    proxy_values, gold_values = (base[c].to_numpy(dtype=float).reshape(prompts, images_per_prompt)
                                 for c in (proxy, gold))
    ns = sorted({2 ** k for k in range(int(math.log2(images_per_prompt)) + 1)} | {images_per_prompt})
    rows = []
    for n in ns:
        pick = proxy_values[:, :n].argmax(axis=1)
        picked = np.arange(prompts), pick
        rows.append(dict(n=n, kl=best_of_n_kl(n), sqrt_kl=math.sqrt(best_of_n_kl(n)),
                         proxy=float(proxy_values[picked].mean()), gold=float(gold_values[picked].mean())))
    return pd.DataFrame(rows)


# --- figures -------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _proxy_gold_axes(plt, title: str, xlabel: str, proxy: str, gold: str):
    """One axis per reward, since their scales differ: proxy on the left, gold on the right."""
    fig, ax = plt.subplots(figsize=(7, 4.4))
    gold_ax = ax.twinx()
    ax.set(title=title, xlabel=xlabel)
    ax.set_ylabel(f"proxy: {proxy}", color="C0")
    gold_ax.set_ylabel(f"gold: {gold}", color="C1")
    return fig, ax, gold_ax


def steps_figure(curve: pd.DataFrame, proxy: str, gold: str):
    """Proxy and gold means over fine-tuning steps (a FinetuneEvaluation's steps_curve)."""
    plt = _pyplot()
    fig, ax, gold_ax = _proxy_gold_axes(plt, "over-optimisation over fine-tuning steps", "fine-tuning step",
                                        proxy, gold)
    base = curve[curve["adapter"] == BASE]
    for marker, (run, part) in zip("osD^v<>", curve[curve["adapter"] != BASE].groupby("run", dropna=False, sort=False)):
        line = pd.concat([base, part]).sort_values("step")
        ax.plot(line["step"], line["proxy"], f"{marker}-", color="C0", label=f"proxy {run or ''}".strip())
        gold_ax.plot(line["step"], line["gold"], f"{marker}--", color="C1", label=f"gold {run or ''}".strip())
    if len(curve) == 1:  # no adapter with a known step: the base model alone
        ax.plot(base["step"], base["proxy"], "o", color="C0")
        gold_ax.plot(base["step"], base["gold"], "o", color="C1")
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return fig


def best_of_n_figure(curve: pd.DataFrame, proxy: str, gold: str):
    """Proxy and gold means of the base model's best-of-n picks (a FinetuneEvaluation's best_of_n_curve)."""
    plt = _pyplot()
    fig, ax, gold_ax = _proxy_gold_axes(plt, "over-optimisation under best-of-n (base model)",
                                        "sqrt(KL), KL = log n - (n - 1)/n", proxy, gold)
    ax.plot(curve["sqrt_kl"], curve["proxy"], "o-", color="C0")
    gold_ax.plot(curve["sqrt_kl"], curve["gold"], "s--", color="C1")
    for row in curve.itertuples():
        ax.annotate(f"n={row.n}", (row.sqrt_kl, row.proxy), textcoords="offset points", xytext=(4, 4), fontsize=8)
    fig.tight_layout()
    return fig


def win_tie_loss_figure(table: pd.DataFrame):
    """A panel per reward spec of a FinetuneEvaluation's win_tie_loss: a bar per adapter, its
    pairs' share of wins, ties and losses."""
    plt = _pyplot()
    rewards = list(dict.fromkeys(table["reward"]))
    adapters = table["adapter"].nunique()
    fig, axes = plt.subplots(len(rewards), 1, figsize=(8, 0.6 + (0.9 + 0.35 * adapters) * len(rewards)),
                             squeeze=False)
    for ax, reward in zip(axes[:, 0], rewards):
        part = table[table["reward"] == reward]
        left = np.zeros(len(part))
        for column, color in (("wins", "tab:green"), ("ties", "tab:gray"), ("losses", "tab:red")):
            share = (part[column] / part["n"]).to_numpy()
            ax.barh(part["adapter"], share, left=left, color=color, label=column)
            left += share
        ax.set(title=reward, xlim=(0, 1))
        ax.invert_yaxis()
    axes[0, 0].legend(loc="lower right", fontsize=8, ncols=3)
    axes[-1, 0].set_xlabel("share of matched pairs (same prompt and seed) against the base model")
    fig.tight_layout()
    return fig


def comparison_grid(result: FinetuneEvaluation, prompt_ids: list[str], ordinal: int = 0, tile: int = 128):
    """The TextNorm paper's Figure 5 layout: a row per prompt, captioned, a column per model (the
    base, then each adapter), every image of a row from the same seed (image `ordinal`)."""
    from PIL import Image, ImageDraw

    frame = result.frame[(result.frame["ordinal"] == ordinal) & result.frame["prompt_id"].isin(prompt_ids)]
    variants = list(dict.fromkeys(frame["variant"]))
    captions = dict(zip(frame["prompt_id"], frame["caption"]))
    label, header = 18, 20
    grid = Image.new("RGB", (tile * len(variants), header + (tile + label) * len(prompt_ids)), "white")
    draw = ImageDraw.Draw(grid)
    for c, variant in enumerate(variants):
        draw.text((c * tile + 4, 4), variant, fill="black")
    for r, prompt_id in enumerate(prompt_ids):
        top = header + r * (tile + label)
        draw.text((4, top + 3), captions[prompt_id][:tile * len(variants) // 6], fill="black")
        for c, variant in enumerate(variants):
            path = frame[(frame["prompt_id"] == prompt_id) & (frame["variant"] == variant)]["path"].iloc[0]
            with Image.open(path) as image:
                grid.paste(image.convert("RGB").resize((tile, tile)), (c * tile, top + label))
    return grid


# --- the stage, with its MLflow run ------------------------------------------------------------
def record_evaluate_finetune(store: Store, model: str, gold: str, run: str | None = None, adapters=(),
                             sets: list[str] | None = None, max_prompts: int | None = None,
                             images_per_prompt: int = 4, denoise_steps: int = 50, guidance: float = 7.5,
                             seed: int = 0, proxy: str | None = None, rewards=(), tol: float = 1e-6,
                             weights: str = "pretrained", reward_weights: str = "pretrained", device: str = "cpu",
                             batch_size: int | None = None, grid_prompts: int = 8,
                             parent_run_id: str | None = None) -> FinetuneEvaluation:
    """`evaluate_finetune`, its rows stored in `finetune_evaluation`, and an MLflow run with the
    curves and tables (CSV), their plots, per-step metrics and comparison grids (grids/, up to
    `grid_prompts` prompts each); inside a Prefect run also a table and a markdown artifact."""
    import mlflow

    from tia2.tracking import log_figure, log_text_files, metric_key, stage_run

    params = {"model": model, "weights": weights, "run": run, "adapters": [str(a) for a in adapters],
              "sets": sets or "all", "max_prompts": max_prompts, "images_per_prompt": images_per_prompt,
              "denoise_steps": denoise_steps, "guidance": guidance, "seed": seed, "gold": gold,
              "extra_rewards": list(rewards), "tol": tol, "reward_weights": reward_weights, "device": device}
    with stage_run("evaluate", params, parent_run_id, tags={"tia2.evaluates": run or "adapters"},
                   label=f"run {run}" if run else "adapters") as mlflow_run:
        result = evaluate_finetune(store, model, gold, run, adapters, sets, max_prompts, images_per_prompt,
                                   denoise_steps, guidance, seed, proxy, rewards, tol, weights, reward_weights,
                                   device, batch_size)
        if result.human:
            mlflow.log_params({"human_batch": result.human.batch, "human_pairs": result.human.pairs})
            mlflow.log_metrics({"human_pairs_answered": result.human.answered, "human_answers": result.human.answers})
        mlflow.log_params({"generator": result.generator, "proxy": result.proxy, "evaluation": result.evaluation,
                           "heldout_prompts": len(result.prompts), "rewards": ", ".join(result.win_tie_loss["reward"]
                                                                                        .unique())})
        now = datetime.now(timezone.utc)
        rows = result.win_tie_loss.drop(columns=["adapter"]).rename(columns={"path": "adapter"}).assign(
            evaluation=result.evaluation, generator=result.generator, prompts=len(result.prompts),
            images_per_prompt=images_per_prompt, denoise_steps=denoise_steps, guidance=float(guidance), seed=seed,
            tol=float(tol), run_id=mlflow_run.info.run_id, evaluated_at=now)
        store.upsert("finetune_evaluation", pa.Table.from_pandas(rows, preserve_index=False))
        mlflow.log_metrics({"images_made": result.images_made, "rows_scored": result.rows_scored})
        for row in result.win_tie_loss.dropna(subset=["step"]).itertuples():
            mlflow.log_metrics({metric_key("mean_reward", row.reward): row.mean_reward,
                                metric_key("win_rate", row.reward): row.wins / row.n,
                                metric_key("loss_rate", row.reward): row.losses / row.n}, step=int(row.step))
        for reward, base_mean in result.win_tie_loss.groupby("reward", sort=False)["base_mean_reward"].first().items():
            mlflow.log_metric(metric_key("mean_reward", reward), base_mean, step=0)
        for row in result.best_of_n_curve.itertuples():
            mlflow.log_metrics({"best_of_n/proxy": row.proxy}
                               | ({} if math.isnan(row.gold) else {"best_of_n/gold": row.gold}), step=row.n)
        log_text_files({"win_tie_loss.csv": result.win_tie_loss.to_csv(index=False),
                        "curves/steps.csv": result.steps_curve.to_csv(index=False),
                        "curves/best_of_n.csv": result.best_of_n_curve.to_csv(index=False),
                        "images.csv": result.frame.to_csv(index=False)})
        gold = f"{HUMAN}, win share against the base (tie 1/2)" if result.human else result.gold
        plots = {"plots/overoptimization_steps.png": steps_figure(result.steps_curve, result.proxy, gold),
                 "plots/overoptimization_best_of_n.png": best_of_n_figure(result.best_of_n_curve, result.proxy,
                                                                          result.gold),
                 "plots/win_tie_loss.png": win_tie_loss_figure(result.win_tie_loss)}
        for name, figure in plots.items():
            log_figure(figure, name)
        prompt_ids = [p for p, _, _ in result.prompts]
        for first in range(0, len(prompt_ids), grid_prompts):
            mlflow.log_image(comparison_grid(result, prompt_ids[first:first + grid_prompts]),
                             f"grids/heldout_{first // grid_prompts + 1:02d}.png")
        _post_prefect_artifacts(result, mlflow_run.info.run_id, list(plots))
    return result


def wins_table(win_tie_loss: pd.DataFrame) -> pd.DataFrame:
    """A FinetuneEvaluation's win_tie_loss as text "wins/ties/losses", a row per reward spec and a
    column per adapter."""
    table = win_tie_loss.assign(
        result=lambda t: t["wins"].astype(str) + "/" + t["ties"].astype(str) + "/" + t["losses"].astype(str))
    return table.pivot(index="reward", columns="adapter", values="result").reindex(
        index=list(dict.fromkeys(table["reward"])), columns=list(dict.fromkeys(table["adapter"])))


def _post_prefect_artifacts(result: FinetuneEvaluation, mlflow_run_id: str, plots: list[str]) -> None:
    """Inside a Prefect flow or task run: the win/tie/loss rows as a table artifact, and the
    tables and curves as markdown with references to the plots (the MLflow run's artifacts).
    Outside one, nothing: a process that has not imported Prefect cannot be in a Prefect run."""
    if "prefect" not in sys.modules:
        return
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tia2.artifacts import markdown_table, records
    from tia2.tracking import artifact_reference

    create_table_artifact(key="tia2-finetune-evaluation",
                          table=records(result.win_tie_loss.drop(columns=["path", "lora"])),
                          description=f"adapters against {result.generator} on {len(result.prompts)} held-out prompts: "
                                      f"matched pairs won, tied and lost")
    create_markdown_artifact(
        key="tia2-finetune-overoptimization",
        markdown=f"## Fine-tuned adapters against {result.generator}\n\n"
                 f"Proxy `{result.proxy}`, gold `{result.gold}`, {len(result.prompts)} held-out prompts.\n\n"
                 + (f"{describe(result.human)}.\n\n" if result.human else "") +
                 f"### Wins/ties/losses against the base model\n\n"
                 f"{markdown_table(wins_table(result.win_tie_loss).reset_index())}\n\n"
                 f"### Over fine-tuning steps\n\n{markdown_table(result.steps_curve)}\n\n"
                 f"### Best-of-n of the base model\n\n{markdown_table(result.best_of_n_curve)}\n\n"
                 f"### Plots (MLflow run `{mlflow_run_id}`)\n\n"
                 + "\n".join(f"- {artifact_reference(mlflow_run_id, name)}" for name in plots),
        description="win/tie/loss and over-optimisation curves (proxy and gold reward)")
