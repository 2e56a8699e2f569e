"""Training a reward model from people's rankings (ImageReward §2.2; PickScore's trainer for the
CLIP family): the mechanics, over images and ranks given in memory (tasks/train_reward.py takes
them from the store and registers the result).

- Data: items (one prompt's images ranked together, `RankedImages`); every pair of an item's
  images with different ranks is a comparison (ties are none), never a pair across items.
  `split_items` keeps whole groups (an item, or every item of a prompt) on one side.
- Loss, eq. 1: −log σ(f(T, x_better) − f(T, x_worse)), f the reward model's score as it scores
  (ImageReward: its head normalised by the release's statistics, a positive affine map; CLIP:
  logit_scale × cosine for PickScore, the cosine for clip and HPSv2).
- Model (`prepare_for_training`): the first ⌊fix_rate · L⌋ blocks of each tower frozen, with what
  comes before them (ImageReward's `fix_rate`: its loop also freezes the first tensor of the next
  block, by the order it walks the names; here whole blocks); ImageReward's new MLP head,
  N(0, std 1/(d+1)) weights and zero biases, d the head's input width (the paper's
  N(0, 1/(d_model+1)), as its code draws it), and its BERT's dropout (med_config.json's 0.1,
  which the released model scores without).
- Optimisation: AdamW over the parameters left trainable, cosine decay to 0 after a linear
  warm-up (transformers' `get_cosine_schedule_with_warmup`), `batch_size` pairs a step over all
  processes in `accumulation_steps` micro-batches each, the gradient norm optionally clipped;
  bf16 autocast and gradient checkpointing where asked (on a GPU; the CPU can run them too).
- Several processes (torchrun, or any `torch.distributed` group: gloo on the CPU, nccl on GPUs):
  each process takes its slice of every step's pairs and DDP averages the gradients, so the
  update is the one process's on the same global batch, up to float rounding. Dropout draws its
  own masks per process (the CLIP family has none).
- Validation: the preference accuracy of tia2/preference.py (ImageReward's test.py: of the pairs
  people rank differently, the share the reward orders the same way strictly) on the held-out
  items, at step 0 (the untrained model) and every `validate_every` steps; the best checkpoint
  (accuracy, then loss) is kept; `patience` validations without a better one stop the training.
- Checkpoints, at every validation and where a run stops: the model, the optimizer, the
  scheduler, the step (the data position: the pairs' order of each epoch is a seeded
  permutation, and every random draw of a step is seeded by (seed, step, process, micro-batch)),
  the best so far and the curves. A re-run resumes from the last one, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from tia2.config import KIND_NAMES, has_kind
from tia2.errors import UserError
from tia2.preference import Items, figures, item_counts, within_item_pairs
from tia2.seeding import seeded_init

TRAINABLE_FAMILIES = ("imagereward", "hf_clip", "open_clip")
SPLITS = ("prompt", "item")
MIXED_PRECISIONS = ("fp32", "bf16")
STATE_FILE = "training_state.pt"
WEIGHTS_FILE = "model.safetensors"
BEST_FILE = "best.json"


@dataclass(frozen=True)
class RewardTrainingSettings:
    """Every setting of a training run; `paper_settings(family)` gives the references' values."""
    steps: int | None = None          # optimizer steps; None: `epochs` passes over the training pairs
    epochs: float = 10.0
    batch_size: int = 64              # pairs per optimizer step, over all processes
    accumulation_steps: int = 1       # micro-batches per step in each process
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup: float = 0.0               # share of the steps with a linear warm-up
    max_grad_norm: float | None = None
    fix_rate: float = 0.7             # share of each tower's blocks frozen (with what comes before them)
    new_head: bool = True             # ImageReward: a new MLP head, N(0, 1/(d+1))
    text_dropout: float | None = 0.1  # ImageReward: its BERT's dropout while training (None: as built)
    validations_per_epoch: int = 4
    validate_every: int | None = None  # steps; None: `validations_per_epoch`
    patience: int | None = None       # validations without a better one before stopping; None: never
    seed: int = 0
    split: str = "prompt"             # what validation holds out whole: every item of a prompt, or an item
    validation_fraction: float = 0.1  # of the groups (prompts or items)
    mixed_precision: str = "fp32"     # bf16: autocast of the forward passes
    gradient_checkpointing: bool = False
    workers: int = 0                  # processes that read and preprocess images ahead (0: this one)

    def key(self) -> dict:
        """The settings that make a run's result (not how it is computed)."""
        return {k: v for k, v in asdict(self).items() if k not in ("gradient_checkpointing", "workers")}


