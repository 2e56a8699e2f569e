"""tiny-sd after a minute of denoising pre-training: a generator for checking fine-tuning.

tiny-sd as built has a random UNet, whose samples are not what its denoiser regresses to, so the
rewards of its images cannot be raised by RWR or DDPO at CPU scale (tests/test_finetune.py has
the measurements). Pre-training the whole UNet on a few pictures per prompt (coloured discs,
latents scaled to unit variance as SD's VAE scaling factor was chosen) gives a model whose
samples land near its training latents, so selecting and fitting some of them moves its output.
The VAE and text encoder stay tiny-sd's random ones.
"""

from __future__ import annotations

import numpy as np
import torch

from tia2.models.diffusion import Generator, create_pipeline
from tia2.models.diffusion_training import Diffusion


def disc_pictures(count: int, size: int, seed: int) -> torch.Tensor:
    """`count` pictures of a coloured disc on a coloured background, [count, 3, size, size] in [-1, 1]."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    pictures = []
    for _ in range(count):
        background, colour = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
        x, y = rng.integers(size // 4, 3 * size // 4, 2)
        radius = rng.integers(size // 8, size // 4)
        picture = Image.new("RGB", (size, size), background)
        ImageDraw.Draw(picture).ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
        pictures.append(torch.from_numpy(np.asarray(picture, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
    return torch.stack(pictures)


def trained_tiny_sd(texts: list[str], size: int = 16, pictures_per_text: int = 4, steps: int = 800,
                    learning_rate: float = 1e-3, batch_size: int = 8, seed: int = 0,
                    device: str = "cpu") -> tuple[Generator, torch.Tensor]:
    """tiny-sd making `size`-px images, its UNet trained for `steps` AdamW steps on the denoising
    loss of `pictures_per_text` disc pictures per text. Returns the generator and the training
    latents ([len(texts) * pictures_per_text, 4, size/2, size/2], grouped by text). 16 px (8x8
    latents) and 800 steps take about a minute on one CPU thread."""
    generator = create_pipeline("tiny-sd", seed=seed, device=device)
    pipeline = generator.pipeline
    pipeline.unet.register_to_config(sample_size=size // pipeline.vae_scale_factor)
    captions = [t for t in texts for _ in range(pictures_per_text)]
    with torch.no_grad():
        latents = pipeline.vae.encode(disc_pictures(len(captions), size, seed).to(device)).latent_dist.mean
    scaling_factor = 1 / float(latents.std())
    pipeline.vae.register_to_config(scaling_factor=scaling_factor)
    latents = latents * scaling_factor
    diffusion = Diffusion(pipeline, denoise_steps=1, guidance=1.0)
    optimizer = torch.optim.AdamW(pipeline.unet.parameters(), lr=learning_rate)
    rng = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, len(captions), (batch_size,), generator=rng)
        noisy, t, target = diffusion.denoising_loss_inputs(latents[rows], rng)
        cond, _ = diffusion.embed([captions[i] for i in rows])
        loss = ((diffusion.predict(noisy, t, cond) - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pipeline.unet.requires_grad_(False)
    generator.identity = f"disc-pretrained:{size}px:{steps}steps:seed{seed}"
    return generator, latents
