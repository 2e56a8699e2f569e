"""Each reward model's `preprocess` against its official preprocessing, on RGB, RGBA, palette,
grey, non-square (both orientations) and tiny images; `preprocess_tensor` (ReFL's path)
against `preprocess`.

The official outputs: open_clip's own eval transform (installed here, the reference for `clip`),
and for HPSv2 and ImageReward fixtures made with their official packages by
tests/fixtures/make_preprocess_fixtures.py (it says how), from the committed PNGs read here.
Those fixtures are at the tiny twins' size (64); a test checks that each full-size model
preprocesses as its twin but for the size."""

from functools import lru_cache
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

from tia2.models import create_reward_model, model_config

FIXTURES = Path(__file__).parent / "fixtures" / "preprocess"
IMAGES = sorted(p.stem for p in FIXTURES.glob("*.png"))
RGB_IMAGES = [name for name in IMAGES if name.startswith("rgb_")]


@lru_cache
def reward_model(name: str):
    with torch.device("meta"):  # preprocessing needs no weights (`clip` has 151M)
        return create_reward_model(name, weights="random", device="meta")


def load(name: str) -> Image.Image:
    with Image.open(FIXTURES / f"{name}.png") as image:
        image.load()
        return image  # in its own mode, as the scoring stage passes it


def official(model: str, name: str) -> torch.Tensor:
    with np.load(FIXTURES / f"{model}_64.npz") as arrays:
        return torch.from_numpy(arrays[name])


def test_the_fixtures_cover_every_mode_and_shape():
    assert {load(name).mode for name in IMAGES} == {"RGB", "RGBA", "P", "L"}
    assert {"rgb_100x40", "rgb_36x90", "rgb_3x5", "rgb_64x40"} <= set(IMAGES)


@pytest.mark.parametrize("name", ["clip", "hpsv2", "imagereward"])
def test_the_tiny_twin_preprocesses_as_the_full_model_but_for_the_size(name):
    def without_size(config):
        return {k: v for k, v in config["preprocess"].items() if k != "image_size"}

    assert without_size(model_config(f"tiny-{name}")) == without_size(model_config(name))


@pytest.mark.parametrize("model_name", ["tiny-clip", "clip"])
@pytest.mark.parametrize("name", IMAGES)
def test_clip_preprocessing_is_open_clips_eval_transform(model_name, name):
    model = reward_model(model_name)
    cfg = open_clip.get_pretrained_cfg("ViT-B-32-quickgelu", "openai")  # what open_clip loads `clip` with
    transform = open_clip.image_transform(model.image_size, is_train=False, mean=cfg["mean"], std=cfg["std"],
                                          interpolation=cfg["interpolation"], resize_mode=cfg["resize_mode"])
    torch.testing.assert_close(model.preprocess([load(name)])[0], transform(load(name)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", IMAGES)
def test_imagereward_preprocessing_is_imagerewards_transform(name):
    model = reward_model("tiny-imagereward")
    torch.testing.assert_close(model.preprocess([load(name)])[0], official("imagereward", name), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", IMAGES)
def test_hpsv2_preprocessing_is_hpsv2s_scorer(name):
    model = reward_model("tiny-hpsv2")
    ours, theirs = model.preprocess([load(name)])[0], official("hpsv2", name)
    if name.startswith("rgba_"):
        # HPSv2 keeps RGBA's alpha as a fourth channel (its model then rejects the input); the
        # project's rule drops it, which leaves exactly HPSv2's three colour channels.
        theirs = theirs[:3]
    if name == "rgb_64x40":
        # The longest side is already 64: HPSv2 returns it unpadded (3×40×64, which its model
        # cannot take); the project pads it as it pads every other size.
        assert theirs.shape == (3, 40, 64)
        padding = -torch.tensor(model.mean) / torch.tensor(model.std)
        torch.testing.assert_close(ours[:, :12], padding[:, None, None].expand(3, 12, 64))
        torch.testing.assert_close(ours[:, 52:], padding[:, None, None].expand(3, 12, 64))
        ours = ours[:, 12:52]
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_name", ["tiny-clip", "tiny-hpsv2", "tiny-imagereward"])
@pytest.mark.parametrize("name", RGB_IMAGES)
def test_the_tensor_path_has_the_geometry_of_preprocess(model_name, name):
    model = reward_model(model_name)
    image = load(name)
    from_pil = model.preprocess([image])[0]
    from_tensor = model.preprocess_tensor(to_tensor(image)[None])[0]
    grey_levels = (from_pil - from_tensor).abs() * torch.tensor(model.std)[:, None, None] * 255
    if model.geometry == "pad":  # HPSv2 resizes the float tensor: the same computation
        assert grey_levels.max() < 1e-4
    else:
        # Pillow resizes in two uint8 passes, rounding and clipping the bicubic overshoot of
        # each; the float path does neither. On these noisy images that is up to 9 grey levels
        # at a few pixels and a third of a level on average; a one-pixel shift of the geometry
        # would be about 15 on average.
        assert grey_levels.mean() < 0.5 and grey_levels.max() < 12
