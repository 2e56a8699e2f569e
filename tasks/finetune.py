"""Stage: fine-tuning a diffusion model's UNet with LoRA against a reward spec.

Three algorithms, one loop (a step is one optimizer update): ``rwr`` reward-weighted regression
(TextNorm paper eq. 4), ``ddpo`` (eq. 5) and ``refl`` (ImageReward Algorithm 1), each a module of
`tia2.finetuning` with its settings, its training data and its step; the diffusion mechanics they
share are `tia2.models.diffusion_training`. This stage holds the rest: the configuration
(`FinetuneConfig`, `paper_config`), the optimizer and the loop, checkpoints and resume, the
evaluation of every checkpoint, the MLflow run (`record_finetune`) and RWR's β sweep
(`sweep_kl_coefficient`).

Checkpoints go to ``<store>/adapters/<algo>-<run key>/step-NNNNNN/``: the adapter in diffusers'
format (``pytorch_lora_weights.safetensors``, what `tia2.models.diffusion.apply_lora` loads) and
``training_state.pt`` (LoRA and optimizer state, the training RNG, DDPO's per-prompt statistics,
fp16's loss scale).
The run key hashes everything but the step targets, so re-running a command continues from its last
checkpoint. Every checkpoint is evaluated on the training prompts with fixed seeds against the base
model's images of the same seeds (wins, mean reward) and recorded in ``finetune_checkpoints``;
`select_checkpoint` applies the TextNorm paper's rule (§5.1) to those counts.
"""

from __future__ import annotations

import json
import time
from dataclasses import Field, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import torch

from tasks.online_reward import OnlineReward
from tia2.config import KIND_NAMES, has_kind
from tia2.errors import UserError
from tia2.finetuning import ddpo, refl, rwr
from tia2.finetuning.ddpo import DdpoSettings, PerPromptStats
from tia2.finetuning.refl import ReflSettings
from tia2.finetuning.rwr import RwrSettings
from tia2.models.diffusion import save_adapter
from tia2.models.diffusion_training import Diffusion, adapter_disabled, add_lora
from tia2.progress import progress_bar
from tia2.seeding import image_seed
from tia2.specs import parse_spec
from tia2.store import Store, stable_id

# each algorithm's step (its module's shape: tia2/finetuning/__init__.py); its settings are the
# FinetuneConfig section of its name
ALGORITHM_STEPS = {"rwr": rwr.step, "ddpo": ddpo.step, "refl": refl.step}
ALGORITHMS = tuple(ALGORITHM_STEPS)
REFL_SAMPLERS = ("ddpm", "ddim")
MIXED_PRECISIONS = ("fp32", "bf16", "fp16")
KL_COEFFICIENTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # TextNorm paper, Appendix A.2
STATE_FILE = "training_state.pt"


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyperparameters; `paper_config(algo)` gives the papers' values (TextNorm Table 4, ImageReward
    §4.2). The common ones are fields, each algorithm's own are its section (`rwr`, `ddpo`, `refl`;
    every config has all three, so a run key covers them all, as it always has). A setting's flat
    name (the CLI's and YAML's, `SETTING_NAMES`) is its field's name in the config or its section:
    `flat()` and `with_settings(**settings)` read and change them so. `steps` and
    `checkpoint_every` are targets, not part of a run's identity."""
    algo: str
    reward: str
    steps: int = 1000
    checkpoint_every: int = 100
    seed: int = 0
    denoise_steps: int = 50
    guidance: float = 7.5
    learning_rate: float = 1e-5
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    batch_size: int = 32
    lora_rank: int = 4
    lora_alpha: float = 4.0
    # the sections sit where their settings stand in the flat order (that of `flat()` and `key()`)
    rwr: RwrSettings = field(default_factory=RwrSettings)
    ddpo: DdpoSettings = field(default_factory=DdpoSettings)
    refl: ReflSettings = field(default_factory=ReflSettings)
    # checkpoint evaluation: images per training prompt, fixed seeds
    eval_images_per_prompt: int = 4
    # execution: "bf16" or "fp16" (the papers') runs the UNet and VAE under autocast (LoRA weights and
    # optimizer stay fp32; fp16 scales the loss against underflowing gradients); gradient
    # checkpointing trades UNet recomputation for activation memory (same result)
    mixed_precision: str = "fp32"
    gradient_checkpointing: bool = False

    @property
    def algorithm_settings(self) -> RwrSettings | DdpoSettings | ReflSettings:
        """The section of this config's algorithm."""
        return getattr(self, self.algo)

    def flat(self) -> dict:
        """algo, reward and every setting by its flat name, in the flat order."""
        return {f.name: getattr(getattr(self, section), f.name) if section else getattr(self, f.name)
                for section, f in _SETTING_FIELDS}

    def with_settings(self, **settings) -> FinetuneConfig:
        """This config with settings changed, given by their flat names (e.g. kl_beta, RWR's)."""
        common = {k: v for k, v in settings.items() if k not in _SECTION_OF}
        sections = {name: replace(getattr(self, name), **{k: v for k, v in settings.items()
                                                           if _SECTION_OF.get(k) == name})
                    for name in ALGORITHMS}
        return replace(self, **common, **sections)

    def key(self) -> dict:
        """The settings that make a run (everything but the step targets and execution details), by flat name."""
        return {k: v for k, v in self.flat().items()
                if k not in ("steps", "checkpoint_every", "gradient_checkpointing")}


