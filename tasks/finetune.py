"""Stage: fine-tuning a diffusion model's UNet with LoRA against a reward spec.

Three algorithms, one loop shape (a step is one optimizer update):

- ``rwr`` reward-weighted regression (TextNorm paper eq. 4, after Lee et al. 2023): per prompt the
  base model makes N images (paper 100), the top K (paper 10) by the reward form the data set, and
  the LoRA weights minimise  E[w · ||ε̂_θ − target||²] + β · E[||ε̂_θ − ε̂_θ0||²]  (the target
  is the UNet's parametrisation, ε or v; the penalty compares noise predictions ε whatever it is).
  The weight w is the reward when the spec's values lie in [0, 1] (TextNorm's do), else the reward
  min-max normalised over the generated pool (ImageReward paper, Appendix E, reproducing Lee et al.).
  Eq. 4's β log(p_θ/p_θ0) is the KL regulariser of Fan et al. 2023, which the paper cites: for two
  diffusion models the per-step KL of their Gaussian transitions is proportional to the squared
  distance of their noise predictions on the same noisy input, so that distance, to the frozen
  base (LoRA disabled), is the penalty. β is picked from {0, 0.25, 0.5, 0.75, 1} by the paper's
  rule (Appendix A.2: "the one that yielded the most improvement"): `choose_kl_coefficient`.
- ``ddpo`` (TextNorm eq. 5, Black et al. 2023, the DDPO-IS loop of ddpo-pytorch / trl): DDIM
  sampling with eta > 0 and the log-probability of every step (`ddim_step_with_logprob`), rewards
  normalised per prompt (`PerPromptStats`), a PPO-clipped policy gradient summed over timesteps,
  one gradient update per iteration (Table 4). Like trl's defaults that the paper used, no KL term;
  like trl, each step reports the approximate KL to the sampling policy and the clipped fraction.
- ``refl`` (ImageReward Algorithm 1): denoise without gradients to a random step in
  [refl_start, refl_end] of T steps (paper: T = 40, gradient step after 30..39 steps), one step
  with gradients, predict x0, decode with the VAE, reward through the differentiable spec
  (`refl_sampler`: "ddpm", the default, samples as ImageReward's ReFL.py does, stochastic DDPM
  steps on the conditional UNet output without guidance; "ddim" with deterministic DDIM and
  classifier-free guidance);
  loss λ·ReLU(margin − r) (λ = 1e-3; margin 2 as in the ImageReward code) plus the pre-training
  denoising loss on (caption, image) pairs: the store's images of the training prompts, or, when
  the store has none, images the base model makes at the start. Algorithm 1 updates twice per
  iteration (pre-training loss, then ReFL loss); here one update takes the sum.

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

import functools
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import torch

from tia2.config import KIND_NAMES, has_kind
from tia2.errors import UserError
from tia2.progress import progress_bar
from tia2.seeding import seeded_init
from tia2.specs import Mean, Model, Spec, TextNorm, UncertaintyRegularized, parse_spec
from tia2.store import Store, stable_id

ALGORITHMS = ("rwr", "ddpo", "refl")
REFL_SAMPLERS = ("ddpm", "ddim")
MIXED_PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
KL_COEFFICIENTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # TextNorm paper, Appendix A.2
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
ADAPTER_FILE = "pytorch_lora_weights.safetensors"
STATE_FILE = "training_state.pt"


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyperparameters; `paper_config(algo)` gives the papers' values (TextNorm Table 4, ImageReward
    §4.2). `steps` and `checkpoint_every` are targets, not part of a run's identity."""
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
    # rwr
    images_per_prompt: int = 100
    keep: int = 10
    kl_beta: float = 0.5
    # ddpo
    samples_per_iteration: int = 256
    eta: float = 1.0
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    stats_buffer: int = 16
    stats_min_count: int = 16
    # refl
    refl_lambda: float = 1e-3
    refl_margin: float = 2.0
    refl_start: int = 30
    refl_end: int = 39
    # the UNet calls of the reward branch: "ddpm" as ReFL.py (stochastic DDPM steps, the conditional
    # output alone, at the gradient step too), "ddim" deterministic DDIM with guidance `guidance`
    refl_sampler: str = "ddpm"
    pretrain_images_per_prompt: int = 4
    # checkpoint evaluation: images per training prompt, fixed seeds
    eval_images_per_prompt: int = 4
    # execution: "bf16" or "fp16" (the papers') runs the UNet and VAE under autocast (LoRA weights and
    # optimizer stay fp32; fp16 scales the loss against underflowing gradients); gradient
    # checkpointing trades UNet recomputation for activation memory (same result)
    mixed_precision: str = "fp32"
    gradient_checkpointing: bool = False

    def key(self) -> dict:
        return {k: v for k, v in asdict(self).items()
                if k not in ("steps", "checkpoint_every", "gradient_checkpointing")}


