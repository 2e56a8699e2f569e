"""Check: how well DDPO's policy-gradient estimate points along the true gradient, by samples.

    .venv/bin/python benchmarks/ddpo_gradient_check.py                      # 16 px, CPU
    .venv/bin/python benchmarks/ddpo_gradient_check.py --size 8 --samples 64 256
    .venv/bin/python benchmarks/ddpo_gradient_check.py --device cuda --samples 512 4096 32768

On tiny-sd after denoising pre-training (`tia2.models.trained_tiny`), with a fresh LoRA adapter
and tiny-clip as the reward: the exact gradient of the expected per-prompt z-scored reward under
DDPO's sampler (DDIM, eta 1, reparameterised: the sampler's noise is an input, so the reward is
differentiated through every step) against `ddpo.step`'s estimate from N trajectories. Prints
their cosine for each N (two seeds), and the cosine of two independent exact estimates (how
well the target itself is known). A cosine near 0 means DDPO needs more samples per iteration
than N before its updates follow the reward: why tests/test_finetune.py asserts DDPO's gain on
tiny-sd only on a GPU (8192 samples an iteration) and on a toy model elsewhere.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.finetune import OnlineReward, paper_config  # noqa: E402
from tia2.finetuning import ddpo  # noqa: E402
from tia2.finetuning.ddpo import PerPromptStats  # noqa: E402
from tia2.models.diffusion_training import Diffusion, add_lora, ddim_step_with_logprob  # noqa: E402
from tia2.models.trained_tiny import trained_tiny_sd  # noqa: E402
from tia2.store import Store, stable_id  # noqa: E402

TEXTS = ["a photo of two cats", "three red apples on a table"]
PROMPTS = [(stable_id("check", t), t) for t in TEXTS]
UNLIMITED = 10 ** 9  # per-prompt statistics over the batch alone


def check_store(path: Path) -> Store:
    """A store holding the check's prompts (OnlineReward reads their texts there)."""
    store = Store(path)
    store.upsert("prompts", pa.Table.from_pylist([
        dict(prompt_id=p, text=t, set="check", category=None, subcategory=None, source="check") for p, t in PROMPTS]))
    return store


def gradient(params) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in params])


def exact_gradient(diffusion, reward, prompts, params, samples: int, seed: int, batch: int) -> torch.Tensor:
    """∇ of Σ_prompt mean(r)/std(r) over `samples` trajectories of the eta-1 sampler (the std
    held constant, as DDPO's z-scores are)."""
    rng = torch.Generator().manual_seed(seed)
    chosen = torch.randint(0, len(prompts), (samples,), generator=rng).tolist()
    initial = torch.randn((samples, *diffusion.latent_shape), generator=rng) * diffusion.scheduler.init_noise_sigma
    values = torch.cat([_rewards(diffusion, reward, prompts, chosen[first:first + batch],
                                 initial[first:first + batch], rng) for first in range(0, samples, batch)])
    ids = torch.tensor(chosen, device=values.device)
    weights = torch.zeros_like(values)
    for prompt in set(chosen):
        rows = ids == prompt
        weights[rows] = 1 / (values.detach()[rows].std() * rows.sum())
    for p in params:
        p.grad = None
    (values * weights).sum().backward()
    return gradient(params)


def _rewards(diffusion, reward, prompts, chosen, latents, rng) -> torch.Tensor:
    cond, _ = diffusion.embed([prompts[i][1] for i in chosen])
    latents = latents.to(diffusion.device)
    for t in diffusion.timesteps:
        latents, _ = ddim_step_with_logprob(diffusion.scheduler, diffusion.predict(latents, t, cond), t, latents,
                                            1.0, rng)
    return reward(diffusion.decode(latents), [prompts[i][0] for i in chosen])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16, help="image size in pixels (latents are half)")
    parser.add_argument("--samples", type=int, nargs="+", default=[32, 128, 512], help="DDPO samples per estimate")
    parser.add_argument("--exact-samples", type=int, default=256, help="trajectories per exact estimate")
    parser.add_argument("--denoise-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128, help="trajectories per forward pass")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    started = time.perf_counter()
    generator, _ = trained_tiny_sd(TEXTS, size=args.size, device=args.device)
    print(f"pre-trained tiny-sd at {args.size} px in {time.perf_counter() - started:.0f} s", flush=True)
    diffusion = Diffusion(generator.pipeline, args.denoise_steps, guidance=1.0)
    params = add_lora(diffusion.unet, rank=4, alpha=4.0, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = PROMPTS
        reward = OnlineReward("tiny-clip", check_store(Path(tmp) / "store"), prompts, device=args.device)
        exact = [exact_gradient(diffusion, reward, prompts, params, args.exact_samples, seed, args.batch_size)
                 for seed in (100, 101)]
        cosine = torch.nn.functional.cosine_similarity
        print(f"two exact estimates ({args.exact_samples} trajectories each): cosine {cosine(*exact, dim=0):.3f}")
        target = exact[0] + exact[1]
        print(f"{'DDPO samples':>12}  {'cosine to exact (seed 1, 2)':>28}  {'s per estimate':>14}")
        for n in args.samples:
            config = paper_config("ddpo", "tiny-clip", denoise_steps=args.denoise_steps, guidance=1.0,
                                  samples_per_iteration=n, batch_size=min(n, args.batch_size))
            values, seconds = [], 0.0
            for seed in (1, 2):
                for p in params:
                    p.grad = None
                began = time.perf_counter()
                ddpo.step(diffusion, reward, prompts, config.ddpo, PerPromptStats(UNLIMITED, UNLIMITED),
                          torch.Generator().manual_seed(seed), config.batch_size)
                seconds += time.perf_counter() - began
                values.append(float(cosine(-gradient(params), target, dim=0)))  # the loss's descent is ascent
            print(f"{n:>12}  {values[0]:>13.3f} {values[1]:>14.3f}  {seconds / 2:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
