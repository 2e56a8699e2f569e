"""Reward-weighted regression (TextNorm paper eq. 4, after Lee et al. 2023).

Per prompt the base model makes N images (paper 100), the top K (paper 10) by the reward form the
data set (`top_k_data`), and the LoRA weights minimise (`step`)

    E[w · ||ε̂_θ − target||²] + β · E[||ε̂_θ − ε̂_θ0||²]

(the target is the UNet's parametrisation, ε or v; the penalty compares noise predictions ε
whatever it is). The weight w is the reward when the spec's values lie in [0, 1] (TextNorm's do),
else the reward min-max normalised over the generated pool (ImageReward paper, Appendix E,
reproducing Lee et al.).

Eq. 4's β log(p_θ/p_θ0) is the KL regulariser of Fan et al. 2023, which the paper cites: for two
diffusion models the per-step KL of their Gaussian transitions is proportional to the squared
distance of their noise predictions on the same noisy input, so that distance, to the frozen base
(LoRA disabled), is the penalty. β is picked from {0, 0.25, 0.5, 0.75, 1} by the paper's rule
(Appendix A.2: "the one that yielded the most improvement"): the stage's `sweep_kl_coefficient`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tia2.models.diffusion_training import Diffusion, adapter_disabled, per_sample_mse, predict_x0_and_noise
from tia2.seeding import image_seed


@dataclass(frozen=True)
class RwrSettings:
    images_per_prompt: int = 100  # N, the base model's images per prompt
    keep: int = 10                # K, the top images per prompt that are trained on
    kl_beta: float = 0.5          # β, the weight of the distance to the base model


def top_k_data(diffusion: Diffusion, reward, prompts: list[tuple[str, str]], settings: RwrSettings,
               seed: int) -> dict:
    """N base-model images per prompt (deterministic DDIM from seeds of `seed`), the top K by the
    reward, with their weights: {"latents", "texts", "weights", "rewards"}."""
    latents, rewards, kept_texts, pool = [], [], [], []
    for pid, text in prompts:
        seeds = [image_seed(pid, i, seed) for i in range(settings.images_per_prompt)]
        with torch.no_grad(), adapter_disabled(diffusion.unet):
            made = diffusion.sample([text] * len(seeds), seeds)
            values = reward(diffusion.decode(made), [pid] * len(seeds))
        top = torch.argsort(values, descending=True, stable=True)[:settings.keep]
        latents.append(made[top])
        rewards.append(values[top])
        kept_texts += [text] * len(top)
        pool.append(values)
    rewards, pool = torch.cat(rewards), torch.cat(pool)
    in_unit = bool(pool.min() >= 0 and pool.max() <= 1)
    weights = rewards if in_unit else (rewards - pool.min()) / (pool.max() - pool.min()).clamp_min(1e-12)
    return {"latents": torch.cat(latents), "texts": kept_texts, "weights": weights, "rewards": rewards}


def step(diffusion: Diffusion, reward, prompts, settings: RwrSettings, data: dict, rng: torch.Generator,
         batch_size: int) -> dict[str, float]:
    """The reward-weighted denoising loss on `batch_size` rows of the top-K data plus β times the
    distance of the noise predictions to the base model's. The reward is in the data's weights."""
    rows = torch.randint(0, len(data["texts"]), (batch_size,), generator=rng)
    latents = data["latents"][rows]
    cond, _ = diffusion.embed([data["texts"][i] for i in rows])
    noisy, t, target = diffusion.denoising_loss_inputs(latents, rng)
    prediction = diffusion.predict(noisy, t, cond)
    loss = (data["weights"][rows].to(prediction) * per_sample_mse(prediction, target)).mean()
    if settings.kl_beta > 0:
        with torch.no_grad(), adapter_disabled(diffusion.unet):
            base = diffusion.predict(noisy, t, cond)
        # Fan et al.'s KL is a distance of noise predictions: ε, not the raw outputs (for v-prediction
        # their distance is ᾱ_t times v's)
        _, noise = predict_x0_and_noise(diffusion.scheduler, prediction, t, noisy)
        _, base_noise = predict_x0_and_noise(diffusion.scheduler, base, t, noisy)
        loss = loss + settings.kl_beta * per_sample_mse(noise, base_noise).mean()
    diffusion.backward(loss)
    return {"loss": float(loss.detach())}