def paper_config(algo: str, reward: str, **overrides) -> FinetuneConfig:
    if algo not in ALGORITHMS:
        raise UserError(f"unknown algorithm {algo!r} (use {', '.join(ALGORITHMS)})")
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
    config = FinetuneConfig(algo=algo, reward=str(parse_spec(reward)), **paper)
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    _check(config)
    return config


def _check(c: FinetuneConfig) -> None:
    wrong = [f"{f.name} must be {KIND_NAMES[f.type]} (got {getattr(c, f.name)!r})" for f in fields(c)
             if f.type in KIND_NAMES and not has_kind(getattr(c, f.name), f.type)]
    if wrong:  # e.g. a YAML config's string
        raise UserError("; ".join(wrong))
    problems = [f"{name} must be at least 1" for name in
                ("steps", "checkpoint_every", "denoise_steps", "batch_size", "lora_rank", "images_per_prompt",
                 "keep", "samples_per_iteration", "eval_images_per_prompt", "pretrain_images_per_prompt")
                if getattr(c, name) < 1]
    if c.keep > c.images_per_prompt:
        problems.append(f"keep ({c.keep}) exceeds images_per_prompt ({c.images_per_prompt})")
    if c.algo == "refl" and not 0 <= c.refl_start <= c.refl_end < c.denoise_steps:
        problems.append(f"need 0 <= refl_start <= refl_end < denoise_steps "
                        f"(got {c.refl_start}, {c.refl_end}, {c.denoise_steps})")
    if c.eta <= 0 and c.algo == "ddpo":
        problems.append("DDPO needs eta > 0 (a stochastic sampler has step log-probabilities)")
    if c.mixed_precision not in MIXED_PRECISIONS:
        problems.append(f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)} (got {c.mixed_precision!r})")
    if c.refl_sampler not in REFL_SAMPLERS:
        problems.append(f"refl_sampler must be one of {', '.join(REFL_SAMPLERS)} (got {c.refl_sampler!r})")
    if c.kl_beta < 0 or c.learning_rate <= 0:
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


# --- the online reward ---------------------------------------------------------------------------
def textnorm_probability(caption: torch.Tensor, contrast: torch.Tensor, tau: float) -> torch.Tensor:
    """TextNorm (eq. 1) for a batch: exp(r0/τ) / (exp(r0/τ) + Σ exp(r_i/τ)). `contrast` is
    [B, M], padded with -inf where an image's caption has fewer than M contrast prompts. The
    contrast scores are sorted first, so the value depends only on their multiset (as in
    tasks/rewards.py)."""
    logits = torch.cat([caption[:, None], contrast.sort(dim=1).values], dim=1) / tau
    return torch.exp(logits[:, 0] - torch.logsumexp(logits, dim=1))


