"""Stores for tests and what they are built from: a small release in TIA2's layout, JPEGs for its
images, a store of a few prompts, and copies of a store that tests may write to."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from tia2.store import Store, stable_id


def make_release(root: Path, captions_per_set: int = 2, images_per_caption: int = 4) -> Path:
    """A small release in the TIA2 layout: every set, a few captions with 3-prompt contrast sets.
    Image labels alternate so that every caption is included (labels not all equal)."""
    for sub in ("human_annotations", "prompts"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for s, set_name in enumerate(("comprehensive", "counting", "composition")):
        labels, prompts = {}, {}
        for c in range(captions_per_set):
            caption = f"a photo of {c + 2} {set_name} things"
            prompts[caption] = [f"a photo of {c + 5} {set_name} things", f"a drawing of {set_name}",
                                f"a photo of {set_name} and a cat"]
            for i in range(images_per_caption):
                name = f"image_{s}_{c}_{i}.jpg"
                votes = [1, 1, 0] if i % 2 == 0 else [0, -1, 1]
                labels[name] = {"image": name, "caption": caption, "human_labels": votes}
        (root / "human_annotations" / f"human_labels_{set_name}.json").write_text(json.dumps(labels))
        (root / "prompts" / f"prompt_set_{set_name}.json").write_text(json.dumps(prompts))
    return root


def write_images(release: Path, folder: Path, sets=("counting", "composition"), size=(72, 96)) -> Path:
    """Random-pixel JPEGs under the file names of the release's images (inputs, not outputs)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for set_name in sets:
        labels = json.loads((release / f"human_annotations/human_labels_{set_name}.json").read_text())
        (folder / set_name).mkdir(exist_ok=True)
        for name in labels:
            pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / set_name / name)
    return folder


def store_with_prompts(path: Path, texts: list[str]) -> Store:
    """A store holding only these prompts, in a set named "test" (what fine-tuning trains on)."""
    store = Store(path)
    store.upsert("prompts", pa.Table.from_pylist([
        dict(prompt_id=stable_id("test", t), text=t, set="test", category=None, subcategory=None, source="test")
        for t in texts]))
    return store


def copy_store(store: Store, dest: Path) -> Store:
    shutil.copytree(store.root, dest)
    return Store(dest)
