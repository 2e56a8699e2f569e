"""ReFL (ImageReward paper, Algorithm 1).

Denoise without gradients to a random step in [refl_start, refl_end] of T steps (paper: T = 40,
the gradient step after 30..39 steps), one step with gradients, predict x0, decode with the VAE,
reward through the differentiable spec. `refl_sampler` says how: "ddpm", the default, samples as
ImageReward's ReFL.py does (stochastic DDPM steps on the conditional UNet output without
guidance, at the gradient step too); "ddim" with deterministic DDIM and classifier-free guidance.
The loss is λ·ReLU(margin − r) (λ = 1e-3; margin 2 as in the ImageReward code) plus the
pre-training denoising loss on (caption, image) pairs (`pretraining_pairs`): the store's images of
the training prompts, or, when the store has none, images the base model makes at the start.
Algorithm 1 updates twice per iteration (pre-training loss, then ReFL loss); here one update takes
the sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tia2.models.diffusion_training import Diffusion, adapter_disabled, per_sample_mse, predict_x0_and_noise
from tia2.seeding import image_seed
from tia2.store import Store


@dataclass(frozen=True)
class ReflSettings:
    refl_lambda: float = 1e-3   # λ, the weight of the reward loss
    refl_margin: float = 2.0    # the reward above which the loss is zero
    refl_start: int = 30        # the gradient step comes after refl_start..refl_end no-grad steps
    refl_end: int = 39
    # the UNet calls of the reward branch: "ddpm" as ReFL.py (stochastic DDPM steps, the conditional
    # output alone, at the gradient step too), "ddim" deterministic DDIM with the run's guidance
    refl_sampler: str = "ddpm"
    pretrain_images_per_prompt: int = 4  # base-model pre-training images, when the store has none


def pretraining_pairs(store: Store, diffusion: Diffusion, prompts: list[tuple[str, str]], settings: ReflSettings,
                      seed: int) -> dict:
    """ReFL's (caption, image) pairs, {"latents", "texts", "source"}: the store's images of the
    training prompts (files with pixels), encoded by the VAE; the base model's images (seeds of
    `seed`) when the store has none."""
    import numpy as np
    from PIL import Image

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
    pairs = [(text, image_seed(pid, i, seed)) for pid, text in prompts
             for i in range(settings.pretrain_images_per_prompt)]
    with adapter_disabled(diffusion.unet):
        latents = diffusion.sample([t for t, _ in pairs], [s for _, s in pairs])
    return {"latents": latents, "texts": [t for t, _ in pairs], "source": "base model images"}


def step(diffusion: Diffusion, reward, prompts: list[tuple[str, str]], settings: ReflSettings, pairs: dict,
         rng: torch.Generator, batch_size: int) -> dict[str, float]:
    """Pre-training loss on `batch_size` (caption, image) pairs plus λ·ReLU(margin − r) on images
    predicted (x0) after a random number of no-grad denoising steps and one step with gradients,
    all sampled as `settings.refl_sampler` says."""
    rows = torch.randint(0, len(pairs["texts"]), (batch_size,), generator=rng)
    cond, _ = diffusion.embed([pairs["texts"][i] for i in rows])
    noisy, t, target = diffusion.denoising_loss_inputs(pairs["latents"][rows], rng)
    pretrain = per_sample_mse(diffusion.predict(noisy, t, cond), target).mean()
    chosen = torch.randint(0, len(prompts), (batch_size,), generator=rng).tolist()
    prompt_ids, texts = [prompts[i][0] for i in chosen], [prompts[i][1] for i in chosen]
    cond, uncond = diffusion.embed(texts)
    latents = torch.randn((len(chosen), *diffusion.latent_shape), generator=rng).to(diffusion.device)
    latents = latents * diffusion.scheduler.init_noise_sigma
    stop = int(torch.randint(settings.refl_start, settings.refl_end + 1, (1,), generator=rng))
    as_reference = settings.refl_sampler == "ddpm"  # ReFL.py: DDPM's steps on the conditional output alone
    sampler = diffusion.ddpm if as_reference else diffusion.scheduler

    def unet_output(latents, t):
        return diffusion.predict(latents, t, cond) if as_reference else diffusion.guided(latents, t, cond, uncond)

    with torch.no_grad():
        for t in diffusion.timesteps[:stop]:
            latents = sampler.step(unet_output(latents, t), t, latents, generator=rng).prev_sample
    t = diffusion.timesteps[stop]
    x0, _ = predict_x0_and_noise(diffusion.scheduler, unet_output(latents, t), t, latents)
    values = reward(diffusion.decode(x0), prompt_ids)
    loss = pretrain + settings.refl_lambda * torch.relu(settings.refl_margin - values).mean()
    diffusion.backward(loss)
    return {"loss": float(loss.detach())}