SETTING_NAMES = tuple(f.name for f in fields(RewardTrainingSettings))
_OPTIONAL = {"steps", "max_grad_norm", "text_dropout", "validate_every", "patience"}
_KINDS = {"steps": "int", "epochs": "float", "batch_size": "int", "accumulation_steps": "int",
          "learning_rate": "float", "weight_decay": "float", "adam_beta1": "float", "adam_beta2": "float",
          "adam_eps": "float", "warmup": "float", "max_grad_norm": "float", "fix_rate": "float", "new_head": "bool",
          "text_dropout": "float", "validations_per_epoch": "int", "validate_every": "int", "patience": "int",
          "seed": "int", "split": "str", "validation_fraction": "float", "mixed_precision": "str",
          "gradient_checkpointing": "bool", "workers": "int"}

FAMILY_SETTINGS = {
    # ImageReward's train_one_node.sh and train.py: Adam (AdamW without decay), lr 1e-5, cosine
    # decay to 0 without warm-up, 64 pairs a step (4 x 4 accumulation x 4 GPUs), 10 epochs,
    # validation 4 times an epoch, 70 % of the layers frozen, a new head, the BERT's dropout 0.1
    "imagereward": dict(learning_rate=1e-5, weight_decay=0.0, warmup=0.0, max_grad_norm=None, fix_rate=0.7,
                        new_head=True, text_dropout=0.1, batch_size=64),
    # PickScore's trainer: AdamW lr 1e-6 with torch's weight decay 0.01, 500 warm-up steps of
    # 4,000, the gradient norm clipped at 1, 128 pairs a step (16 x 8 GPUs), every layer trained
    # (its schedule is constant after the warm-up; cosine here, as ImageReward's)
    "clip": dict(learning_rate=1e-6, weight_decay=1e-2, warmup=0.125, max_grad_norm=1.0, fix_rate=0.0,
                 new_head=False, text_dropout=None, batch_size=128),
}


def paper_settings(family: str, **overrides) -> RewardTrainingSettings:
    """The reference's settings for a base of `family`, with `overrides` (None: the reference's)
    on top, checked: every problem in one UserError."""
    if family not in TRAINABLE_FAMILIES:
        raise UserError(f"reward models of the {family} family cannot be trained here (trainable: ImageReward "
                        f"and the CLIP family: {', '.join(TRAINABLE_FAMILIES)})")
    unknown = sorted(set(overrides) - set(SETTING_NAMES))
    if unknown:
        raise UserError(f"unknown training setting(s) {', '.join(unknown)} (known: {', '.join(SETTING_NAMES)})")
    reference = FAMILY_SETTINGS["imagereward" if family == "imagereward" else "clip"]
    settings = replace(RewardTrainingSettings(), **{**reference, **{k: v for k, v in overrides.items() if v is not None}})
    check_settings(settings, family)
    return settings


