"""Benchmark: fine-tuning steps per second and peak memory, for each algorithm.

    .venv/bin/python benchmarks/finetune_bench.py                 # CPU: tiny-sd, tiny-clip
    .venv/bin/python benchmarks/finetune_bench.py --device cuda   # GPU: SD 2.1-base's architecture,
                                                                  # random weights, the paper's batches

A step is one optimizer update (for DDPO one iteration: sampling `samples_per_iteration`
trajectories and the update over all their timesteps). Steps/s counts the optimizer steps alone
(the training data, checkpoints and their evaluation are timed separately, as "total").
GPU: 512 px, Table 4's step counts and guidance (RWR 50 steps, guidance 7.5; DDPO 50 steps,
guidance 5; ReFL 40 steps) with bf16 mixed precision and gradient checkpointing, against CLIP
ViT-B/32 with random weights. The papers' batches (RWR 32, DDPO 256 samples per iteration in
minibatches of 64, ReFL 64) were spread over 8 GPUs; one GPU runs one device's share by default
(`--batch-size 8`, DDPO `--samples 16`), and a batch that does not fit is halved until it does.
Peak memory: torch.cuda.max_memory_allocated on a GPU, the process's ru_maxrss on the CPU.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.finetune import OnlineReward, finetune, paper_config  # noqa: E402
from tia2.models.diffusion import create_pipeline  # noqa: E402
from tia2.store import Store, stable_id  # noqa: E402

PROMPTS = ["a realistic photo of three deer", "a cat and a dog on a sofa"]


def bench(algo: str, device: str, steps: int, overrides: dict, model: str, weights: str, reward: str,
          reward_weights: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")
        store.upsert("prompts", pa.Table.from_pylist([
            dict(prompt_id=stable_id("bench", t), text=t, set="bench", category=None, subcategory=None,
                 source="bench") for t in PROMPTS]))
        prompts = [(stable_id("bench", t), t) for t in PROMPTS]
        config = paper_config(algo, reward, steps=steps, checkpoint_every=steps, eval_images_per_prompt=1,
                              **overrides)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        generator = create_pipeline(model, weights=weights, device=device)
        try:
            result = finetune(store, generator, config, prompts, OnlineReward(reward, store, prompts,
                                                                              reward_weights, device))
        except torch.OutOfMemoryError:
            result = None  # retried below, once the failed attempt's tensors are released
        del generator
    if result is None:
        torch.cuda.empty_cache()
        if config.batch_size == 1:
            print(f"{algo:<5} out of GPU memory at batch 1")
            return
        print(f"{algo:<5} out of GPU memory at batch {config.batch_size}: halving it", flush=True)
        smaller = dict(overrides, batch_size=config.batch_size // 2)
        if algo == "ddpo":
            smaller["samples_per_iteration"] = max(config.ddpo.samples_per_iteration // 2, 1)
        bench(algo, device, steps, smaller, model, weights, reward, reward_weights)
        return
    if device.startswith("cuda"):
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB GPU (max allocated)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process max)"
    batch = (f"{config.ddpo.samples_per_iteration} samples/iteration, minibatch {config.batch_size}"
             if algo == "ddpo" else f"batch {config.batch_size}")
    print(f"{algo:<5} {model}, {batch}, {config.denoise_steps} denoising steps, guidance {config.guidance:g}, "
          f"{config.mixed_precision}{' + gradient checkpointing' if config.gradient_checkpointing else ''}: "
          f"{result.steps_per_second:.3f} steps/s ({steps} steps in {result.training_seconds:.1f} s; "
          f"total with data and evaluation {result.seconds:.1f} s) | peak {peak}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--algos", default="rwr,ddpo,refl")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per algorithm (CPU 5, GPU 3)")
    parser.add_argument("--batch-size", type=int, help="batch size (GPU default 8, one of the papers' 8 GPUs)")
    parser.add_argument("--samples", type=int, help="DDPO samples per iteration (GPU default 16)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gpu = args.device.startswith("cuda")
    if gpu:
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        common = dict(model="sd-2-1-base", weights="random", reward="clip", reward_weights="random")
        gpu_share = dict(batch_size=8, mixed_precision="bf16", gradient_checkpointing=True)
        per_algo = {"rwr": dict(gpu_share, images_per_prompt=10, keep=10),  # the data set of 100/10 is not timed
                    "ddpo": dict(gpu_share, samples_per_iteration=args.samples or 16), "refl": dict(gpu_share)}
    else:
        torch.set_num_threads(1)
        common = dict(model="tiny-sd", weights="pretrained", reward="tiny-clip", reward_weights="pretrained")
        small = dict(denoise_steps=10, guidance=7.5, batch_size=4)
        per_algo = {"rwr": dict(small, images_per_prompt=8, keep=2),
                    "ddpo": dict(small, samples_per_iteration=8),
                    "refl": dict(small, pretrain_images_per_prompt=2)}
        print(f"CPU, 1 thread, torch {torch.__version__}")
    for algo in args.algos.split(","):
        overrides = dict(per_algo[algo])
        if args.batch_size:
            overrides["batch_size"] = args.batch_size
        bench(algo, args.device, args.steps or (3 if gpu else 5), overrides, **common)


if __name__ == "__main__":
    main()
