"""Check: does DDPO raise the reward of the trained tiny-sd, by samples per iteration and learning rate?

    python3 benchmarks/ddpo_tiny_sd_gain.py --device cuda --samples 1024 4096 16384 --seeds 0 1
    .venv/bin/python benchmarks/ddpo_tiny_sd_gain.py --samples 64 --steps 4 --seeds 0   # CPU smoke run

For each setting and seed, `finetune` (the real DDPO loop, tasks/finetune.py) trains a LoRA adapter
on tiny-sd after denoising pre-training (`tia2.models.trained_tiny`) against tiny-clip, and again
against the negated reward. Prints tiny-clip's gain of the final adapter over the base model on 32
deterministic images per prompt and how many of them beat the base's: a setting at which DDPO
learns raises tiny-clip in the first run and lowers it in the second. ddpo_gradient_check.py says
why small sample counts cannot (the estimate's direction is noise below thousands of samples).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpo_gradient_check import PROMPTS, TEXTS, check_store  # noqa: E402
from tasks.finetune import OnlineReward, finetune, paper_config  # noqa: E402
from tia2.models.trained_tiny import trained_tiny_sd  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[8192],
                        help="trajectories per iteration (default: the GPU test's)")
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[3e-2])
    parser.add_argument("--steps", type=int, default=30, help="DDPO iterations (optimizer steps)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--batch-size", type=int, default=4096, help="trajectories per backward pass")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    started = time.perf_counter()
    generator, _ = trained_tiny_sd(TEXTS, device=args.device)
    print(f"pre-trained tiny-sd at 16 px in {time.perf_counter() - started:.0f} s", flush=True)
    print(f"{'samples':>7} {'lr':>6} {'seed':>4}  {'gain':>8} {'wins':>7}  {'negated: gain':>13} {'wins':>7}  {'s':>5}")
    for n in args.samples:
        for lr in args.learning_rates:
            for seed in args.seeds:
                # the per-prompt statistics of the iteration's own samples, as the gradient check
                config = paper_config("ddpo", "tiny-clip", denoise_steps=4, guidance=1.0, lora_rank=4, lora_alpha=4.0,
                                      samples_per_iteration=n, batch_size=min(n, args.batch_size), stats_buffer=n,
                                      stats_min_count=16, steps=args.steps, checkpoint_every=args.steps,
                                      learning_rate=lr, seed=seed, eval_images_per_prompt=32)
                began = time.perf_counter()
                row = []
                for sign in (1, -1):
                    with tempfile.TemporaryDirectory() as tmp:
                        store = check_store(Path(tmp) / "store")
                        reward = OnlineReward("tiny-clip", store, PROMPTS, device=args.device)
                        objective = reward if sign == 1 else (lambda images, ids: -reward(images, ids))
                        final = finetune(store, copy.deepcopy(generator), config, PROMPTS, objective).checkpoints[-1]
                    # the evaluation scores the objective: tiny-clip's gain is sign × the objective's
                    row += [sign * (final.mean_reward - final.base_mean_reward), f"{final.wins}/{final.n_eval}"]
                print(f"{n:>7} {lr:>6.0e} {seed:>4}  {row[0]:>+8.4f} {row[1]:>7}  {row[2]:>+13.4f} {row[3]:>7}  "
                      f"{time.perf_counter() - began:>5.0f}", flush=True)


if __name__ == "__main__":
    main()