def check_settings(s: RewardTrainingSettings, family: str, world: int = 1) -> None:
    """Every problem of `s` for a base of `family` trained by `world` processes, in one UserError."""
    values = asdict(s)
    wrong = [f"{name} must be {KIND_NAMES[kind]} (got {values[name]!r})" for name, kind in _KINDS.items()
             if not (values[name] is None and name in _OPTIONAL) and not has_kind(values[name], kind)]
    if wrong:
        raise UserError("; ".join(wrong))
    problems = [f"{name} must be at least 1" for name in
                ("steps", "batch_size", "accumulation_steps", "validations_per_epoch", "validate_every", "patience")
                if values[name] is not None and values[name] < 1]
    problems += [f"{name} must be above 0" for name in ("epochs", "learning_rate", "adam_eps", "max_grad_norm")
                 if values[name] is not None and values[name] <= 0]
    if s.weight_decay < 0 or s.workers < 0:
        problems.append("weight_decay and workers must be at least 0")
    if not (0 <= s.adam_beta1 < 1 and 0 <= s.adam_beta2 < 1):
        problems.append("adam_beta1 and adam_beta2 must be in [0, 1)")
    if not 0 <= s.warmup < 1:
        problems.append(f"warmup must be in [0, 1), a share of the steps (got {s.warmup})")
    if not 0 <= s.fix_rate <= 1:
        problems.append(f"fix_rate must be in [0, 1] (got {s.fix_rate})")
    if not 0 < s.validation_fraction < 1:
        problems.append(f"validation_fraction must be between 0 and 1 (got {s.validation_fraction})")
    if s.text_dropout is not None and not 0 <= s.text_dropout < 1:
        problems.append(f"text_dropout must be in [0, 1) (got {s.text_dropout})")
    if s.split not in SPLITS:
        problems.append(f"split must be one of {', '.join(SPLITS)} (got {s.split!r})")
    if s.mixed_precision not in MIXED_PRECISIONS:
        problems.append(f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)} (got {s.mixed_precision!r})")
    if family != "imagereward" and (s.new_head or s.text_dropout is not None):
        problems.append(f"new_head and text_dropout are ImageReward's (a {family} model has no head or BERT)")
    if problem := batch_problem(s, world):
        problems.append(problem)
    if problems:
        raise UserError("; ".join(problems))


def batch_problem(s: RewardTrainingSettings, world: int) -> str | None:
    """Each process takes an equal share of a step's pairs, in equal micro-batches."""
    if s.batch_size % (world * s.accumulation_steps):
        return (f"batch_size ({s.batch_size}) must be a multiple of accumulation_steps ({s.accumulation_steps})"
                + (f" x the {world} processes" if world > 1 else ""))


# --- data ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankedImages:
    """Images grouped by item (one prompt's images ranked together): rows
    `items.starts[i]:items.starts[i+1]` are item i's, each with its file, its item's prompt and
    its human rank (`items.rank`, lower is better). `groups[i]` is what a split keeps whole."""
    paths: tuple[str, ...]
    prompts: tuple[str, ...]
    items: Items
    groups: tuple[str, ...]

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """The (better, worse) rows of every within-item pair people rank differently."""
        p = within_item_pairs(self.items)
        first, second = self.items.rank[p.a], self.items.rank[p.b]
        keep = first != second
        a_better = first < second
        return np.where(a_better, p.a, p.b)[keep], np.where(a_better, p.b, p.a)[keep]

    def subset(self, chosen: np.ndarray) -> RankedImages:
        """The items `chosen` (ascending item numbers), renumbered."""
        rows = np.concatenate([np.arange(self.items.starts[i], self.items.starts[i + 1]) for i in chosen]) \
            if len(chosen) else np.zeros(0, np.int64)
        index = np.repeat(np.arange(len(chosen)), self.items.sizes[chosen])
        return RankedImages(tuple(self.paths[r] for r in rows), tuple(self.prompts[r] for r in rows),
                            Items.from_item_index(index, self.items.rank[rows]), tuple(self.groups[i] for i in chosen))

    def fingerprint(self) -> str:
        """Changes with any file name, prompt, rank or grouping (not with the folders: a store's
        images are content-addressed, and a moved store is the same data)."""
        h = hashlib.sha256()
        names = [Path(p).name for p in self.paths]
        for part in (names, self.prompts, self.items.starts.tolist(), self.items.rank.tolist(), self.groups):
            h.update(json.dumps(part).encode())
        return h.hexdigest()[:16]


def split_items(images: RankedImages, fraction: float, seed: int) -> tuple[RankedImages, RankedImages]:
    """(train, validation): a seeded draw of round(fraction · groups) groups (at least one, and
    one left to train on) for validation; a group's items all go to one side."""
    groups = sorted(set(images.groups))
    if len(groups) < 2:
        raise UserError(f"the pairs come from {len(groups)} group(s) (prompts or items, by the split): "
                        f"a validation split needs at least two")
    count = min(max(1, round(fraction * len(groups))), len(groups) - 1)
    held_out = {groups[i] for i in np.random.default_rng(seed).permutation(len(groups))[:count]}
    in_validation = np.array([g in held_out for g in images.groups])
    return images.subset(np.flatnonzero(~in_validation)), images.subset(np.flatnonzero(in_validation))