class OnlineReward:
    """A reward spec evaluated on pixels: `reward(images01, prompt_ids)` gives one value per image,
    differentiable in the pixels (the reward models' `preprocess_tensor` + encoders). Reward models
    are built once per name; contrast prompts come from the store (the spec's method), else from the
    contrast rules; a prompt with neither is an error that names it."""

    def __init__(self, spec: Spec | str, store: Store, prompts: list[tuple[str, str]], weights: str = "pretrained",
                 device: str = "cpu"):
        from tia2.models import create_reward_model

        self.spec = parse_spec(spec) if isinstance(spec, str) else spec
        self.caption = dict(prompts)
        self.models = {}
        for model in sorted(self.spec.models(), key=str):
            reward_model = create_reward_model(model.name, weights=weights, device=device).requires_grad_(False)
            if model.version is not None and model.version != reward_model.version:
                raise UserError(f"{model}: the model built here is version {reward_model.version}")
            self.models[model.name] = reward_model
        self.contrasts = {method: _contrast_prompts(store, prompts, method) for method in _textnorm_methods(self.spec)}

    def __call__(self, images01: torch.Tensor, prompt_ids: list[str]) -> torch.Tensor:
        features: dict[str, torch.Tensor] = {}  # each model encodes the batch once per call
        return self._value(self.spec, images01, prompt_ids, features)

    def _encoded(self, name: str, images01: torch.Tensor, features: dict) -> torch.Tensor:
        if name not in features:
            model = self.models[name]
            features[name] = model.encode_images(model.preprocess_tensor(images01))
        return features[name]

    def _value(self, spec: Spec, images01, prompt_ids, features) -> torch.Tensor:
        if isinstance(spec, Model):
            encoded = self._encoded(spec.name, images01, features)
            index = torch.arange(len(prompt_ids), device=encoded.device)
            return self.models[spec.name].score_encoded(encoded, index, [self.caption[p] for p in prompt_ids])
        if isinstance(spec, TextNorm):
            if not isinstance(spec.inner, Model):
                raise UserError(f"{spec}: textnorm() normalises one reward model's scores; "
                                f"apply it to each model inside the ensemble instead")
            encoded = self._encoded(spec.inner.name, images01, features)
            contrasts = [self.contrasts[spec.contrast][p] for p in prompt_ids]
            texts = [t for p, c in zip(prompt_ids, contrasts) for t in [self.caption[p], *c]]
            index = torch.tensor([i for i, c in enumerate(contrasts) for _ in range(1 + len(c))], device=encoded.device)
            scores = self.models[spec.inner.name].score_encoded(encoded, index, texts)
            width = max(map(len, contrasts))
            padded = scores.new_full((len(prompt_ids), width), -math.inf)
            first = 0
            caption = []
            for i, c in enumerate(contrasts):
                caption.append(scores[first])
                padded[i, :len(c)] = scores[first + 1:first + 1 + len(c)]
                first += 1 + len(c)
            return textnorm_probability(torch.stack(caption), padded, spec.tau)
        # sorted per image, so the value depends only on the multiset of member values (as offline)
        parts = torch.stack([self._value(p, images01, prompt_ids, features) for p in spec.parts]).sort(dim=0).values
        mean = parts.mean(dim=0)
        if isinstance(spec, Mean):
            return mean
        assert isinstance(spec, UncertaintyRegularized)
        return mean - spec.lam * ((parts - mean) ** 2).mean(dim=0)


def _textnorm_methods(spec: Spec) -> set[str]:
    if isinstance(spec, TextNorm):
        return {spec.contrast}
    if isinstance(spec, Model):
        return set()
    return set().union(*(_textnorm_methods(p) for p in spec.parts))


def _contrast_prompts(store: Store, prompts: list[tuple[str, str]], method: str) -> dict[str, list[str]]:
    from tasks.contrast import rule_contrasts

    rows = store.connect().execute(
        "SELECT prompt_id, text FROM contrast_prompts WHERE method = ? AND prompt_id IN (SELECT unnest(?)) "
        "ORDER BY prompt_id, text", [method, [p for p, _ in prompts]]).fetchall()
    found: dict[str, list[str]] = {}
    for prompt_id, text in rows:
        found.setdefault(prompt_id, []).append(text)
    contrasts = {}
    for prompt_id, caption in prompts:
        texts = [t for t in found.get(prompt_id) or rule_contrasts(caption) if t != caption]
        if not texts:
            raise UserError(f"prompt {caption!r} has no contrast prompts (method {method}) and the contrast "
                            f"rules make none: TextNorm needs some (run `tia2 contrast`)")
        contrasts[prompt_id] = texts
    return contrasts


