"""The models that preprocess with a transformers image processor (pickscore, aesthetic, blip2)
against their official code: pixels against fixtures that the official processors made
(tests/fixtures/make_hf_processor_fixtures.py says how), and the text side against PickScore's
and LAVIS's tokenisation."""

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tia2.models import create_reward_model, model_config

FIXTURES = Path(__file__).parent / "fixtures" / "hf_processors"
IMAGES = sorted(path.stem for path in FIXTURES.glob("*.png"))
REFERENCES = {"tiny-pickscore": "clip_64.npz",     # transformers 4.27.3, PickScore's pin
              "tiny-aesthetic": "clip_64.npz",     # 4.30.2, ddpo-pytorch's pin: the same bytes
              "tiny-blip2": "lavis_blip_64.npz"}   # LAVIS 1.0.2's blip_image_eval
LONG_PROMPT = " ".join(["a watercolour painting of a red fox in a snowy birch forest at dawn"] * 8)


@cache
def tiny_model(name):
    return create_reward_model(name)


def test_the_fixtures_cover_every_mode_and_shape():
    modes = set()
    for name in IMAGES:
        with Image.open(FIXTURES / f"{name}.png") as image:
            modes.add(image.mode)
    assert modes == {"RGB", "RGBA", "P", "L"} and len(IMAGES) == 7
    assert all(set(np.load(FIXTURES / reference).files) == set(IMAGES) for reference in REFERENCES.values())


@pytest.mark.parametrize("tiny_name", REFERENCES)
def test_the_full_size_processor_is_the_tiny_ones_at_224(tiny_name):
    """The fixtures are made at the twins' 64 px; the released models differ only in size."""
    tiny = model_config(tiny_name)["preprocess"]["image_processor"]
    full = model_config(tiny_name.removeprefix("tiny-"))["preprocess"]["image_processor"]
    sizes = {"size", "crop_size"} & tiny.keys()
    assert {k: v for k, v in tiny.items() if k not in sizes} == {k: v for k, v in full.items() if k not in sizes}
    assert all(tiny[key] == dict.fromkeys(tiny[key], 64) and full[key] == dict.fromkeys(tiny[key], 224)
               for key in sizes)


@pytest.mark.parametrize("image_name", IMAGES)
@pytest.mark.parametrize("model_name", REFERENCES)
def test_preprocessing_gives_the_official_pixels(model_name, image_name):
    """Bit for bit, the image as read from disk in its own mode (the P image has a transparent
    index, the RGBA one alpha from 0 to 255, rgb_5x3 is 3 pixels tall)."""
    expected = torch.from_numpy(np.load(FIXTURES / REFERENCES[model_name])[image_name])
    with Image.open(FIXTURES / f"{image_name}.png") as image:
        got = tiny_model(model_name).preprocess([image])
    assert got.shape == (1, *expected.shape) and got.dtype == torch.float32
    torch.testing.assert_close(got[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("eos_token_id", [49407, 2])  # 2: configs older than transformers 4.31 (argmax)
def test_pickscore_padding_to_77_gives_the_same_text_embeddings(eos_token_id):
    """So the same scores: PickScore's training code pads every text to 77 tokens, its eval code
    and this model to the longest; CLIP reads the text at its end-of-text token, which attends
    to no padding."""
    model = tiny_model("tiny-pickscore")
    texts = ["a cat", "two dogs playing with a red ball in the park", LONG_PROMPT]
    assert len(model.tokenizer(LONG_PROMPT)["input_ids"]) > 77
    text_model = model.clip.text_model
    default_eos, text_model.eos_token_id = text_model.eos_token_id, eos_token_id
    try:
        with torch.no_grad():
            got = model.encode_texts(texts)
            tokens = model.tokenizer(texts, padding="max_length", truncation=True, max_length=77,
                                     return_tensors="pt")
            features = model.clip.get_text_features(**tokens).pooler_output
    finally:
        text_model.eos_token_id = default_eos
    assert tokens["input_ids"].shape == (3, 77)
    torch.testing.assert_close(got, torch.nn.functional.normalize(features, dim=-1), rtol=0, atol=1e-6)


def test_blip2_text_is_tokenised_as_lavis_processes_it():
    """LAVIS's blip_caption output (the fixture) and this model's give the same tokens."""
    from tia2.models.blip2 import lavis_caption

    tokenizer = tiny_model("tiny-blip2").tokenizer
    for prompt, lavis_text in json.loads((FIXTURES / "lavis_captions.json").read_text()).items():
        expected = tokenizer(lavis_text, truncation=True, max_length=32)["input_ids"]
        assert tokenizer(lavis_caption(prompt), truncation=True, max_length=32)["input_ids"] == expected, prompt


def test_blip2_reads_32_tokens_like_lavis():
    """LAVIS's max_txt_len: what follows the 32nd token (with [CLS] and [SEP]) moves no score."""
    model = tiny_model("tiny-blip2")
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (70, 50, 3), dtype=np.uint8))
    words = LONG_PROMPT.split()
    with torch.no_grad():
        features = model.encode_images(model.preprocess([image]))
        scores = model.score_encoded(features, torch.tensor([0, 0, 0]),
                                     [" ".join(words[:30]), " ".join(words[:30] + ["zebra"] * 9), " ".join(words[:20])])
    assert scores[0] == scores[1] and scores[0] != scores[2]