def _load_image(path: str):
    """An image in its own mode: each model's preprocessing converts it where its reference does."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image


def draw_seed(seed: int, *parts) -> int:
    """A seed for one named draw of a run (an epoch's pair order, a micro-batch's dropout, a new head)."""
    return int(hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).hexdigest()[:15], 16)


class MicroBatches(torch.utils.data.Dataset):
    """The micro-batches of one process, from step `start` to `end`: element j is micro-batch
    j % A of step start + j // A, the pixels of its better then its worse images and their
    prompts. Global pair position g (step · batch_size + ...) is pair permutation_e[g mod n] of
    epoch e = g // n, so the data of any step follows from the step alone."""

    def __init__(self, images: RankedImages, preprocess, settings: RewardTrainingSettings, rank: int, world: int,
                 start: int, end: int):
        self.images, self.preprocess, self.settings = images, preprocess, settings
        self.better, self.worse = images.pairs()
        self.rank, self.start, self.end = rank, start, end
        self.micro = settings.batch_size // (world * settings.accumulation_steps)
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return (self.end - self.start) * self.settings.accumulation_steps

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(draw_seed(self.settings.seed, "pairs", epoch))
            self._orders = {epoch: torch.randperm(len(self.better), generator=generator).numpy()}
        return self._orders[epoch]

    def pair_indices(self, step: int, micro_batch: int) -> np.ndarray:
        first = step * self.settings.batch_size + (self.rank * self.settings.accumulation_steps + micro_batch) * self.micro
        positions = np.arange(first, first + self.micro)
        n = len(self.better)
        return np.array([self.order(int(g // n))[g % n] for g in positions])

    def __getitem__(self, j: int):
        step, micro_batch = divmod(j, self.settings.accumulation_steps)
        chosen = self.pair_indices(self.start + step, micro_batch)
        rows = [*self.better[chosen], *self.worse[chosen]]
        pixels = self.preprocess([_load_image(self.images.paths[r]) for r in rows])
        return pixels, [self.images.prompts[r] for r in rows]


class ImageChunks(torch.utils.data.Dataset):
    """Chunks of rows of `images` (the validation pass): pixels and prompts."""

    def __init__(self, images: RankedImages, preprocess, chunks: list[np.ndarray]):
        self.images, self.preprocess, self.chunks = images, preprocess, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, j: int):
        rows = self.chunks[j]
        return self.preprocess([_load_image(self.images.paths[r]) for r in rows]), [self.images.prompts[r] for r in rows]


def _loader(dataset, workers: int):
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers)


# --- the model -------------------------------------------------------------------------------
def towers(model) -> list[tuple[list, torch.nn.ModuleList]]:
    """Each tower of a trainable reward model: (what comes before its blocks, its blocks)."""
    from tia2.models.clip_family import HFClipRewardModel, OpenClipRewardModel
    from tia2.models.imagereward import ImageRewardModel

    if isinstance(model, ImageRewardModel):
        return [([model.text.embeddings], model.text.encoder.layer),
                ([model.vision.embeddings], model.vision.encoder.layers)]
    if isinstance(model, HFClipRewardModel):
        text, vision = model.clip.text_model, model.clip.vision_model
        return [([text.embeddings], text.encoder.layers),
                ([vision.embeddings, vision.pre_layrnorm], vision.encoder.layers)]
    if isinstance(model, OpenClipRewardModel):
        clip, visual = model.clip, model.clip.visual
        return [([clip.token_embedding, clip.positional_embedding], clip.transformer.resblocks),
                ([visual.conv1, visual.class_embedding, visual.positional_embedding, visual.ln_pre],
                 visual.transformer.resblocks)]
    raise UserError(f"{model.name}: its family cannot be trained here (trainable: {', '.join(TRAINABLE_FAMILIES)})")


def prepare_for_training(model, settings: RewardTrainingSettings) -> list[str]:
    """Freeze, re-initialise and set up `model` for training as `settings` say; the names of the
    parameters frozen."""
    from tia2.models.clip_family import OpenClipRewardModel

    for part in (p for stem, blocks in towers(model) if settings.fix_rate > 0
                 for p in [*stem, *blocks[:int(len(blocks) * settings.fix_rate)]]):
        part.requires_grad_(False)
    if isinstance(model, OpenClipRewardModel) and model._scale != "logit_scale":
        model.clip.logit_scale.requires_grad_(False)  # a plain cosine (clip, HPSv2) does not read it
    if settings.new_head:
        generator = torch.Generator().manual_seed(draw_seed(settings.seed, "head"))
        width = model.head[0].in_features
        with torch.no_grad():
            for layer in model.head:
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / (width + 1))
                    layer.bias.zero_()
    if settings.text_dropout is not None:
        for module in model.text.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = settings.text_dropout
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return [name for name, p in model.named_parameters() if not p.requires_grad]


def enable_gradient_checkpointing(model) -> None:
    """Recompute each block's activations in the backward pass (non-reentrant: frozen lower
    blocks pass no gradient-carrying inputs). transformers' blocks are `GradientCheckpointingLayer`s,
    switched on as that class says (BLIP's text model, which does not declare support, too);
    open_clip's towers by its own switch."""
    import functools

    import open_clip
    import torch.utils.checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.gradient_checkpointing = True
            module._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint,
                                                                    use_reentrant=False)
        elif isinstance(module, open_clip.model.CLIP):
            module.set_grad_checkpointing(True)


