"""Stage: image generation with a diffusers pipeline.

Image i of prompt p is seeded from (prompt_id, i, base seed) with its own torch.Generator, so the
same inputs give the same images whatever the batch. Files are content-addressed PNGs under
`storage/images/`; each row of `images` carries the generator's identity, steps, guidance and
seed. A batch's files are written before its rows, so a killed run leaves at most unreferenced
files, and a re-run makes only the images whose rows are missing.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from tia2.errors import UserError
from tia2.progress import progress_bar
from tia2.seeding import image_seed
from tia2.store import Store, stable_id

DEFAULTS = {"steps": 50, "guidance": 7.5}  # TextNorm paper, Table 4


def image_id(prompt_id: str, generator_identity: str, lora: str | None, index: int, base_seed: int,
             steps: int, guidance: float) -> str:
    return stable_id("generated", prompt_id, generator_identity, lora or "", str(index), str(base_seed),
                     str(steps), repr(float(guidance)))


def save_png(store: Store, image) -> tuple[Path, str]:
    """Write a PIL image as a content-addressed PNG (atomically); returns its path and sha256."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path = store.images_dir / digest[:2] / f"{digest}.png"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path, digest


@dataclass
class GenerateReport:
    images: int = 0
    already_present: int = 0
    seconds: float = 0.0
    batch_size: int = 0  # the largest batch made
    identity: str = ""  # the generator's weights identity (images.generator is name@identity)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def prompts_to_generate(store: Store, sets: list[str] | None = None, max_prompts: int | None = None,
                        shard: tuple[int, int] = (0, 1)) -> list[tuple[str, str, str]]:
    """(prompt_id, text, set) of the given sets (the first `max_prompts` of each), in a stable
    order; with shard (i, n), every n-th of them from the i-th, so n workers split the work.
    A UserError when a given set, or the store, has no prompts."""
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index} of {count} does not exist")
    prompts = store.connect().execute(
        """SELECT prompt_id, text, set FROM prompts WHERE $sets IS NULL OR set IN (SELECT unnest($sets))
           QUALIFY $limit IS NULL OR row_number() OVER (PARTITION BY set ORDER BY prompt_id) <= $limit
           ORDER BY set, prompt_id""", {"sets": sets, "limit": max_prompts}).fetchall()
    empty = sorted(set(sets or ()) - {s for _, _, s in prompts})
    if empty or not prompts:
        raise UserError(f"no prompts in {'set(s) ' + ', '.join(empty) if empty else 'the store'}: ingest some "
                        f"(tia2 ingest-tia2, tia2 sample-prompts)")
    return prompts[index::count]


