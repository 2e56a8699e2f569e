"""Image generation on the tiny Stable Diffusion twin."""

import pytest
from PIL import Image

from tasks.generate import batch_size_for_memory, generate_images, prompts_to_generate
from tasks.ingest import ingest_tia2
from tests.support.hub import hub_snapshot
from tests.support.project import PROJECT
from tests.support.stores import make_release
from cli.main import main
from tia2.models.diffusion import create_pipeline, generator_config
from tia2.store import Store


@pytest.fixture(scope="module")
def tiny_sd():
    return create_pipeline("tiny-sd")


def _made(store):
    return sorted(store.connect().execute(
        "SELECT image_id, sha256, seed, generator, steps, guidance FROM images WHERE sha256 IS NOT NULL").fetchall())


@pytest.mark.slow
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


@pytest.mark.slow
def test_shards_split_the_prompts_and_make_the_same_images(tmp_path, mini_release, tiny_sd):
    whole = Store(tmp_path / "whole")
    ingest_tia2(whole, str(mini_release))
    everything = prompts_to_generate(whole)
    shards = [prompts_to_generate(whole, shard=(i, 4)) for i in range(4)]
    assert sorted(p for shard in shards for p in shard) == sorted(everything) and all(shards)
    generate_images(whole, tiny_sd, None, images_per_prompt=1, steps=2)
    split = Store(tmp_path / "split")
    ingest_tia2(split, str(mini_release))
    reports = [generate_images(split, tiny_sd, None, images_per_prompt=1, steps=2, shard=(i, 2)) for i in range(2)]
    assert [r.images for r in reports] == [3, 3]
    assert _made(split) == _made(whole)


def test_batch_size_from_free_memory():
    gib = 2**30
    # 0.5 GiB more per image; 2.5 GiB whatever the batch; 9 of 10 GiB usable
    assert batch_size_for_memory(10 * gib, 3 * gib, int(3.5 * gib)) == 13
    assert batch_size_for_memory(80 * gib, 3 * gib, int(3.5 * gib), limit=64) == 64
    assert batch_size_for_memory(2 * gib, 3 * gib, int(3.5 * gib)) == 1  # never below one


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_released_pipeline_folder_loads_by_model_id_offline(tmp_path, mini_release, tiny_sd):
    """A pipeline saved in the diffusers folder layout under SD 2.1's repo id in a temporary HF
    cache is loaded by `tia2 generate --model sd-2-1` with HF_HUB_OFFLINE=1 and makes the same
    images as the pipeline it was saved from (its config is tiny, so this runs on the CPU)."""
    import os
    import subprocess
    import sys

    snapshot = hub_snapshot(tmp_path / "hub", "stabilityai/stable-diffusion-2-1")
    tiny_sd.pipeline.save_pretrained(snapshot, safe_serialization=True)
    reference = Store(tmp_path / "reference")
    ingest_tia2(reference, str(mini_release))
    generate_images(reference, tiny_sd, ["counting"], images_per_prompt=1, steps=2)
    store = Store(tmp_path / "store")
    ingest_tia2(store, str(mini_release))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), PYTHONPATH=str(PROJECT))
    out = subprocess.run([sys.executable, "-m", "cli", "generate", "--model", "sd-2-1", "--set", "counting",
                          "--steps", "2", "--store", str(store.root)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    made = store.connect().execute("SELECT sha256, generator FROM images WHERE sha256 IS NOT NULL ORDER BY 1").fetchall()
    expected = reference.connect().execute("SELECT sha256 FROM images WHERE sha256 IS NOT NULL ORDER BY 1").fetchall()
    assert [m[0] for m in made] == [e[0] for e in expected]
    assert all(g.startswith("sd-2-1@stabilityai/stable-diffusion-2-1@sha256:") for _, g in made)


@pytest.mark.slow
def test_lora_adapter_changes_the_images_and_is_recorded(tmp_path, mini_release, capsys):
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    adapter = create_pipeline("tiny-sd", seed=0).pipeline.unet
    adapter.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at zero (no effect): give it weights, as training would
        for name, param in adapter.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "adapter", unet_lora_layers=get_peft_model_state_dict(adapter))

    store = Store(tmp_path / "s")
    ingest_tia2(store, str(mini_release))
    common = ["generate", "--model", "tiny-sd", "--set", "counting", "--steps", "2", "--store", str(store.root)]
    assert main(common) == 0
    assert main([*common, "--lora", str(tmp_path / "adapter")]) == 0
    assert "made 2 images" in capsys.readouterr().out.splitlines()[-1]
    rows = store.connect().execute(
        "SELECT prompt_id, lora, sha256 FROM images WHERE sha256 IS NOT NULL ORDER BY prompt_id, lora NULLS FIRST").fetchall()
    assert len(rows) == 4
    for base, adapted in (rows[0:2], rows[2:4]):
        assert base[1] is None and adapted[1].startswith("pytorch_lora_weights.safetensors@sha256:")
        assert base[2] != adapted[2]
    assert main([*common, "--lora", str(tmp_path / "nothing")]) == 2
    assert "no LoRA adapter at" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_generation_resumes_to_exactly_the_expected_images(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    release = make_release(tmp_path / "release", captions_per_set=3, images_per_caption=2)
    store = Store(tmp_path / "store")
    ingest_tia2(store, str(release))
    env = dict(os.environ, PYTHONPATH=str(PROJECT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "cli", "generate", "--model", "tiny-sd", "--set", "counting",
               "--images-per-prompt", "4", "--steps", "3", "--batch-size", "1", "--store", str(store.root)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(store.images_dir.rglob("*.png")):
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    made_before = store.connect().execute("SELECT count(*) FROM images WHERE sha256 IS NOT NULL").fetchall()[0][0]
    assert 0 < made_before < 12
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"({made_before} already present)" in done.stdout
    total, distinct = store.connect().execute(
        "SELECT count(*), count(DISTINCT image_id) FROM images WHERE sha256 IS NOT NULL").fetchall()[0]
    assert total == distinct == 12
