"""A store ready for annotation: prompts of one set, each with a few random-pixel PNG images
registered as generated images (what the annotation tests label)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

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
