"""Benchmark: reward-model training, pairs per second and peak memory.

    .venv/bin/python benchmarks/train_reward_bench.py                 # CPU: the tiny twins; then the GPU
                                                                      # part, which says "no GPU" here
    .venv/bin/python benchmarks/train_reward_bench.py --device cuda   # GPU only

CPU: tiny-clip, tiny-pickscore and tiny-imagereward on the synthetic colour preference
(tests/support/reward_training.py: 32 px PNGs, read and preprocessed each step), 64 pairs a
step. GPU: the full ImageReward architecture (BLIP ViT-L + BERT, random weights) at the paper's
batch (64 pairs a step: 16 per GPU x 4 accumulation, one GPU standing for the paper's four), its
70 % frozen, bf16 autocast, with and without gradient checkpointing. Pairs/s counts the training
steps (images read, forward, backward, update), not the validations and checkpoints. Peak memory:
torch.cuda.max_memory_allocated on a GPU, the process's ru_maxrss on the CPU (the whole run).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.reward_training import colour_items, ranked_images  # noqa: E402
from tia2.models import create_reward_model, model_config  # noqa: E402
from tia2.reward_training import paper_settings, split_items, train_reward_model  # noqa: E402


def bench(name: str, device: str, steps: int, settings: dict, weights: str = "pretrained") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        items = colour_items(Path(tmp) / "images", items_per_colour=12, images_per_item=6)
        train, validation = split_items(ranked_images(items), 0.1, 0)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        model = create_reward_model(name, weights=weights, device=device)
        built = time.perf_counter() - began
        family = model_config(name)["family"]
        options = paper_settings(family, steps=steps, validate_every=steps, **settings)
        try:
            result = train_reward_model(model, train, validation, options, Path(tmp) / "run")
        except torch.OutOfMemoryError:
            print(f"{name}: out of GPU memory at {options.batch_size // options.accumulation_steps} pairs a micro-batch")
            return
    if device.startswith("cuda"):
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB GPU (max allocated)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process max)"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"{name:<17} {options.batch_size} pairs/step in {options.accumulation_steps} micro-batch(es), "
          f"fix_rate {options.fix_rate:g}, {options.mixed_precision}"
          f"{' + gradient checkpointing' if options.gradient_checkpointing else ''}: "
          f"{result.pairs_per_second:.1f} pairs/s ({steps} steps in {result.seconds:.1f} s; build {built:.1f} s; "
          f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trained) | peak {peak}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: both, the GPU part where there is one)")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if args.device in (None, "cpu"):
        print(f"CPU, {torch.get_num_threads()} threads")
        for name in ("tiny-clip", "tiny-pickscore", "tiny-imagereward"):
            bench(name, "cpu", args.steps, dict(batch_size=64, learning_rate=1e-3))
    if args.device in (None, "cuda"):
        if not torch.cuda.is_available():
            print("GPU: no GPU")
            return
        print(f"GPU: {torch.cuda.get_device_name()}")
        for checkpointing in (False, True):
            bench("imagereward", "cuda", args.steps, dict(batch_size=64, accumulation_steps=4, mixed_precision="bf16",
                                                          gradient_checkpointing=checkpointing, workers=4),
                  weights="random")


if __name__ == "__main__":
    main()
