"""DDPO (TextNorm paper eq. 5, Black et al. 2023): the DDPO-IS loop of ddpo-pytorch / trl.

DDIM sampling with eta > 0 and the log-probability of every step (`ddim_step_with_logprob`),
rewards normalised per prompt (`PerPromptStats`), a PPO-clipped policy gradient summed over
timesteps, one gradient update per iteration (TextNorm Table 4). Like trl's defaults that the paper
used, no KL term; like trl, each step reports the approximate KL to the sampling policy and the
clipped fraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tia2.models.diffusion_training import Diffusion, ddim_step_with_logprob


@dataclass(frozen=True)
class DdpoSettings:
    samples_per_iteration: int = 256  # trajectories sampled per step, trained on in minibatches
    eta: float = 1.0                  # the DDIM sampler's stochasticity (> 0: step log-probabilities)
    clip_range: float = 1e-4          # PPO's clip of the probability ratio
    adv_clip_max: float = 5.0         # advantages are clipped to ± this
    stats_buffer: int = 16            # rewards per prompt that its statistics remember
    stats_min_count: int = 16         # rewards a prompt needs before its own statistics are used


@dataclass
class PerPromptStats:
    """ddpo-pytorch's per-prompt stat tracker: a reward's advantage is its z-score among the last
    `buffer` rewards of its prompt; until a prompt has `min_count`, the batch's statistics. The
    history is part of a run's training state (an exact resume)."""
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


def step(diffusion: Diffusion, reward, prompts: list[tuple[str, str]], settings: DdpoSettings,
         stats: PerPromptStats, rng: torch.Generator, batch_size: int) -> dict[str, float]:
    """One iteration: sample `samples_per_iteration` trajectories with the current policy,
    normalise rewards per prompt, accumulate the clipped surrogate's gradient over every
    timestep of every sample (minibatches of `batch_size`), one update. Besides the loss, trl's
    diagnostics over all (sample, timestep) pairs: approx_kl, half the mean squared log-ratio of
    the trained to the sampling policy, and clipfrac, the share of ratios outside the clip range."""
    n = settings.samples_per_iteration
    chosen = torch.randint(0, len(prompts), (n,), generator=rng).tolist()
    prompt_ids, texts = [prompts[i][0] for i in chosen], [prompts[i][1] for i in chosen]
    cond, uncond = diffusion.embed(texts)
    latents = torch.randn((n, *diffusion.latent_shape), generator=rng).to(diffusion.device)
    latents = latents * diffusion.scheduler.init_noise_sigma
    trajectory, old_log_probs = [latents], []
    with torch.no_grad():
        for t in diffusion.timesteps:
            output = diffusion.guided(latents, t, cond, uncond)
            latents, log_prob = ddim_step_with_logprob(diffusion.scheduler, output, t, latents, settings.eta, rng)
            trajectory.append(latents)
            old_log_probs.append(log_prob)
        rewards = reward(diffusion.decode(latents), prompt_ids)
    advantages = stats.advantages(prompt_ids, rewards).clamp(-settings.adv_clip_max, settings.adv_clip_max)
    total, log_ratios = 0.0, []
    scale = 1.0 / (len(diffusion.timesteps) * math.ceil(n / batch_size))
    for first in range(0, n, batch_size):
        rows = slice(first, first + batch_size)
        for j, t in enumerate(diffusion.timesteps):
            output = diffusion.guided(trajectory[j][rows], t, cond[rows], uncond[rows])
            _, log_prob = ddim_step_with_logprob(diffusion.scheduler, output, t, trajectory[j][rows], settings.eta,
                                                 prev_sample=trajectory[j + 1][rows])
            log_ratio = log_prob - old_log_probs[j][rows]
            ratio = torch.exp(log_ratio)
            adv = advantages[rows]
            loss = torch.maximum(-adv * ratio,
                                 -adv * ratio.clamp(1 - settings.clip_range, 1 + settings.clip_range)).mean() * scale
            diffusion.backward(loss)
            total += float(loss.detach())
            log_ratios.append(log_ratio.detach())
    log_ratios = torch.cat(log_ratios)
    return {"loss": total, "approx_kl": float(0.5 * (log_ratios ** 2).mean()),
            "clipfrac": float(((log_ratios.exp() - 1).abs() > settings.clip_range).float().mean())}
