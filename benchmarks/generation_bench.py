"""Benchmark: image generation throughput.

    .venv/bin/python benchmarks/generation_bench.py            # CPU: tiny-sd
    .venv/bin/python benchmarks/generation_bench.py --gpu      # GPU: SD 2.1's architecture, random weights

CPU: images/s of the tiny-sd twin through the generation stage.
GPU: SD 2.1 (random weights) at 512 and 768 px, 50 steps, batch 1/4/8: the stage's path (fp16,
channels-last UNet, the batch's prompts in one call; `--compile` adds torch.compile) against a
plain `pipe(prompt)` loop with diffusers' defaults (fp32, one prompt per call), side by side in
one run. Target: at least 1.5x the plain loop's images/s at the same resolution and steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tia2.models.diffusion import create_pipeline  # noqa: E402

PROMPT = "a realistic photo of three deer"


def cpu_bench(images: int, steps: int) -> None:
    from tasks.generate import generate_images
    from tasks.ingest import ingest_tia2
    from tia2.store import Store

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_release

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")
        ingest_tia2(store, str(make_release(Path(tmp) / "release", captions_per_set=images, images_per_caption=1)))
        generator = create_pipeline("tiny-sd")
        generate_images(store, generator, ["counting"], images_per_prompt=1, steps=2, max_prompts=1)  # warm-up
        report = generate_images(store, generator, ["counting"], images_per_prompt=1, steps=steps, batch_size=4)
    print(f"tiny-sd (64 px, {steps} steps, CPU): {report.images_per_second:.2f} images/s "
          f"({report.images} images in {report.seconds:.1f} s)")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpu_bench(resolutions: list[int], batches: list[int], steps: int, compile_unet: bool) -> None:
    plain = create_pipeline("sd-2-1", weights="random", device="cuda")
    fast = create_pipeline("sd-2-1", weights="random", device="cuda", dtype="fp16", channels_last=True,
                           compile_unet=compile_unet)
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, compile={compile_unet}")
    for size in resolutions:
        for batch in batches:
            fast.pipeline([PROMPT] * batch, height=size, width=size, num_inference_steps=2)  # warm-up / compile
            synchronize()
            start = time.perf_counter()
            for _ in range(batch):
                plain.pipeline(PROMPT, height=size, width=size, num_inference_steps=steps)
            synchronize()
            plain_rate = batch / (time.perf_counter() - start)
            start = time.perf_counter()
            fast.pipeline([PROMPT] * batch, height=size, width=size, num_inference_steps=steps)
            synchronize()
            fast_rate = batch / (time.perf_counter() - start)
            ratio = fast_rate / plain_rate
            print(f"{size} px, {steps} steps, batch {batch}: plain loop {plain_rate:.3f} images/s | stage "
                  f"{fast_rate:.3f} images/s | {ratio:.2f}x (target 1.5x: {'met' if ratio >= 1.5 else 'NOT met'}) | "
                  f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="default: 10 on the CPU, 50 on the GPU")
    parser.add_argument("--images", type=int, default=8, help="CPU: images to make")
    parser.add_argument("--resolutions", default="512,768")
    parser.add_argument("--batches", default="1,4,8")
    args = parser.parse_args()
    print(f"generation_bench, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}")
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu: no CUDA device here")
        gpu_bench([int(r) for r in args.resolutions.split(",")], [int(b) for b in args.batches.split(",")],
                  args.steps or 50, args.compile)
    else:
        cpu_bench(args.images, args.steps or 10)


if __name__ == "__main__":
    main()