def batch_size_for_memory(free_bytes: int, peak_one: int, peak_two: int, limit: int = 64) -> int:
    """The largest batch whose peak memory fits 90% of the free memory, from the peaks measured
    for batches of one and two images: memory grows by (peak_two - peak_one) per image."""
    per_image = max(peak_two - peak_one, 1)
    fixed = peak_one - per_image
    return int(max(1, min(limit, (0.9 * free_bytes - fixed) // per_image)))


def probe_batch_size(generator, steps: int = 2, limit: int = 64) -> int:
    """Batch size from the GPU's free memory: two short runs (one and two images, decoded too)
    measure what an image costs; the rest of the memory is spent on images."""
    import torch

    pipe = generator.pipeline
    device = pipe.device
    free, _ = torch.cuda.mem_get_info(device)
    peaks = []
    for size in (1, 2):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            pipe(["a photo of a cat"] * size, num_inference_steps=steps)
        peaks.append(torch.cuda.max_memory_allocated(device) - before)
    return batch_size_for_memory(free, peaks[0], peaks[1], limit)


def generate_images(store: Store, generator, sets: list[str] | None = None, images_per_prompt: int = 1,
                    steps: int = DEFAULTS["steps"], guidance: float = DEFAULTS["guidance"],
                    base_seed: int = 0, batch_size: int | None = 4, max_prompts: int | None = None,
                    shard: tuple[int, int] = (0, 1), prompts: list[tuple[str, str, str]] | None = None,
                    label: str | None = None) -> GenerateReport:
    """Make the missing images for every prompt of the given sets (the first `max_prompts` of
    each; of one shard of them), or of `prompts` ((prompt_id, text, set) rows) when given. A
    batch holds several prompts; batch_size None: on a GPU, from its free memory
    (probe_batch_size), on the CPU 4 (images are made one at a time there). `label` names the
    progress bar (default: the generator)."""
    if prompts is None:
        prompts = prompts_to_generate(store, sets, max_prompts, shard)
    if batch_size is None:
        batch_size = probe_batch_size(generator) if generator.pipeline.device.type == "cuda" else 4
    existing = set(store.read("images").column("image_id").to_pylist())
    wanted = [(pid, text, set_name, i) for pid, text, set_name in prompts for i in range(images_per_prompt)]
    todo = [w for w in wanted
            if image_id(w[0], generator.identity, generator.lora, w[3], base_seed, steps, guidance) not in existing]
    report = GenerateReport(already_present=len(wanted) - len(todo), identity=generator.identity)
    start = time.perf_counter()
    with progress_bar(f"generating ({label or generator.name})", len(todo)) as advance:
        for first in range(0, len(todo), batch_size):
            _generate_batch(store, generator, todo[first:first + batch_size], steps, guidance, base_seed, report)
            report.seconds = time.perf_counter() - start
            advance(min(batch_size, len(todo) - first), report.images_per_second)
    return report


def _generate_batch(store: Store, generator, batch: list, steps: int, guidance: float, base_seed: int,
                    report: GenerateReport) -> None:
    """Make one batch of images, write their files, then their rows."""
    import torch

    pipe = generator.pipeline
    seeds = [image_seed(pid, i, base_seed) for pid, _, _, i in batch]
    texts = [text for _, text, _, _ in batch]
    # CPU kernels round differently at different batch sizes: on the CPU each image is made
    # alone, so its bytes do not depend on the batch; on a GPU the batch runs as one.
    groups = [[k] for k in range(len(batch))] if pipe.device.type == "cpu" else [list(range(len(batch)))]
    images = []
    for group in groups:
        with torch.no_grad():
            images += pipe([texts[k] for k in group], num_inference_steps=steps, guidance_scale=guidance,
                           generator=[torch.Generator("cpu").manual_seed(seeds[k]) for k in group]).images
    rows = []
    for (pid, _, set_name, i), seed, image in zip(batch, seeds, images):
        path, digest = save_png(store, image)
        rows.append(dict(image_id=image_id(pid, generator.identity, generator.lora, i, base_seed, steps, guidance),
                         prompt_id=pid, set=set_name, file=path.name, ordinal=i, seed=seed,
                         generator=f"{generator.name}@{generator.identity}", lora=generator.lora, steps=steps,
                         guidance=float(guidance), path=str(path), sha256=digest,
                         width=image.width, height=image.height))
    store.upsert("images", pa.Table.from_pylist(rows))
    report.images += len(rows)
    report.batch_size = max(report.batch_size, len(batch))


def record_generate(store: Store, model: str, weights: str = "pretrained", sets: list[str] | None = None,
                    images_per_prompt: int = 1, steps: int = DEFAULTS["steps"],
                    guidance: float = DEFAULTS["guidance"], base_seed: int = 0, batch_size: int | None = None,
                    max_prompts: int | None = None, device: str = "cpu", lora: str | None = None,
                    dtype: str = "fp32", channels_last: bool = False, compile_unet: bool = False,
                    parent_run_id: str | None = None, shard: tuple[int, int] = (0, 1)) -> GenerateReport:
    """Build the generator (with a LoRA adapter when given), make the missing images, log
    identity, counts, images/s and a sample grid to MLflow."""
    import mlflow

    from tia2.models.diffusion import apply_lora, create_pipeline, generator_config
    from tia2.tracking import run_label, stage_run

    generator_config(model)  # a wrong name, then a wrong set, fail before the model loads
    prompts = prompts_to_generate(store, sets, max_prompts, shard)
    generator = create_pipeline(model, weights=weights, device=device, dtype=dtype,
                                channels_last=channels_last, compile_unet=compile_unet)
    if lora:
        apply_lora(generator, lora)
    params = {"generator": generator.name, "identity": generator.identity, "lora": generator.lora,
              "sets": sets or "all",
              "images_per_prompt": images_per_prompt, "steps": steps, "guidance": guidance,
              "base_seed": base_seed, "batch_size": batch_size, "max_prompts": max_prompts, "device": device,
              "dtype": dtype, "channels_last": channels_last, "compile": compile_unet, "shard": f"{shard[0]}/{shard[1]}"}
    label = run_label(generator.name, shard)
    with stage_run("generate", params, parent_run_id, label=label):
        report = generate_images(store, generator, label=label, images_per_prompt=images_per_prompt, steps=steps,
                                 guidance=guidance, base_seed=base_seed, batch_size=batch_size, prompts=prompts)
        mlflow.log_metrics({"images": report.images, "already_present": report.already_present,
                            "images_per_second": report.images_per_second, "batch_size": report.batch_size})
        grid = sample_grid(store, f"{generator.name}@{generator.identity}", generator.lora)
        if grid is not None:
            mlflow.log_image(grid, "sample_grid.png")
    return report


def sample_grid(store: Store, generator: str, lora: str | None = None, prompts: int = 6, per_prompt: int = 4):
    """A grid of the generator's images: a row per prompt (the first `prompts`), captioned."""
    from PIL import Image, ImageDraw

    rows = store.connect().execute(
        """SELECT p.text, i.path FROM images i JOIN prompts p USING (prompt_id)
           WHERE i.generator = ? AND i.lora IS NOT DISTINCT FROM ? AND i.ordinal < ?
           QUALIFY dense_rank() OVER (ORDER BY p.set, p.prompt_id) <= ?
           ORDER BY p.set, p.prompt_id, i.ordinal""", [generator, lora, per_prompt, prompts]).fetchall()
    if not rows:
        return None
    captions = list(dict.fromkeys(text for text, _ in rows))
    columns = max(Counter(text for text, _ in rows).values())
    tile, label = 128, 18
    grid = Image.new("RGB", (tile * columns, (tile + label) * len(captions)), "white")
    draw = ImageDraw.Draw(grid)
    column = {text: 0 for text in captions}
    for text, path in rows:
        r = captions.index(text)
        with Image.open(path) as image:
            grid.paste(image.convert("RGB").resize((tile, tile)), (column[text] * tile, r * (tile + label) + label))
        column[text] += 1
    for r, text in enumerate(captions):
        draw.text((4, r * (tile + label) + 3), text[:tile * columns // 6], fill="black")
    return grid