def _setting_fields() -> list[tuple[str | None, Field]]:
    """(section or None, field) of algo, reward and every setting, in the flat order: a section's
    settings in its place."""
    pairs = []
    for f in fields(FinetuneConfig):
        if f.name in ALGORITHMS:  # a section: its field's default factory is its settings class
            pairs += [(f.name, setting) for setting in fields(f.default_factory)]
        else:
            pairs.append((None, f))
    return pairs


_SETTING_FIELDS = _setting_fields()
_SECTION_OF = {f.name: section for section, f in _SETTING_FIELDS if section}
SETTING_NAMES = tuple(f.name for _, f in _SETTING_FIELDS if f.name not in ("algo", "reward"))


def paper_config(algo: str, reward: str, **overrides) -> FinetuneConfig:
    """The papers' hyperparameters for `algo`, with `overrides` (flat setting names; None: the
    paper's) on top, checked."""
    if algo not in ALGORITHMS:
        raise UserError(f"unknown algorithm {algo!r} (use {', '.join(ALGORITHMS)})")
    unknown = sorted(set(overrides) - set(SETTING_NAMES))
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(unknown)} (known: {', '.join(SETTING_NAMES)})")
    paper = {
        "rwr": dict(steps=1000, denoise_steps=50, guidance=7.5, learning_rate=1e-5, weight_decay=1e-2,
                    batch_size=32),
        "ddpo": dict(steps=500, denoise_steps=50, guidance=5.0, learning_rate=3e-4, weight_decay=1e-4,
                     batch_size=64, samples_per_iteration=256),
        "refl": dict(steps=1000, denoise_steps=40, guidance=7.5, learning_rate=1e-5, weight_decay=1e-2,
                     batch_size=64),
    }[algo]
    steps = overrides.get("denoise_steps")
    if (algo == "refl" and has_kind(steps, "int") and steps
            and overrides.get("refl_start") is None and overrides.get("refl_end") is None):
        # the paper's window, the last quarter of the steps ([30, 39] of 40), for another T
        paper.update(refl_start=(3 * steps) // 4, refl_end=steps - 1)
    config = FinetuneConfig(algo=algo, reward=str(parse_spec(reward))).with_settings(**paper)
    config = config.with_settings(**{k: v for k, v in overrides.items() if v is not None})
    _check(config)
    return config


def _check(c: FinetuneConfig) -> None:
    settings = c.flat()
    wrong = [f"{f.name} must be {KIND_NAMES[f.type]} (got {settings[f.name]!r})" for _, f in _SETTING_FIELDS
             if f.type in KIND_NAMES and not has_kind(settings[f.name], f.type)]
    if wrong:  # e.g. a YAML config's string
        raise UserError("; ".join(wrong))
    problems = [f"{name} must be at least 1" for name in
                ("steps", "checkpoint_every", "denoise_steps", "batch_size", "lora_rank", "images_per_prompt",
                 "keep", "samples_per_iteration", "eval_images_per_prompt", "pretrain_images_per_prompt")
                if settings[name] < 1]
    if c.rwr.keep > c.rwr.images_per_prompt:
        problems.append(f"keep ({c.rwr.keep}) exceeds images_per_prompt ({c.rwr.images_per_prompt})")
    if c.algo == "refl" and not 0 <= c.refl.refl_start <= c.refl.refl_end < c.denoise_steps:
        problems.append(f"need 0 <= refl_start <= refl_end < denoise_steps "
                        f"(got {c.refl.refl_start}, {c.refl.refl_end}, {c.denoise_steps})")
    if c.ddpo.eta <= 0 and c.algo == "ddpo":
        problems.append("DDPO needs eta > 0 (a stochastic sampler has step log-probabilities)")
    if c.mixed_precision not in MIXED_PRECISIONS:
        problems.append(f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)} (got {c.mixed_precision!r})")
    if c.refl.refl_sampler not in REFL_SAMPLERS:
        problems.append(f"refl_sampler must be one of {', '.join(REFL_SAMPLERS)} (got {c.refl.refl_sampler!r})")
    if c.rwr.kl_beta < 0 or c.learning_rate <= 0:
        problems.append("kl_beta must be >= 0 and learning_rate > 0")
    if problems:
        raise UserError("; ".join(problems))


