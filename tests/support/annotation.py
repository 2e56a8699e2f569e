"""A store ready for annotation: prompts of one set, each with a few random-pixel PNG images
registered as generated images (what the annotation tests label); annotators, and their answers
submitted concurrently as the app's requests are."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from tasks import annotate
from tia2.store import TABLES, Store, stable_id

SET = "demo"


def annotation_store(path: Path, prompts: int = 3, images_per_prompt: int = 4, set_name: str = SET,
                     size: int = 16) -> Store:
    """Prompts "<i> red apples" of `set_name`, each with `images_per_prompt` PNGs (seed = ordinal)."""
    store = Store(path)
    rng = np.random.default_rng(0)
    folder = path.parent / f"{path.name}-pictures"
    folder.mkdir(parents=True, exist_ok=True)
    prompt_rows, image_rows = [], []
    for p in range(prompts):
        text = f"{p + 1} red apples"
        prompt_id = stable_id(set_name, text)
        prompt_rows.append(dict(prompt_id=prompt_id, text=text, set=set_name, category=None, subcategory=None,
                                source="test"))
        for ordinal in range(images_per_prompt):
            file = folder / f"{set_name}-{p}-{ordinal}.png"
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(file)
            image_rows.append(dict(image_id=stable_id(prompt_id, str(ordinal)), prompt_id=prompt_id, set=set_name,
                                   file=file.name, ordinal=ordinal, seed=ordinal, generator="test", lora=None,
                                   steps=1, guidance=1.0, path=str(file), sha256=None, width=size, height=size))
    store.upsert_together({"prompts": pa.Table.from_pylist(prompt_rows, schema=TABLES["prompts"].schema),
                           "images": pa.Table.from_pylist(image_rows, schema=TABLES["images"].schema)})
    return store


def draw(*parts) -> int:
    """A fixed pseudo-random number per tuple (the answers' "opinions")."""
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def people(store: Store, *names: str) -> list[annotate.Annotator]:
    return [annotate.add_annotator(store, name)[0] for name in names]


def answer(store: Store, batch: str, annotators, choose) -> list[tuple]:
    """Every annotator answers their queue of the batch with `choose(annotator, item view)` (None:
    leaves the item), submitted concurrently as the app's requests are; (annotator, view,
    payload) of each answer."""
    jobs = [(a, view, payload) for a in annotators
            for view in annotate.next_items(store, batch, a.annotator_id, count=100_000)
            if (payload := choose(a, view)) is not None]
    writer = annotate.AnswerWriter(store)
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda job: writer.submit(job[0], batch, job[1].item, job[2]), jobs))
    finally:
        writer.close()
    return jobs
