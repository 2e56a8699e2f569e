"""Benchmark: the scoring stage's encoder reuse against per-pair scoring, on full-size
architectures with random weights.

    .venv/bin/python benchmarks/scoring_bench.py [--models clip,pickscore,hpsv2,imagereward,blip2] [--images 50]
        [--sample-pairs 8] [--batch 32] [--device cpu]

Workload: N images of one caption (TIA2 has 50) × (the caption + 32 contrast prompts): TextNorm's
shape, where all images of a caption share its texts.
- per-pair: what the reference APIs do, one full forward (image and text) per (image, text).
  Every pair costs the same, so it is timed on `--sample-pairs` pairs and scaled to all pairs
  (the printed line says so).
- stage: `encode_images` once per image, `score_encoded` with each distinct text encoded once.
Both run in this process, one after the other, on the same inputs; the two must agree to 1e-4.
Then images/s of the stage path at `--batch` images (each with 33 texts).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tia2.models import create_reward_model  # noqa: E402

TARGETS = {"clip": 20, "pickscore": 20, "hpsv2": 20, "imagereward": 8, "blip2": None}


def texts_for(n_contrast: int = 32) -> list[str]:
    objects = ["deer", "trucks", "cats", "dogs", "birds", "horses", "apples", "cups"]
    counts = ["one", "two", "three", "four", "five", "six"]
    contrast = [f"a realistic photo of {c} {o}" for o in objects for c in counts if (c, o) != ("three", "deer")]
    return ["a realistic photo of three deer", *contrast[:n_contrast]]


def images(n: int, size: int) -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.random((n, 3, size, size), dtype=np.float32))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@torch.no_grad()
def bench_model(name: str, n_images: int, sample_pairs: int, batch: int, device: str) -> None:
    model, build = timed(lambda: create_reward_model(name, weights="random", device=device))
    texts = texts_for()
    pixels = model.preprocess_tensor(images(n_images, 256)).to(device)
    pair_image = torch.arange(n_images, device=device).repeat_interleave(len(texts))
    pair_text = texts * n_images
    n_pairs = len(pair_text)

    stage, stage_s = timed(lambda: model.score_encoded(model.encode_images(pixels), pair_image, pair_text))
    sample = range(0, n_pairs, max(1, n_pairs // sample_pairs))
    per_pair, sample_s = timed(lambda: torch.stack(
        [model(pixels[pair_image[p]][None], [pair_text[p]])[0] for p in sample]))
    per_pair_s = sample_s / len(sample) * n_pairs
    agree = (stage[list(sample)] - per_pair).abs().max().item()
    ratio = per_pair_s / stage_s
    target = TARGETS.get(name)
    verdict = f"target {target}x: {'met' if ratio >= target else 'NOT met'}" if target else "no target"
    print(f"{name:<11} build {build:5.1f} s | {n_images} images x {len(texts)} texts = {n_pairs} pairs | "
          f"per-pair {per_pair_s:7.2f} s (timed on {len(sample)} pairs) | stage {stage_s:6.2f} s | "
          f"speed-up {ratio:6.1f}x ({verdict}) | max |diff| {agree:.1e}", flush=True)

    big = model.preprocess_tensor(images(batch, 256)).to(device)
    index = torch.arange(batch, device=device).repeat_interleave(len(texts))
    _, batch_s = timed(lambda: model.score_encoded(model.encode_images(big), index, texts * batch))
    print(f"{name:<11} stage path at batch {batch}: {batch / batch_s:6.2f} images/s "
          f"({batch * len(texts)} scores in {batch_s:.1f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="clip,pickscore,hpsv2,imagereward,blip2")
    parser.add_argument("--images", type=int, default=50, help="images of one caption (TIA2: 50)")
    parser.add_argument("--sample-pairs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"scoring_bench on {args.device} ({os.cpu_count()} CPUs"
          f"{', ' + torch.cuda.get_device_name() if args.device.startswith('cuda') else ''}), "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    for name in args.models.split(","):
        bench_model(name, args.images, args.sample_pairs, args.batch, args.device)


if __name__ == "__main__":
    main()