# --- selection rules ---------------------------------------------------------------------------
def select_checkpoint(steps: list[int], wins: list[int]) -> int:
    """TextNorm §5.1: the earliest checkpoint at which the number of generated images that beat
    the base model's reaches its maximum."""
    if not steps or len(steps) != len(wins):
        raise ValueError("need one win count per checkpoint step")
    best = max(wins)
    return min(step for step, w in zip(steps, wins) if w == best)


def choose_kl_coefficient(wins_by_beta: dict[float, int]) -> float:
    """TextNorm Appendix A.2: of the KL coefficients tried (0 to 1 by 0.25), the one whose
    (selected) checkpoint improves most on the base model, i.e. has the most wins; a tie goes to
    the larger β, the one that stays closer to the base model."""
    if not wins_by_beta:
        raise ValueError("no KL coefficients to choose from")
    return max(wins_by_beta, key=lambda beta: (wins_by_beta[beta], beta))


# --- the training run --------------------------------------------------------------------------
@dataclass
class Checkpoint:
    step: int
    path: Path
    mean_reward: float
    base_mean_reward: float
    wins: int
    n_eval: int
    loss: float


@dataclass
class FinetuneResult:
    run: str
    folder: Path
    config: FinetuneConfig
    generator: str
    start_step: int
    checkpoints: list[Checkpoint]  # this call's new checkpoints
    base_mean_reward: float
    selected_step: int | None
    selected_wins: int | None  # the selected checkpoint's evaluation images that beat the base's
    seconds: float           # the whole call: data, training, checkpoints and their evaluation
    training_seconds: float  # the optimizer steps alone

    @property
    def steps_per_second(self) -> float:
        done = (self.checkpoints[-1].step - self.start_step) if self.checkpoints else 0
        return done / self.training_seconds if self.training_seconds else 0.0


def run_key(config: FinetuneConfig, generator_identity: str, prompt_ids: list[str], reward_models: list[str]) -> str:
    return stable_id("finetune", json.dumps(config.key(), sort_keys=True), generator_identity, *reward_models,
                     *prompt_ids)[:12]


def training_prompts(store: Store, sets: list[str] | None, max_prompts: int | None) -> list[tuple[str, str]]:
    from tasks.generate import prompts_to_generate

    return [(pid, text) for pid, text, _ in prompts_to_generate(store, sets, max_prompts)]


