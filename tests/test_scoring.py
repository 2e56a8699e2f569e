"""Reward models (tiny twins and the full-size architectures) and the scoring stage."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.ingest import import_images, ingest_tia2
from tasks.score import pending_pairs, score_images
from tests.support.project import PROJECT
from tests.support.stores import make_release, write_images
from cli.main import main
from tia2.models import create_reward_model, list_models, model_config
from tia2.store import Store

TINY = [m for m in list_models() if m.startswith("tiny-")]


@pytest.mark.parametrize("name", TINY)
def test_tiny_twin_runs_the_full_models_code(name):
    full_name = name.removeprefix("tiny-")
    tiny, full = model_config(name), model_config(full_name)
    assert tiny["family"] == full["family"] and tiny["arch"] != full["arch"]
    tiny_model = create_reward_model(name)
    with torch.device("meta"):  # the full-size architecture without allocating its weights
        full_model = create_reward_model(full_name, weights="random", device="meta")
    assert type(tiny_model) is type(full_model)
    tiny_modules = {type(m) for m in tiny_model.modules()}
    full_modules = {type(m) for m in full_model.modules()}
    assert tiny_modules == full_modules
    assert sum(p.numel() for p in tiny_model.parameters()) < sum(p.numel() for p in full_model.parameters()) / 50
    assert full_model.identity == "random-init:0"


@pytest.mark.parametrize("name", TINY)
def test_encoder_reuse_equals_per_pair_scoring_and_is_deterministic(name):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (50 + 10 * i, 70, 3), dtype=np.uint8)) for i in range(3)]
    texts = ["a photo of two dogs", "a photo of three dogs", "a photo of three cats", "a drawing of a dog"]
    image_index = [0, 0, 0, 1, 1, 2, 2, 2]
    pair_texts = [texts[0], texts[1], texts[2], texts[0], texts[3], texts[1], texts[2], texts[3]]
    model = create_reward_model(name)
    with torch.no_grad():
        pixels = model.preprocess(images)
        reused = model.score_encoded(model.encode_images(pixels), torch.tensor(image_index), pair_texts)
        per_pair = torch.stack([model(pixels[i:i + 1], [t])[0] for i, t in zip(image_index, pair_texts)])
        again = create_reward_model(name).score_encoded(
            model.encode_images(pixels), torch.tensor(image_index), pair_texts)
    torch.testing.assert_close(reused, per_pair, atol=1e-5, rtol=0)
    assert torch.equal(reused, again)
    assert abs(reused[0] - reused[3]) > 1e-4  # the image moves the score (same text, two images)


@pytest.mark.parametrize("name", TINY)
def test_differentiable_path_from_pixels(name):
    model = create_reward_model(name)
    images01 = torch.rand(2, 3, 80, 80, requires_grad=True)
    rewards = model(model.preprocess_tensor(images01), ["a cat", "a dog"])
    rewards.sum().backward()
    assert images01.grad is not None and images01.grad.abs().sum() > 0


def test_score_writes_caption_and_contrast_rows_once(image_store, capsys):
    assert main(["score", "--reward-model", "tiny-clip", "--store", str(image_store.root)]) == 0
    assert "scored 16 images, 64 new score rows" in capsys.readouterr().out
    con = image_store.connect()
    rows = con.execute("SELECT count(*), count(DISTINCT (image_id, text)) FROM scores").fetchall()[0]
    assert rows == (16 * 4, 16 * 4)
    assert pending_pairs(image_store, "tiny-clip", create_reward_model("tiny-clip").version).empty
    assert main(["score", "--reward-model", "tiny-clip", "--store", str(image_store.root)]) == 0
    assert "scored 0 images, 0 new score rows" in capsys.readouterr().out
    # The scores feed TextNorm directly.
    assert main(["metrics", "--store", str(image_store.root), "--set", "counting",
                 "--reward", "textnorm(tiny-clip, tau=0.01)"]) == 0


def test_scores_do_not_depend_on_the_batch_size(tmp_path, mini_release):
    tables = []
    for batch_size in (1, 5):
        store = Store(tmp_path / f"store{batch_size}")
        ingest_tia2(store, str(mini_release))
        import_images(store, "counting", write_images(mini_release, tmp_path / f"img{batch_size}", ("counting",)) / "counting")
        score_images(store, create_reward_model("tiny-pickscore"), batch_size=batch_size)
        tables.append(store.connect().execute("SELECT image_id, text, score FROM scores ORDER BY 1, 2").df())
    np.testing.assert_allclose(tables[0]["score"], tables[1]["score"], atol=1e-5)


def test_corrupt_image_is_recorded_and_the_rest_scored(image_store, capsys):
    path = image_store.connect().execute(
        "SELECT path FROM images WHERE set = 'counting' ORDER BY file LIMIT 1").fetchall()[0][0]
    with open(path, "wb") as fh:
        fh.write(b"not a jpeg at all")
    assert main(["score", "--reward-model", "tiny-hpsv2", "--store", str(image_store.root)]) == 1
    captured = capsys.readouterr()
    assert "scored 15 images" in captured.out and "1 images could not be scored" in captured.err
    failures = image_store.read("score_failures").to_pylist()
    assert len(failures) == 1 and "UnidentifiedImageError" in failures[0]["reason"]
    assert image_store.read("scores").num_rows == 15 * 4


@pytest.mark.slow
def test_killed_scoring_resumes_to_exactly_the_expected_rows(tmp_path, mini_release):
    release = make_release(tmp_path / "big_release", captions_per_set=4, images_per_caption=10)
    store = Store(tmp_path / "store")
    ingest_tia2(store, str(release))
    images = write_images(release, tmp_path / "images", ("counting",))
    import_images(store, "counting", images / "counting")
    expected = 40 * 4
    env = dict(os.environ, PYTHONPATH=str(PROJECT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "cli", "score", "--reward-model", "tiny-clip",
               "--batch-size", "1", "--store", str(store.root)]
    for delay in (4.0, 5.0):  # kill twice, at different points, while parts are being written
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and not list((store.root / "scores").glob("part-*.parquet")):
            time.sleep(0.05)
        time.sleep(delay - 4.0 + 0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    partial = store.read("scores").num_rows
    assert 0 < partial < expected
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    con = store.connect()
    total, distinct = con.execute("SELECT count(*), count(DISTINCT (image_id, text)) FROM scores").fetchall()[0]
    assert total == distinct == expected
    # A kill mid-write leaves at most an orphaned temp file, which no reader ever sees.
    import pyarrow.parquet as pq

    assert sum(pq.read_metadata(p).num_rows for p in (store.root / "scores").glob("*.parquet")) == expected


def test_missing_weights_offline_is_one_line(tmp_path, capsys, monkeypatch):
    store = Store(tmp_path / "store")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["score", "--reward-model", "clip", "--store", str(store.root)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "timm/vit_base_patch32_clip_224.openai" in err and "--weights PATH" in err


def test_unknown_model_is_named(tmp_path, capsys):
    store = Store(tmp_path / "store")
    assert main(["score", "--reward-model", "nope", "--store", str(store.root)]) == 2
    assert "unknown reward model 'nope'" in capsys.readouterr().err