def imagereward_statistics(model, rewards: np.ndarray) -> dict:
    """ImageReward's score is its head's output normalised by the release's reward mean and std;
    a trained head's by those of `rewards` (its scores of the validation images)."""
    raw = rewards * model.reward_std + model.reward_mean
    std = float(raw.std())
    return {"mean": float(raw.mean()), "std": std if std > 0 else 1.0}


# --- processes -------------------------------------------------------------------------------
def process_group() -> tuple[int, int]:
    """(rank, world size) of this process in the torch.distributed group, (0, 1) without one."""
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def join_torchrun(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1 in the environment): join its process group (nccl on GPUs,
    gloo on the CPU) and return this process's device (cuda:LOCAL_RANK on GPUs)."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _all_sum(tensor: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def image_rewards(model, images: RankedImages, settings: RewardTrainingSettings, autocast=None, rank: int = 0,
                  world: int = 1) -> np.ndarray:
    """`model`'s reward of every row of `images` against its prompt, in eval mode and batches of
    a step's micro-batch size, the batches shared out among the processes."""
    size = max(2, settings.batch_size // (world * settings.accumulation_steps) * 2)
    chunks = [np.arange(i, min(i + size, len(images.paths))) for i in range(0, len(images.paths), size)]
    mine = chunks[rank::world]
    values = torch.zeros(len(images.paths), dtype=torch.float64)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for rows, (pixels, texts) in zip(mine, _loader(ImageChunks(images, model.preprocess, mine), settings.workers)):
            with autocast or nullcontext():
                values[torch.as_tensor(rows)] = model(pixels.to(device), texts).double().cpu()
    model.train(was_training)
    return _all_sum(values, world).numpy()


# --- the run ---------------------------------------------------------------------------------
@dataclass
class TrainingState:
    step: int = 0
    best_step: int | None = None
    best: tuple[float, float] | None = None  # (accuracy, loss) of the best validation
    stale: int = 0                           # validations since the best
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)  # every validation, with the training loss since the last
    window: tuple[float, int] = (0.0, 0)     # the training loss summed over the pairs since the last validation


@dataclass
class TrainingResult:
    folder: Path
    total_steps: int
    validate_every: int
    batch_size: int
    state: TrainingState
    frozen: list[str]   # the names of the parameters frozen
    train_pairs: int
    validation_pairs: int
    steps_done: int     # this call's steps
    seconds: float      # ... and their time (data, forward, backward, update; not validation)

    @property
    def finished(self) -> bool:
        return self.state.step >= self.total_steps or self.state.stopped_early

    @property
    def untrained_accuracy(self) -> float:
        return self.state.history[0]["validation_accuracy"]

    @property
    def best_accuracy(self) -> float | None:
        return None if self.state.best is None else self.state.best[0]

    @property
    def pairs_per_second(self) -> float:
        return self.steps_done * self.batch_size / self.seconds if self.seconds else 0.0


def total_steps(settings: RewardTrainingSettings, train_pairs: int) -> int:
    return settings.steps or max(1, math.ceil(settings.epochs * train_pairs / settings.batch_size))