# --- diffusion pieces --------------------------------------------------------------------------
def predict_x0_and_noise(scheduler, model_output: torch.Tensor, t: int | torch.Tensor, sample: torch.Tensor):
    """The scheduler's prediction of x0 and of the noise ε from a UNet output at timestep t (one
    for the batch or one per sample), whatever the UNet predicts (ε, v or x0)."""
    alpha = scheduler.alphas_cumprod[torch.as_tensor(t).cpu()].to(sample)
    alpha = alpha.reshape(-1, *[1] * (sample.ndim - 1))  # broadcasts over each sample's values
    if scheduler.config.prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - (1 - alpha).sqrt() * eps) / alpha.sqrt()
    elif scheduler.config.prediction_type == "v_prediction":
        x0 = alpha.sqrt() * sample - (1 - alpha).sqrt() * model_output
        eps = alpha.sqrt() * model_output + (1 - alpha).sqrt() * sample
    elif scheduler.config.prediction_type == "sample":
        x0 = model_output
        eps = (sample - alpha.sqrt() * x0) / (1 - alpha).sqrt()
    else:
        raise UserError(f"unsupported prediction type {scheduler.config.prediction_type!r}")
    return x0, eps


def ddim_step_with_logprob(scheduler, model_output: torch.Tensor, t: int, sample: torch.Tensor, eta: float,
                           generator: torch.Generator | None = None, prev_sample: torch.Tensor | None = None):
    """One DDIM step x_t → x_{t-1} (eq. 12 of Song et al. with σ_t = η·σ_DDPM) and the Gaussian
    log-probability of x_{t-1} per sample (mean over latent dimensions, as ddpo-pytorch). Given
    `prev_sample`, scores that sample instead of drawing one (the PPO ratio)."""
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    # the last step goes to timestep 0, as in trl and ddpo-pytorch: `set_alpha_to_one`'s ᾱ = 1 there
    # would make the step deterministic (zero variance, NaN log-probabilities)
    prev_t = max(t - step, 0)
    alpha = scheduler.alphas_cumprod[t].to(sample)
    alpha_prev = scheduler.alphas_cumprod[prev_t].to(sample)
    x0, eps = predict_x0_and_noise(scheduler, model_output, t, sample)
    variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
    std = eta * variance.sqrt()
    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std ** 2).sqrt() * eps
    if prev_sample is None:
        noise = torch.randn(sample.shape, generator=generator, device="cpu").to(sample)
        prev_sample = mean + std * noise
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * std ** 2) - torch.log(std)
                - math.log(math.sqrt(2 * math.pi)))
    return prev_sample, log_prob.mean(dim=tuple(range(1, sample.ndim)))