def finetune(store: Store, generator, config: FinetuneConfig, prompts: list[tuple[str, str]],
             reward: OnlineReward, on_checkpoint=None, on_step=None) -> FinetuneResult:
    """Train (or continue training) a LoRA adapter on `generator`'s UNet up to `config.steps`,
    writing a checkpoint every `config.checkpoint_every` steps and at the end. `on_step(step,
    metrics)` is called after each optimizer step (its loss; DDPO's approx_kl and clipfrac too),
    `on_checkpoint(c)` after each checkpoint is written (the MLflow logging)."""
    start_time = time.perf_counter()
    identity = f"{generator.name}@{generator.identity}"
    # the reward models' versions too: the same spec over other weights or scoring code is another objective
    rewards = sorted(f"{name}@{model.version}" for name, model in getattr(reward, "models", {}).items())
    run = run_key(config, identity, [p for p, _ in prompts], rewards)
    folder = store.adapters_dir / f"{config.algo}-{run}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**config.key(), "generator": identity, "reward_models": rewards,
                                                    "prompts": prompts}, indent=1))
    diffusion = Diffusion(generator.pipeline, config.denoise_steps, config.guidance, config.mixed_precision)
    params = add_lora(diffusion.unet, config.lora_rank, config.lora_alpha, config.seed)
    if config.gradient_checkpointing:
        diffusion.unet.enable_gradient_checkpointing()
    optimizer = _optimizer(params, config)
    rng = torch.Generator("cpu").manual_seed(config.seed)
    stats = PerPromptStats(config.ddpo.stats_buffer, config.ddpo.stats_min_count)  # DDPO's alone, resumed below
    evaluation = _Evaluation(diffusion, reward, prompts, config)
    step = 0
    last = _last_checkpoint(folder)
    if last is not None:
        state = torch.load(last / STATE_FILE, weights_only=False)
        with torch.no_grad():
            for p, saved in zip(params, state["lora"]):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        rng.set_state(state["rng"])
        diffusion.scaler.load_state_dict(state["scaler"])
        stats.history = state["stats"]
        step = state["step"]
    # what the steps train on besides their own samples: DDPO's statistics, the others' data made once
    data = stats if config.algo == "ddpo" else _training_data(store, diffusion, reward, prompts, config, folder,
                                                              [identity, *rewards])
    start_step, checkpoints, loss, training_seconds = step, [], float("nan"), 0.0
    with progress_bar(f"fine-tuning ({config.algo})", max(config.steps - step, 0), unit="steps") as advance:
        while step < config.steps:
            began = time.perf_counter()
            metrics = _update(diffusion, reward, prompts, config, data, rng, params, optimizer)
            _synchronize(diffusion.device)
            training_seconds += time.perf_counter() - began
            step += 1
            loss = metrics["loss"]
            if on_step:
                on_step(step, metrics)
            if step % config.checkpoint_every == 0 or step == config.steps:
                checkpoint = _write_checkpoint(folder, diffusion, params, optimizer, rng, stats, step, evaluation, loss)
                _record_checkpoint(store, run, config, identity, checkpoint)
                checkpoints.append(checkpoint)
                if on_checkpoint:
                    on_checkpoint(checkpoint)
            advance(1, (step - start_step) / training_seconds)
    rows = store.connect().execute("SELECT step, wins FROM finetune_checkpoints WHERE run = ? ORDER BY step",
                                   [run]).fetchall()
    selected = select_checkpoint([s for s, _ in rows], [w for _, w in rows]) if rows else None
    return FinetuneResult(run, folder, config, identity, start_step, checkpoints, evaluation.base_mean, selected,
                          dict(rows).get(selected), time.perf_counter() - start_time, training_seconds)


def _optimizer(params, config: FinetuneConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_eps,
                             weight_decay=config.weight_decay)


