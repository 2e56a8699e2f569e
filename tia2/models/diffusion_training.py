"""Diffusion mechanics for training a generator's UNet: `Diffusion` (a pipeline's pieces with
gradients: cached text embeddings, guided UNet outputs, decoding, seeded sampling, the denoising
loss's inputs, the backward pass with fp16's loss scaling), the scheduler arithmetic the
fine-tuning algorithms share (`predict_x0_and_noise`; `ddim_step_with_logprob`, the per-step
log-probabilities of ddpo-pytorch's diffusers patch) and the trained LoRA adapter (`add_lora`,
`adapter_disabled`).

A module of its own beside `diffusion.py` rather than in it: `diffusion.py` builds generators and
loads their adapters for inference (what generation and evaluation import), this one is what
changes a UNet's weights (`tia2.finetuning`'s algorithms, the pre-trained tiny-sd of
`trained_tiny.py`); neither uses the other's code. The adapter's file format stays in one place,
`diffusion.py` (`ADAPTER_FILE`, `save_adapter`, `apply_lora`).
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager

import torch

from tia2.errors import UserError
from tia2.seeding import seeded_init

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # mixed precisions; fp32 runs without autocast
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the UNet's attention projections


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


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The mean squared difference of each sample's values: one number per row of the batch."""
    return ((a - b) ** 2).mean(dim=tuple(range(1, a.ndim)))


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
        """Accumulate the gradients of `loss` (scaled under fp16: unscale them through `scaler`
        before clipping or applying them)."""
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


def add_lora(unet, rank: int, alpha: float, seed: int) -> list[torch.nn.Parameter]:
    """A LoRA adapter on the UNet's attention projections; the base weights stay frozen. The
    adapter starts as the identity (B = 0), so step 0 is the base model; its A comes from `seed`."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    with seeded_init(seed):
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=LORA_TARGETS))
    return [p for p in unet.parameters() if p.requires_grad]


@contextmanager
def adapter_disabled(unet):
    """Inside the block the UNet is the frozen base model: its adapter is switched off."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()