def validation_interval(settings: RewardTrainingSettings, train_pairs: int) -> int:
    per_epoch = max(1, math.ceil(train_pairs / settings.batch_size))
    return settings.validate_every or max(1, per_epoch // settings.validations_per_epoch)


def train_reward_model(model, train: RankedImages, validation: RankedImages, settings: RewardTrainingSettings,
                       folder: Path, stop_after: int | None = None, on_step=None, on_validation=None) -> TrainingResult:
    """Train `model` (a reward model of the registry, on its device) on `train`'s pairs, validating
    on `validation`'s, with checkpoints in `folder` (resumed from the last one there). Stops at
    the run's last step, by early stopping, or after `stop_after` steps of this call (a checkpoint
    is written there). Returns with the best weights loaded when the run is finished.
    `on_step(step, metrics)` and `on_validation(step, metrics)` run in process 0 alone."""
    from safetensors.torch import load_model
    from transformers import get_cosine_schedule_with_warmup

    rank, world = process_group()
    if problem := batch_problem(settings, world):
        raise UserError(problem)
    train_pairs, validation_pairs = len(train.pairs()[0]), len(validation.pairs()[0])
    if not train_pairs or not validation_pairs:
        raise UserError(f"no pairs to {'train' if not train_pairs else 'validate'} on: every item needs two "
                        f"images people rank differently")
    steps, every = total_steps(settings, train_pairs), validation_interval(settings, train_pairs)
    frozen = prepare_for_training(model, settings)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, betas=(settings.adam_beta1, settings.adam_beta2),
                                  eps=settings.adam_eps, weight_decay=settings.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(settings.warmup * steps), steps)
    device = next(model.parameters()).device
    state = _resume(folder, model, optimizer, scheduler)
    scorer = model
    if world > 1:
        scorer = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.mixed_precision == "bf16")
    run = _Run(model, scorer, validation, settings, folder, optimizer, scheduler, state, autocast, rank, world,
               on_validation)
    if not state.history:
        run.validate(train_loss=math.nan, improves=False)  # the untrained model: step 0
    end = steps if stop_after is None else min(steps, state.step + stop_after)
    start, seconds = state.step, 0.0
    if not state.stopped_early and state.step < end:
        batches = MicroBatches(train, model.preprocess, settings, rank, world, state.step, end)
        model.train()
        began = time.perf_counter()
        accumulated = torch.zeros(2, dtype=torch.float64)
        for j, (pixels, texts) in enumerate(_loader(batches, settings.workers)):
            step, micro_batch = divmod(j, settings.accumulation_steps)
            step += batches.start
            accumulated += run.micro_step(pixels.to(device), texts, step, micro_batch)
            if micro_batch < settings.accumulation_steps - 1:
                continue
            if settings.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step = step + 1
            loss_sum, correct = _all_sum(accumulated, world).tolist()
            accumulated.zero_()
            state.window = (state.window[0] + loss_sum, state.window[1] + settings.batch_size)
            if rank == 0 and on_step:
                on_step(state.step, {"loss": loss_sum / settings.batch_size, "accuracy": correct / settings.batch_size,
                                     "learning_rate": scheduler.get_last_lr()[0]})
            if state.step % every == 0 or state.step == steps:
                seconds += time.perf_counter() - began
                run.validate(train_loss=state.window[0] / state.window[1], improves=True)
                began = time.perf_counter()
                if state.stopped_early:
                    break
            elif state.step == end:
                run.write_checkpoint()
        seconds += time.perf_counter() - began
        model.eval()
    result = TrainingResult(folder, steps, every, settings.batch_size, state, frozen, train_pairs, validation_pairs,
                            state.step - start, seconds)
    if result.finished:
        load_model(model, str(folder / f"best-{state.best_step:06d}" / WEIGHTS_FILE))
    return result


