"""For the reward-model training tests: a learnable synthetic preference, of one prompt's images
the one with more of the colour the prompt names. Each image is a 4 x 4 grid of red, green and
blue cells (their shares drawn per image) with a little noise; an item is one prompt's images,
ranked by the share of the named colour (equal shares tie). And one process of a gloo group."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from tia2.preference import Items

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 30), "blue": (30, 30, 220)}
TEMPLATES = ("a {} picture", "mostly {}", "lots of {}", "the colour {}", "{} squares", "something {}",
             "a {} pattern", "{} everywhere")
GRID = 4


def colour_items(folder: Path, items_per_colour: int = 8, images_per_item: int = 4, size: int = 32, seed: int = 0,
                 reverse: bool = False, templates: int = 1) -> Path:
    """PNGs in `folder` and their items in ImageReward's test.json format (`id, prompt, generations,
    ranking`; rank 1 is the best), returned. `reverse`: the one with less of the colour is preferred.
    Item n of a colour is worded by template n % `templates` (several: prompts a split can hold out)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names, entries = list(COLOURS), []
    for c, colour in enumerate(names):
        for n in range(items_per_colour):
            files, shares = [], []
            for i in range(images_per_item):
                cells = rng.choice(len(names), size=GRID * GRID, p=rng.dirichlet(np.ones(len(names))))
                pixels = np.array([COLOURS[names[k]] for k in cells], float).reshape(GRID, GRID, 3)
                pixels = np.kron(pixels, np.ones((size // GRID, size // GRID, 1)))
                pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
                file = f"{colour}-{n}-{i}.png"
                Image.fromarray(pixels).save(folder / file)
                files.append(file)
                shares.append(float(np.mean(cells == c)))
            better = -np.array(shares) if not reverse else np.array(shares)  # lower is better
            ranking = [1 + int(np.sum(better < b)) for b in better]
            entries.append({"id": f"{colour}-{n}", "prompt": TEMPLATES[n % templates].format(colour),
                            "generations": files, "ranking": ranking})
    path = folder / "items.json"
    path.write_text(json.dumps(entries))
    return path


def ranked_images(path: Path, split: str = "item"):
    """The items of a `colour_items` file as `tia2.reward_training.RankedImages`."""
    from tia2.reward_training import RankedImages

    entries = json.loads(path.read_text())
    rows = [(path.parent / file, entry["prompt"], rank, n) for n, entry in enumerate(entries)
            for file, rank in zip(entry["generations"], entry["ranking"])]
    groups = tuple(entry["id"] if split == "item" else entry["prompt"] for entry in entries)
    return RankedImages(tuple(str(r[0]) for r in rows), tuple(r[1] for r in rows),
                        Items.from_item_index(np.array([r[3] for r in rows]), np.array([r[2] for r in rows], float)),
                        groups)


@contextlib.contextmanager
def one_torch_thread():
    """Torch on one thread for the block: two test workers share the machine's two cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_in_process_group(rank: int, world: int, init_file: str, items: str, settings: dict, folder: str,
                           out: str) -> None:
    """One process of a `world`-process gloo group (torch.multiprocessing.spawn's target): trains
    tiny-clip on the items of a `colour_items` file, as every process of a torchrun would, and
    process 0 saves the weights to `out`."""
    import torch
    import torch.distributed as dist

    from tia2.models import create_reward_model
    from tia2.reward_training import paper_settings, split_items, train_reward_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = create_reward_model("tiny-clip", seed=0)
        train, validation = split_items(ranked_images(Path(items)), 0.25, 0)
        train_reward_model(model, train, validation, paper_settings("open_clip", **settings), Path(folder))
        if rank == 0:
            torch.save(model.state_dict(), out)
    finally:
        dist.destroy_process_group()