class Diffusion:
    """The pieces of a Stable Diffusion pipeline that training uses: text embeddings (frozen
    encoder, cached), guided UNet outputs, decoding, seeded sampling, the denoising loss and the
    backward pass (with fp16's loss scaling)."""

    def __init__(self, pipeline, denoise_steps: int, guidance: float, mixed_precision: str = "fp32"):
        self.pipe, self.unet, self.vae = pipeline, pipeline.unet, pipeline.vae
        self.scheduler = pipeline.scheduler
        self.scheduler.set_timesteps(denoise_steps)
        self.timesteps = [int(t) for t in self.scheduler.timesteps]
        self.guidance = guidance
        self.device = pipeline.device
        self.autocast_dtype = AUTOCAST_DTYPES.get(mixed_precision)
        # fp16's narrow range flushes small gradients to zero: the loss is scaled up for the backward
        # pass, as the papers' code does through accelerate (a pass-through otherwise)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=mixed_precision == "fp16")
        self._embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        size = self.unet.config.sample_size
        self.latent_shape = (self.unet.config.in_channels, size, size)

    def embed(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(caption embeddings, empty-prompt embeddings) for a batch of texts."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._embeddings]
        if missing:
            with torch.no_grad():
                cond, uncond = self.pipe.encode_prompt(missing, self.device, 1, True)
            for i, text in enumerate(missing):
                self._embeddings[text] = (cond[i], uncond[i])
        return (torch.stack([self._embeddings[t][0] for t in texts]),
                torch.stack([self._embeddings[t][1] for t in texts]))

    def guided(self, latents: torch.Tensor, t: int, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """Classifier-free-guided UNet output."""
        if self.guidance == 1.0:
            return self.predict(latents, t, cond)
        out_uncond, out_cond = self.predict(torch.cat([latents, latents]), t, torch.cat([uncond, cond])).chunk(2)
        return out_uncond + self.guidance * (out_cond - out_uncond)

    def predict(self, latents: torch.Tensor, t, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's unguided output, in fp32 whatever the autocast precision."""
        with self.autocast():
            return self.unet(latents, t, encoder_hidden_states=cond).sample.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in [0, 1] (differentiable)."""
        with self.autocast():
            images = self.vae.decode(latents / self.vae.config.scaling_factor).sample.float()
        return (images / 2 + 0.5).clamp(0, 1)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of `loss` (scaled under fp16; `_update` unscales them)."""
        self.scaler.scale(loss).backward()

    @functools.cached_property
    def ddpm(self):
        """The stochastic DDPM sampler on the same noise schedule and timesteps (ReFL.py's)."""
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(len(self.timesteps))
        return scheduler

    def initial_latents(self, seeds: list[int]) -> torch.Tensor:
        return torch.stack([torch.randn(self.latent_shape, generator=torch.Generator("cpu").manual_seed(s))
                            for s in seeds]).to(self.device) * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def sample(self, texts: list[str], seeds: list[int], batch_size: int = 16) -> torch.Tensor:
        """Final latents of deterministic DDIM (eta = 0) from per-image seeds."""
        out = []
        for first in range(0, len(texts), batch_size):
            cond, uncond = self.embed(texts[first:first + batch_size])
            latents = self.initial_latents(seeds[first:first + batch_size])
            for t in self.timesteps:
                latents = self.scheduler.step(self.guided(latents, t, cond, uncond), t, latents).prev_sample
            out.append(latents)
        return torch.cat(out)

    def denoising_loss_inputs(self, latents: torch.Tensor, generator: torch.Generator):
        """A random training timestep per latent, the noised latents and the regression target."""
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        t = t.to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        prediction_type = self.scheduler.config.prediction_type
        target = noise if prediction_type == "epsilon" else latents if prediction_type == "sample" else \
            self.scheduler.get_velocity(latents, noise, t)
        return noisy, t, target


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).mean(dim=tuple(range(1, a.ndim)))


def add_lora(unet, rank: int, alpha: float, seed: int) -> list[torch.nn.Parameter]:
    """A LoRA adapter on the UNet's attention projections; the base weights stay frozen. The
    adapter starts as the identity (B = 0), so step 0 is the base model; its A comes from `seed`."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    with seeded_init(seed):
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=LORA_TARGETS))
    return [p for p in unet.parameters() if p.requires_grad]


def save_adapter(unet, folder: Path) -> Path:
    """The adapter in diffusers' LoRA format, the file `apply_lora` loads."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    return folder / ADAPTER_FILE


class _BaseModel:
    """Inside the block the UNet is the frozen base model (the adapter is switched off)."""

    def __init__(self, unet):
        self.unet = unet

    def __enter__(self):
        self.unet.disable_adapters()

    def __exit__(self, *exc):
        self.unet.enable_adapters()


# --- DDPO's per-prompt reward normalisation ----------------------------------------------------
@dataclass
class PerPromptStats:
    """ddpo-pytorch's per-prompt stat tracker: a reward's advantage is its z-score among the last
    `buffer` rewards of its prompt; until a prompt has `min_count`, the batch's statistics."""
    buffer: int
    min_count: int
    history: dict[str, list[float]] = field(default_factory=dict)

    def advantages(self, prompt_ids: list[str], rewards: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(rewards)
        for prompt_id in dict.fromkeys(prompt_ids):
            rows = [i for i, p in enumerate(prompt_ids) if p == prompt_id]
            values = rewards[rows]
            seen = (self.history.get(prompt_id, []) + values.tolist())[-self.buffer:]
            self.history[prompt_id] = seen
            pool = torch.tensor(seen) if len(seen) >= self.min_count else rewards
            out[rows] = (values - pool.mean()) / (pool.std(unbiased=False) + 1e-6)
        return out


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
    stats = PerPromptStats(config.stats_buffer, config.stats_min_count)
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
    data = _training_data(store, diffusion, reward, prompts, config, folder, [identity, *rewards])
    start_step, checkpoints, loss, training_seconds = step, [], float("nan"), 0.0
    with progress_bar(f"fine-tuning ({config.algo})", max(config.steps - step, 0), unit="steps") as advance:
        while step < config.steps:
            began = time.perf_counter()
            metrics = _update(diffusion, reward, prompts, config, data, rng, stats, step, params, optimizer)
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


def _update(diffusion, reward, prompts, config: FinetuneConfig, data, rng, stats, step, params,
            optimizer) -> dict[str, float]:
    """One optimizer step of `config.algo`: its loss's gradients, clipped to `max_grad_norm`, applied;
    the step's metrics."""
    optimizer.zero_grad(set_to_none=True)
    metrics = TRAINERS[config.algo](diffusion, reward, prompts, config, data, rng, stats, step)
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
        from tasks.generate import image_seed

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
            with _BaseModel(self.diffusion.unet):
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
                   folder: Path, sources: list[str]) -> dict | None:
    if config.algo == "ddpo":
        return None
    if config.algo == "rwr":
        data_fields = json.dumps({k: getattr(config, k) for k in RWR_DATA_FIELDS}, sort_keys=True)
        key = stable_id("rwr-data", data_fields, *sources, *(p for p, _ in prompts))[:12]
        path = store.adapters_dir / f"rwr-data-{key}.pt"
    else:
        path = folder / "training_data.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    data = _rwr_data(diffusion, reward, prompts, config) if config.algo == "rwr" else \
        _pretraining_pairs(store, diffusion, prompts, config)
    partial = path.with_name(f".{path.name}.tmp")
    torch.save(data, partial)
    partial.rename(path)  # a crash mid-write leaves no file that a re-run would load
    return data


def _rwr_data(diffusion: Diffusion, reward: OnlineReward, prompts, config: FinetuneConfig) -> dict:
    """N base-model images per prompt, the top K by the reward, with their weights."""
    from tasks.generate import image_seed

    latents, rewards, kept_texts, pool = [], [], [], []
    for pid, text in prompts:
        seeds = [image_seed(pid, i, config.seed) for i in range(config.images_per_prompt)]
        with torch.no_grad(), _BaseModel(diffusion.unet):
            made = diffusion.sample([text] * len(seeds), seeds)
            values = reward(diffusion.decode(made), [pid] * len(seeds))
        top = torch.argsort(values, descending=True, stable=True)[:config.keep]
        latents.append(made[top])
        rewards.append(values[top])
        kept_texts += [text] * len(top)
        pool.append(values)
    rewards, pool = torch.cat(rewards), torch.cat(pool)
    in_unit = bool(pool.min() >= 0 and pool.max() <= 1)
    weights = rewards if in_unit else (rewards - pool.min()) / (pool.max() - pool.min()).clamp_min(1e-12)
    return {"latents": torch.cat(latents), "texts": kept_texts, "weights": weights, "rewards": rewards}


def _pretraining_pairs(store: Store, diffusion: Diffusion, prompts, config: FinetuneConfig) -> dict:
    """ReFL's (caption, image) pairs: the store's images of the training prompts (files with
    pixels), encoded by the VAE; the base model's images when the store has none."""
    import numpy as np
    from PIL import Image

    from tasks.generate import image_seed

    rows = store.connect().execute(
        """SELECT p.text, i.path FROM images i JOIN prompts p USING (prompt_id)
           WHERE i.path IS NOT NULL AND i.prompt_id IN (SELECT unnest(?)) ORDER BY i.prompt_id, i.ordinal""",
        [[p for p, _ in prompts]]).fetchall()
    rows = [(text, path) for text, path in rows if Path(path).is_file()]
    size = diffusion.latent_shape[-1] * diffusion.pipe.vae_scale_factor
    if rows:
        latents = []
        for text, path in rows:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32)
            x = torch.from_numpy(pixels / 127.5 - 1).permute(2, 0, 1)[None].to(diffusion.device)
            with torch.no_grad():
                latents.append(diffusion.vae.encode(x).latent_dist.mean * diffusion.vae.config.scaling_factor)
        return {"latents": torch.cat(latents), "texts": [t for t, _ in rows], "source": "store images"}
    pairs = [(text, image_seed(pid, i, config.seed)) for pid, text in prompts
             for i in range(config.pretrain_images_per_prompt)]
    with _BaseModel(diffusion.unet):
        latents = diffusion.sample([t for t, _ in pairs], [s for _, s in pairs])
    return {"latents": latents, "texts": [t for t, _ in pairs], "source": "base model images"}


# --- one optimizer step of each algorithm (gradients accumulated, not applied) -----------------
def _rwr_step(diffusion: Diffusion, reward, prompts, config, data, rng, stats, step) -> dict[str, float]:
    rows = torch.randint(0, len(data["texts"]), (config.batch_size,), generator=rng)
    latents = data["latents"][rows]
    cond, _ = diffusion.embed([data["texts"][i] for i in rows])
    noisy, t, target = diffusion.denoising_loss_inputs(latents, rng)
    prediction = diffusion.predict(noisy, t, cond)
    loss = (data["weights"][rows].to(prediction) * _per_sample_mse(prediction, target)).mean()
    if config.kl_beta > 0:
        with torch.no_grad(), _BaseModel(diffusion.unet):
            base = diffusion.predict(noisy, t, cond)
        # Fan et al.'s KL is a distance of noise predictions: ε, not the raw outputs (for v-prediction
        # their distance is ᾱ_t times v's)
        _, noise = predict_x0_and_noise(diffusion.scheduler, prediction, t, noisy)
        _, base_noise = predict_x0_and_noise(diffusion.scheduler, base, t, noisy)
        loss = loss + config.kl_beta * _per_sample_mse(noise, base_noise).mean()
    diffusion.backward(loss)
    return {"loss": float(loss.detach())}


def _ddpo_step(diffusion: Diffusion, reward, prompts, config, data, rng, stats, step) -> dict[str, float]:
    """One iteration: sample `samples_per_iteration` trajectories with the current policy,
    normalise rewards per prompt, accumulate the clipped surrogate's gradient over every
    timestep of every sample (minibatches of `batch_size`), one update. Besides the loss, trl's
    diagnostics over all (sample, timestep) pairs: approx_kl, half the mean squared log-ratio of
    the trained to the sampling policy, and clipfrac, the share of ratios outside the clip range."""
    n = config.samples_per_iteration
    chosen = torch.randint(0, len(prompts), (n,), generator=rng).tolist()
    prompt_ids, texts = [prompts[i][0] for i in chosen], [prompts[i][1] for i in chosen]
    cond, uncond = diffusion.embed(texts)
    latents = torch.randn((n, *diffusion.latent_shape), generator=rng).to(diffusion.device)
    latents = latents * diffusion.scheduler.init_noise_sigma
    trajectory, old_log_probs = [latents], []
    with torch.no_grad():
        for t in diffusion.timesteps:
            output = diffusion.guided(latents, t, cond, uncond)
            latents, log_prob = ddim_step_with_logprob(diffusion.scheduler, output, t, latents, config.eta, rng)
            trajectory.append(latents)
            old_log_probs.append(log_prob)
        rewards = reward(diffusion.decode(latents), prompt_ids)
    advantages = stats.advantages(prompt_ids, rewards).clamp(-config.adv_clip_max, config.adv_clip_max)
    total, log_ratios = 0.0, []
    scale = 1.0 / (len(diffusion.timesteps) * math.ceil(n / config.batch_size))
    for first in range(0, n, config.batch_size):
        rows = slice(first, first + config.batch_size)
        for j, t in enumerate(diffusion.timesteps):
            output = diffusion.guided(trajectory[j][rows], t, cond[rows], uncond[rows])
            _, log_prob = ddim_step_with_logprob(diffusion.scheduler, output, t, trajectory[j][rows], config.eta,
                                                 prev_sample=trajectory[j + 1][rows])
            log_ratio = log_prob - old_log_probs[j][rows]
            ratio = torch.exp(log_ratio)
            adv = advantages[rows]
            loss = torch.maximum(-adv * ratio,
                                 -adv * ratio.clamp(1 - config.clip_range, 1 + config.clip_range)).mean() * scale
            diffusion.backward(loss)
            total += float(loss.detach())
            log_ratios.append(log_ratio.detach())
    log_ratios = torch.cat(log_ratios)
    return {"loss": total, "approx_kl": float(0.5 * (log_ratios ** 2).mean()),
            "clipfrac": float(((log_ratios.exp() - 1).abs() > config.clip_range).float().mean())}


def _refl_step(diffusion: Diffusion, reward, prompts, config, data, rng, stats, step) -> dict[str, float]:
    """Pre-training loss on a batch of (caption, image) pairs plus λ·ReLU(margin − r) on images
    predicted (x0) after a random number of no-grad denoising steps and one step with gradients,
    all sampled as `config.refl_sampler` says."""
    rows = torch.randint(0, len(data["texts"]), (config.batch_size,), generator=rng)
    cond, _ = diffusion.embed([data["texts"][i] for i in rows])
    noisy, t, target = diffusion.denoising_loss_inputs(data["latents"][rows], rng)
    pretrain = _per_sample_mse(diffusion.predict(noisy, t, cond), target).mean()
    chosen = torch.randint(0, len(prompts), (config.batch_size,), generator=rng).tolist()
    prompt_ids, texts = [prompts[i][0] for i in chosen], [prompts[i][1] for i in chosen]
    cond, uncond = diffusion.embed(texts)
    latents = torch.randn((len(chosen), *diffusion.latent_shape), generator=rng).to(diffusion.device)
    latents = latents * diffusion.scheduler.init_noise_sigma
    stop = int(torch.randint(config.refl_start, config.refl_end + 1, (1,), generator=rng))
    as_reference = config.refl_sampler == "ddpm"  # ReFL.py: DDPM's steps on the conditional output alone
    sampler = diffusion.ddpm if as_reference else diffusion.scheduler

    def unet_output(latents, t):
        return diffusion.predict(latents, t, cond) if as_reference else diffusion.guided(latents, t, cond, uncond)

    with torch.no_grad():
        for t in diffusion.timesteps[:stop]:
            latents = sampler.step(unet_output(latents, t), t, latents, generator=rng).prev_sample
    t = diffusion.timesteps[stop]
    x0, _ = predict_x0_and_noise(diffusion.scheduler, unet_output(latents, t), t, latents)
    values = reward(diffusion.decode(x0), prompt_ids)
    loss = pretrain + config.refl_lambda * torch.relu(config.refl_margin - values).mean()
    diffusion.backward(loss)
    return {"loss": float(loss.detach())}


TRAINERS = {"rwr": _rwr_step, "ddpo": _ddpo_step, "refl": _refl_step}


# --- checkpoint comparison with the base model ---------------------------------------------------
def checkpoint_win_counts(model: str, checkpoints: list[str | Path], prompts: list[tuple[str, str]],
                          reward: OnlineReward, seeds: list[int], weights: str = "pretrained",
                          denoise_steps: int = 50, guidance: float = 7.5, device: str = "cpu") -> list[int]:
    """For each checkpoint (an adapter file or folder): how many of its images beat the base
    model's image of the same prompt and seed under the reward. Images come from a fresh
    `create_pipeline(model, weights)` with each adapter loaded by `apply_lora` (deterministic DDIM)."""
    from tia2.models.diffusion import apply_lora, create_pipeline

    generator = create_pipeline(model, weights=weights, device=device)
    diffusion = Diffusion(generator.pipeline, denoise_steps, guidance)
    prompt_ids = [pid for pid, _ in prompts for _ in seeds]
    texts = [text for _, text in prompts for _ in seeds]
    all_seeds = list(seeds) * len(prompts)

    def rewards() -> torch.Tensor:
        with torch.no_grad():
            return reward(diffusion.decode(diffusion.sample(texts, all_seeds)), prompt_ids)

    base = rewards()
    counts = []
    for path in checkpoints:
        apply_lora(generator, path)
        counts.append(int((rewards() > base).sum()))
        generator.pipeline.unload_lora_weights()
    return counts


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
    label = config.algo + (f" kl_beta={config.kl_beta:g}" if config.algo == "rwr" else "")  # RWR's sweep: a run per β
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
    return KlSweep({beta: record_finetune(store, model, replace(config, kl_beta=beta), **record_options)
                    for beta in betas})