class _Run:
    """What a training run's steps share: the micro-step, the validation, the checkpoints."""

    def __init__(self, model, scorer, validation, settings, folder, optimizer, scheduler, state, autocast, rank,
                 world, on_validation):
        self.model, self.scorer, self.validation, self.settings = model, scorer, validation, settings
        self.folder, self.optimizer, self.scheduler, self.state = folder, optimizer, scheduler, state
        self.autocast, self.rank, self.world, self.on_validation = autocast, rank, world, on_validation
        self.validation_pairs = validation.pairs()

    def micro_step(self, pixels: torch.Tensor, texts: list[str], step: int, micro_batch: int) -> torch.Tensor:
        """Eq. 1 on one micro-batch, its gradients accumulated (DDP averages the processes'; the
        scale makes the sum a mean over the step's batch); (loss sum, pairs ordered right)."""
        count = len(texts) // 2
        sync = micro_batch == self.settings.accumulation_steps - 1 or self.world == 1
        with seeded_init(draw_seed(self.settings.seed, "step", step, self.rank, micro_batch)), \
                (nullcontext() if sync else self.scorer.no_sync()):
            with self.autocast:
                rewards = self.scorer(pixels, texts).float()
            margin = rewards[:count] - rewards[count:]
            losses = torch.nn.functional.softplus(-margin)
            (losses.sum() * self.world / self.settings.batch_size).backward()
        return torch.tensor([float(losses.detach().sum()), float((margin.detach() > 0).sum())], dtype=torch.float64)

    def validate(self, train_loss: float, improves: bool) -> None:
        """Validation figures, the best so far and early stopping, then a checkpoint. Step 0 (the
        untrained model) is measured, never kept as the best."""
        rewards = image_rewards(self.model, self.validation, self.settings, self.autocast, self.rank, self.world)
        better, worse = self.validation_pairs
        accuracy = figures(item_counts(self.validation.items, rewards))["accuracy"]
        loss = float(np.mean(np.logaddexp(0.0, -(rewards[better] - rewards[worse]))))
        state = self.state
        entry = {"step": state.step, "train_loss": train_loss, "validation_accuracy": accuracy,
                 "validation_loss": loss, "learning_rate": self.scheduler.get_last_lr()[0]}
        state.history.append(entry)
        state.window = (0.0, 0)
        if improves and (state.best is None or (accuracy, -loss) > (state.best[0], -state.best[1])):
            state.best, state.best_step, state.stale = (accuracy, loss), state.step, 0
            if self.rank == 0:
                _write_folder(self.folder, f"best-{state.step:06d}", lambda tmp: self._write_best(tmp, entry))
        elif improves:
            state.stale += 1
            state.stopped_early = self.settings.patience is not None and state.stale >= self.settings.patience
        if self.rank == 0 and self.on_validation:
            self.on_validation(state.step, entry)
        self.write_checkpoint()

    def _write_best(self, tmp: Path, entry: dict) -> None:
        from safetensors.torch import save_model

        save_model(self.model, str(tmp / WEIGHTS_FILE))
        (tmp / BEST_FILE).write_text(json.dumps(entry))

    def write_checkpoint(self) -> None:
        """The whole training state at this step; then the older checkpoints and bests go."""
        from safetensors.torch import save_model

        if self.rank == 0:
            def write(tmp: Path) -> None:
                save_model(self.model, str(tmp / WEIGHTS_FILE))
                torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                            "state": asdict(self.state)}, tmp / STATE_FILE)

            _write_folder(self.folder, f"step-{self.state.step:06d}", write)
            keep = {f"step-{self.state.step:06d}", f"best-{self.state.best_step or 0:06d}"}
            for old in [*self.folder.glob("step-*"), *self.folder.glob("best-*")]:
                if old.name not in keep:
                    shutil.rmtree(old)
        _barrier(self.world)


def _write_folder(parent: Path, name: str, write) -> None:
    """`write(folder)` into a temporary folder, then renamed to `parent/name` (replacing one a
    killed run left): a reader finds a whole folder or none."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        write(tmp)
        if (parent / name).exists():
            shutil.rmtree(parent / name)
        tmp.rename(parent / name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _resume(folder: Path, model, optimizer, scheduler) -> TrainingState:
    """The state of the last checkpoint in `folder` loaded into the model, optimizer and
    scheduler; a fresh state without one."""
    from safetensors.torch import load_model

    done = sorted(p for p in folder.glob("step-*") if (p / STATE_FILE).is_file())
    if not done:
        return TrainingState()
    saved = torch.load(done[-1] / STATE_FILE, weights_only=False)
    load_model(model, str(done[-1] / WEIGHTS_FILE))
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state = TrainingState(**saved["state"])
    state.best = tuple(state.best) if state.best is not None else None
    state.window = tuple(state.window)
    return state