def _update(diffusion: Diffusion, reward, prompts, config: FinetuneConfig, data, rng, params,
            optimizer) -> dict[str, float]:
    """One optimizer step of `config.algo` on its `data`: its loss's gradients, clipped to
    `max_grad_norm`, applied; the step's metrics."""
    optimizer.zero_grad(set_to_none=True)
    metrics = ALGORITHM_STEPS[config.algo](diffusion, reward, prompts, config.algorithm_settings, data, rng,
                                           config.batch_size)
    diffusion.scaler.unscale_(optimizer)  # fp16: clip the true gradients, not the scaled ones
    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    diffusion.scaler.step(optimizer)  # fp16: skipped when the scaled gradients overflowed
    diffusion.scaler.update()
    return metrics


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _last_checkpoint(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("step-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


class _Evaluation:
    """Images of every training prompt from fixed seeds (deterministic DDIM), scored by the
    spec; the base model's are made once, with the adapter switched off."""

    def __init__(self, diffusion: Diffusion, reward: OnlineReward, prompts, config: FinetuneConfig):
        self.diffusion, self.reward = diffusion, reward
        pairs = [(pid, text, image_seed(pid, i, config.seed + 1)) for pid, text in prompts
                 for i in range(config.eval_images_per_prompt)]
        self.prompt_ids, self.texts, self.seeds = map(list, zip(*pairs))
        self._base = None

    def rewards(self) -> torch.Tensor:
        with torch.no_grad():
            images = self.diffusion.decode(self.diffusion.sample(self.texts, self.seeds))
            return self.reward(images, self.prompt_ids)

    @property
    def base(self) -> torch.Tensor:
        if self._base is None:
            with adapter_disabled(self.diffusion.unet):
                self._base = self.rewards()
        return self._base

    @property
    def base_mean(self) -> float:
        return float(self.base.mean())


def _write_checkpoint(folder, diffusion, params, optimizer, rng, stats, step, evaluation, loss) -> Checkpoint:
    target = folder / f"step-{step:06d}"
    tmp = folder / f".step-{step:06d}.tmp"
    adapter = save_adapter(diffusion.unet, tmp)
    torch.save({"step": step, "lora": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict(),
                "rng": rng.get_state(), "scaler": diffusion.scaler.state_dict(), "stats": stats.history},
               tmp / STATE_FILE)
    if target.exists():  # a checkpoint that was written, then its successor lost: replace it
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    rewards = evaluation.rewards()
    return Checkpoint(step, target / adapter.name, float(rewards.mean()), evaluation.base_mean,
                      int((rewards > evaluation.base).sum()), len(rewards), float(loss))


def _record_checkpoint(store: Store, run: str, config: FinetuneConfig, generator: str, c: Checkpoint) -> None:
    store.upsert("finetune_checkpoints", pa.Table.from_pylist([dict(
        run=run, algo=config.algo, generator=generator, reward=config.reward, step=c.step, path=str(c.path),
        mean_reward=c.mean_reward, base_mean_reward=c.base_mean_reward, wins=c.wins, n_eval=c.n_eval, loss=c.loss,
        created_at=datetime.now(timezone.utc))]))


# --- training data (made once, kept in the store) -----------------------------------------------
# RWR's data depends on these alone, so runs that differ in anything else (β of a sweep, the
# learning rate, ...) share one file
RWR_DATA_FIELDS = ("reward", "seed", "denoise_steps", "guidance", "images_per_prompt", "keep", "mixed_precision")


def _training_data(store: Store, diffusion: Diffusion, reward: OnlineReward, prompts, config: FinetuneConfig,
                   folder: Path, sources: list[str]) -> dict:
    """RWR's top-K data (a file of the store's adapters folder, shared by the runs it is the same
    for) or ReFL's pre-training pairs (in the run's folder): loaded when made before."""
    if config.algo == "rwr":
        settings = config.flat()
        data_fields = json.dumps({k: settings[k] for k in RWR_DATA_FIELDS}, sort_keys=True)
        key = stable_id("rwr-data", data_fields, *sources, *(p for p, _ in prompts))[:12]
        path = store.adapters_dir / f"rwr-data-{key}.pt"
    else:
        path = folder / "training_data.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    data = rwr.top_k_data(diffusion, reward, prompts, config.rwr, config.seed) if config.algo == "rwr" else \
        refl.pretraining_pairs(store, diffusion, prompts, config.refl, config.seed)
    partial = path.with_name(f".{path.name}.tmp")
    torch.save(data, partial)
    partial.rename(path)  # a crash mid-write leaves no file that a re-run would load
    return data


# --- the stage, with its MLflow run ------------------------------------------------------------
def record_finetune(store: Store, model: str, config: FinetuneConfig, sets: list[str] | None = None,
                    max_prompts: int | None = None, weights: str = "pretrained", reward_weights: str = "pretrained",
                    device: str = "cpu", parent_run_id: str | None = None) -> FinetuneResult:
    """Fine-tune `model` on the store's prompts against `config.reward`, logging params (base
    model, reward spec, algorithm, hyperparameters), per-step metrics (the loss; DDPO's approx_kl
    and clipfrac), per-checkpoint metrics and each adapter (under checkpoints/step-N) to MLflow."""
    import mlflow

    from tia2.models.diffusion import create_pipeline
    from tia2.tracking import stage_run

    prompts = training_prompts(store, sets, max_prompts)
    reward = OnlineReward(config.reward, store, prompts, reward_weights, device)
    generator = create_pipeline(model, weights=weights, device=device)
    base_model = f"{generator.name}@{generator.identity}"
    params = {**config.key(), "base_model": base_model, "target_steps": config.steps,
              "checkpoint_every": config.checkpoint_every, "sets": sets or "all", "prompts": len(prompts),
              "device": device}
    tags = {"tia2.base_model": base_model, "tia2.reward": config.reward, "tia2.algo": config.algo}
    # RWR's sweep: a run per β
    label = config.algo + (f" kl_beta={config.rwr.kl_beta:g}" if config.algo == "rwr" else "")
    with stage_run("finetune", params, parent_run_id, tags=tags, label=label):
        def log(c: Checkpoint) -> None:
            mlflow.log_metrics({"mean_reward": c.mean_reward, "base_mean_reward": c.base_mean_reward,
                                "wins": c.wins}, step=c.step)
            mlflow.log_artifact(str(c.path), f"checkpoints/step-{c.step:06d}")
            mlflow.set_tags({"tia2.step": c.step, "tia2.adapter": str(c.path)})

        result = finetune(store, generator, config, prompts, reward, on_checkpoint=log,
                          on_step=lambda step, metrics: mlflow.log_metrics(metrics, step=step))
        mlflow.set_tags({"tia2.run": result.run, "tia2.start_step": result.start_step,
                         "tia2.selected_step": result.selected_step})
        mlflow.log_metric("steps_per_second", result.steps_per_second)
    return result


@dataclass
class KlSweep:
    runs: dict[float, FinetuneResult]  # one RWR run per β

    @property
    def wins(self) -> dict[float, int]:
        """Each run's selected checkpoint's images that beat the base's."""
        return {beta: run.selected_wins for beta, run in self.runs.items()}

    @property
    def chosen(self) -> float:
        """The β of the most wins (ties to the larger), the paper's rule."""
        return choose_kl_coefficient(self.wins)


def sweep_kl_coefficient(store: Store, model: str, config: FinetuneConfig, betas=KL_COEFFICIENTS,
                         **record_options) -> KlSweep:
    """TextNorm Appendix A.2 for RWR: one run per β (each its own, resumable MLflow run; the same
    training images and evaluation seeds), each run's checkpoint chosen by `select_checkpoint`,
    then the β whose chosen checkpoint beats the base model on the most images."""
    if config.algo != "rwr":
        raise UserError(f"the KL coefficient sweep is RWR's (got --algo {config.algo})")
    return KlSweep({beta: record_finetune(store, model, config.with_settings(kl_beta=beta), **record_options)
                    for beta in betas})
