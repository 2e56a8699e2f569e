"""Image generation on the tiny Stable Diffusion twin."""

import numpy as np
import pytest
from PIL import Image

from tasks.generate import generate_images
from tasks.ingest import ingest_tia2
from tia2.cli import main
from tia2.models.diffusion import create_pipeline, generator_config
from tia2.store import Store


@pytest.fixture(scope="module")
def tiny_sd():
    return create_pipeline("tiny-sd")


def _made(store):
    return sorted(store.connect().execute(
        "SELECT image_id, sha256, seed, generator, steps, guidance FROM images WHERE sha256 IS NOT NULL").fetchall())


def test_same_images_byte_for_byte_whatever_the_batch_size(tmp_path, mini_release, tiny_sd):
    made = []
    for batch_size in (1, 3):
        store = Store(tmp_path / f"s{batch_size}")
        ingest_tia2(store, str(mini_release))
        report = generate_images(store, tiny_sd, ["counting"], images_per_prompt=3, steps=3, batch_size=batch_size)
        assert report.images == 6
        made.append(_made(store))
    assert made[0] == made[1]
    assert len({row[1] for row in made[0]}) == 6  # six different images
    image_id, sha, seed, generator, steps, guidance = made[0][0]
    assert generator == "tiny-sd@random-init:0" and steps == 3 and guidance == 7.5


def test_rerun_makes_only_missing_images(tmp_path, mini_release, tiny_sd):
    store = Store(tmp_path / "s")
    ingest_tia2(store, str(mini_release))
    assert generate_images(store, tiny_sd, ["counting"], images_per_prompt=1, steps=2).images == 2
    report = generate_images(store, tiny_sd, ["counting"], images_per_prompt=2, steps=2)
    assert (report.images, report.already_present) == (2, 2)
    rows = store.connect().execute(
        "SELECT path, sha256, width, height FROM images WHERE sha256 IS NOT NULL").fetchall()
    assert len(rows) == 4
    for path, sha, width, height in rows:
        assert path.endswith(f"{sha}.png") and Image.open(path).size == (width, height) == (64, 64)


def test_generated_images_are_scored(tmp_path, mini_release, capsys):
    store = Store(tmp_path / "s")
    ingest_tia2(store, str(mini_release))
    assert main(["generate", "--model", "tiny-sd", "--set", "composition", "--images-per-prompt", "2",
                 "--steps", "2", "--store", str(store.root)]) == 0
    assert "made 4 images" in capsys.readouterr().out
    assert main(["score", "--reward-model", "tiny-clip", "--store", str(store.root)]) == 0
    assert "scored 4 images, 16 new score rows" in capsys.readouterr().out


def test_tiny_sd_is_sd_2_1_with_a_small_config():
    tiny, full = generator_config("tiny-sd"), generator_config("sd-2-1")
    assert set(tiny) == set(full) and tiny["unet"] != full["unet"]
    assert tiny["scheduler"] == full["scheduler"]


def test_bad_arguments_are_clear(tmp_path, mini_release, capsys):
    store = Store(tmp_path / "s")
    assert main(["generate", "--model", "nope", "--store", str(store.root)]) == 2
    assert "unknown generator 'nope'" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny-sd", "--steps", "0", "--store", str(store.root)]) == 2
    assert "at least 1" in capsys.readouterr().err
