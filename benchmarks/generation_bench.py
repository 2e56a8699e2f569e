"""Benchmark: image generation throughput.

    .venv/bin/python benchmarks/generation_bench.py            # CPU: tiny-sd
    .venv/bin/python benchmarks/generation_bench.py --gpu      # GPU: SD 2.1's architecture, random weights

CPU: images/s of the tiny-sd twin through the generation stage.
GPU: SD 2.1 (random weights) at 512 and 768 px, 50 steps, batch 1/4/8: the generation stage
(`generate_images`: fp16, channels-last UNet, the batch's prompts in one call, PNGs and store rows
written; `--compile` adds torch.compile) against a plain `pipe(prompt)` loop with diffusers'
defaults (fp32, one prompt per call), side by side in one run; then `--batch-size auto`.
Target: at least 1.5x the plain loop's images/s at the same resolution and steps.
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
    from tests.support.stores import make_release
    from tia2.store import Store

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


def bench_store(folder: Path, prompts: int):
    """A store holding `prompts` distinct prompts (set "bench")."""
    import pyarrow as pa

    from tia2.store import Store, stable_id

    store = Store(folder)
    texts = [f"{PROMPT}, variation {i}" for i in range(prompts)]
    store.upsert("prompts", pa.Table.from_pylist([
        dict(prompt_id=stable_id("bench", t), text=t, set="bench", category=None, subcategory=None, source="bench")
        for t in texts]))
    return store, texts


def gpu_bench(resolutions: list[int], batches: list[int], steps: int, compile_unet: bool, plain_images: int = 3,
              model: str = "sd-2-1", device: str = "cuda", dtype: str = "fp16") -> None:
    """Per resolution: the plain loop's images/s (`pipe(prompt)` calls, fp32, diffusers' defaults;
    one prompt per call, so its rate does not depend on a batch), then for each batch the same
    number of images from the generation stage (`generate_images` with fp16, channels-last,
    `batch` prompts per call; PNG files and store rows included)."""
    from tasks.generate import generate_images

    plain = create_pipeline(model, weights="random", device=device)
    fast = create_pipeline(model, weights="random", device=device, dtype=dtype, channels_last=True,
                           compile_unet=compile_unet)
    if device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, compile={compile_unet}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for size in resolutions:
            # the stage makes the pipeline's native size: set it to this resolution
            fast.pipeline.unet.register_to_config(sample_size=size // fast.pipeline.vae_scale_factor)
            plain.pipeline(PROMPT, height=size, width=size, num_inference_steps=2)  # warm-up
            synchronize()
            start = time.perf_counter()
            for i in range(plain_images):
                plain.pipeline(f"{PROMPT}, variation {i}", height=size, width=size, num_inference_steps=steps)
            synchronize()
            plain_rate = plain_images / (time.perf_counter() - start)
            print(f"{size} px, {steps} steps: plain loop {plain_rate:.3f} images/s ({plain_images} images)", flush=True)
            for batch in batches:
                store, _ = bench_store(Path(tmp) / f"{size}-{batch}", batch)
                fast.pipeline([PROMPT] * batch, num_inference_steps=2)  # warm-up / compile
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                report = generate_images(store, fast, ["bench"], images_per_prompt=1, steps=steps, batch_size=batch)
                assert report.images == batch and report.batch_size == batch
                ratio = report.images_per_second / plain_rate
                peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
                print(f"{size} px, {steps} steps, batch {batch}: plain loop {plain_rate:.3f} images/s | stage "
                      f"{report.images_per_second:.3f} images/s | {ratio:.2f}x (target 1.5x: "
                      f"{'met' if ratio >= 1.5 else 'NOT met'}) | stage peak memory {peak:.1f} GiB", flush=True)
        if device != "cuda":
            return
        store, _ = bench_store(Path(tmp) / "auto", 16)
        fast.pipeline.unet.register_to_config(sample_size=768 // fast.pipeline.vae_scale_factor)
        report = generate_images(store, fast, ["bench"], images_per_prompt=1, steps=steps, batch_size=None)
        print(f"768 px, --batch-size auto: batch {report.batch_size} chosen from free memory, "
              f"{report.images_per_second:.3f} images/s over {report.images} images", flush=True)


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
