"""The released-weights path of every model, without the released weights: a random checkpoint
is written in the released format (file names, folder layout, state-dict keys) into a temporary
Hugging Face cache, and `tia2 score` loads it with HF_HUB_OFFLINE=1 and must give back the
scores of the model the checkpoint came from."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.ingest import import_images, ingest_tia2
from tests.support.hub import hub_snapshot
from tests.support.project import PROJECT
from tests.support.stores import make_release
from tia2.models import create_reward_model
from tia2.models.clip_family import clip_bpe_tokenizer
from tia2.store import Store

pytestmark = pytest.mark.slow
@pytest.fixture
def two_image_store(tmp_path):
    release = make_release(tmp_path / "release", captions_per_set=1, images_per_caption=2)
    store = Store(tmp_path / "store")
    ingest_tia2(store, str(release))
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (240, 260, 3), dtype=np.uint8)).save(folder / f"image_1_0_{i}.jpg")
    import_images(store, "counting", folder)
    return store


def expected_scores(store, model):
    """The source model's scores for every (image, text) pair `tia2 score` will write."""
    from tasks.score import _load_image, pending_pairs

    pairs = pending_pairs(store, model.name, "none")
    paths = list(dict.fromkeys(pairs["path"]))
    with torch.no_grad():
        features = model.encode_images(model.preprocess([_load_image(p) for p in paths]))
        index = torch.tensor([paths.index(p) for p in pairs["path"]])
        scores = model.score_encoded(features, index, pairs["text"].tolist())
    return dict(zip(zip(pairs["image_id"], pairs["text"]), scores.double().numpy()))


def score_offline(store, name, cache):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), PYTHONPATH=str(PROJECT))
    out = subprocess.run([sys.executable, "-m", "cli", "score", "--reward-model", name,
                          "--store", str(store.root)], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = store.connect().execute(
        "SELECT image_id, text, score, model_version FROM scores WHERE reward_model = ?", [name]).fetchall()
    return {(i, t): s for i, t, s, _ in rows}, {v for *_, v in rows}


def save_half_precision_release(module, folder):
    """Save a transformers model in half precision (2 GB instead of 4 for ViT-H) and round the
    source to the same values, so its scores are what the saved release gives."""
    module.half().save_pretrained(folder)
    module.float()


def assert_same_scores(got, expected):
    assert got.keys() == expected.keys() and len(got) == 2 * 4
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-4, atol=1e-5)


def test_clip_openai_checkpoint_from_the_hf_cache(tmp_path, two_image_store):
    source = create_reward_model("clip", weights="random", seed=7)
    snapshot = hub_snapshot(tmp_path / "hub", "timm/vit_base_patch32_clip_224.openai")
    torch.save(source.clip.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    expected = expected_scores(two_image_store, source)
    got, versions = score_offline(two_image_store, "clip", tmp_path / "hub")
    assert_same_scores(got, expected)
    assert len(versions) == 1 and next(iter(versions)).startswith("timm/vit_base_patch32_clip_224.openai@sha256:")


def test_hpsv2_checkpoint_from_the_hf_cache(tmp_path, two_image_store):
    source = create_reward_model("hpsv2", weights="random", seed=7)
    # HPSv2.1's release is a dict with the state dict under "state_dict", in half precision.
    state = {k: v.half() for k, v in source.clip.state_dict().items()}
    source.clip.load_state_dict(state)  # the source model as the released file rounds it
    snapshot = hub_snapshot(tmp_path / "hub", "xswu/HPSv2")
    torch.save({"epoch": 1, "state_dict": state}, snapshot / "HPS_v2.1_compressed.pt")
    del state
    expected = expected_scores(two_image_store, source)
    del source
    got, _ = score_offline(two_image_store, "hpsv2", tmp_path / "hub")
    assert_same_scores(got, expected)


def test_pickscore_folders_from_the_hf_cache(tmp_path, two_image_store):
    from transformers import CLIPImageProcessor

    source = create_reward_model("pickscore", weights="random", seed=7)
    save_half_precision_release(source.clip, hub_snapshot(tmp_path / "hub", "yuvalkirstain/PickScore_v1"))
    processor_dir = hub_snapshot(tmp_path / "hub", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    clip_bpe_tokenizer().save_pretrained(processor_dir)
    config = json.loads((PROJECT / "tia2/models/configs/pickscore.json").read_text())
    CLIPImageProcessor(**config["preprocess"]["image_processor"]).save_pretrained(processor_dir)
    expected = expected_scores(two_image_store, source)
    del source
    got, versions = score_offline(two_image_store, "pickscore", tmp_path / "hub")
    assert_same_scores(got, expected)
    assert next(iter(versions)).startswith("yuvalkirstain/PickScore_v1@sha256:")


def test_blip2_folder_from_the_hf_cache(tmp_path, two_image_store):
    from transformers import BlipImageProcessor

    from tia2.models.blip2 import bert_base_uncased_tokenizer

    source = create_reward_model("blip2", weights="random", seed=7)
    model_dir = hub_snapshot(tmp_path / "hub", "Salesforce/blip2-itm-vit-g")
    save_half_precision_release(source.blip, model_dir)
    bert_base_uncased_tokenizer().save_pretrained(model_dir)
    config = json.loads((PROJECT / "tia2/models/configs/blip2.json").read_text())
    BlipImageProcessor(**config["preprocess"]["image_processor"]).save_pretrained(model_dir)
    expected = expected_scores(two_image_store, source)
    del source
    got, versions = score_offline(two_image_store, "blip2", tmp_path / "hub")
    assert_same_scores(got, expected)
    assert next(iter(versions)).startswith("Salesforce/blip2-itm-vit-g@sha256:")


def release_format(model) -> dict:
    """The state dict of `ImageReward.pt` as the reference code names it: BLIP's timm-style ViT
    under blip.visual_encoder, BLIP's med BERT under blip.text_encoder, the head under mlp.layers,
    plus the contrastive projections and the position_ids buffer the release also holds."""
    blocks = {"layer_norm1": "norm1", "self_attn.qkv": "attn.qkv", "self_attn.projection": "attn.proj",
              "layer_norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    top = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
           "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
           "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
           "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias"}
    release = {}
    for key, value in model.vision.state_dict().items():
        if key.startswith("encoder.layers."):
            _, _, index, rest = key.split(".", 3)
            module, _, param = rest.rpartition(".")
            release[f"blip.visual_encoder.blocks.{index}.{blocks[module]}.{param}"] = value
        else:
            release[f"blip.visual_encoder.{top[key]}"] = value
    for key, value in model.text.state_dict().items():
        release[f"blip.text_encoder.{key}"] = value
    release["blip.text_encoder.embeddings.position_ids"] = torch.arange(512).expand(1, -1)
    for key, value in model.head.state_dict().items():
        release[f"mlp.layers.{key}"] = value
    release["blip.vision_proj.weight"], release["blip.vision_proj.bias"] = torch.randn(256, 1024), torch.zeros(256)
    release["blip.text_proj.weight"], release["blip.text_proj.bias"] = torch.randn(256, 768), torch.zeros(256)
    return release


MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02,
              "intermediate_size": 3072, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
              "model_type": "bert", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0,
              "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768, "add_cross_attention": True}


def test_imagereward_checkpoint_from_the_hf_cache(tmp_path, two_image_store):
    source = create_reward_model("imagereward", weights="random", seed=7)
    snapshot = hub_snapshot(tmp_path / "hub", "THUDM/ImageReward")
    torch.save(release_format(source), snapshot / "ImageReward.pt")
    (snapshot / "med_config.json").write_text(json.dumps(MED_CONFIG))
    expected = expected_scores(two_image_store, source)
    del source
    got, versions = score_offline(two_image_store, "imagereward", tmp_path / "hub")
    assert_same_scores(got, expected)
    assert next(iter(versions)).startswith("THUDM/ImageReward@sha256:")


def test_aesthetic_predictor_from_the_hf_cache(tmp_path, two_image_store):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    source = create_reward_model("aesthetic", weights="random", seed=7)
    vision = json.loads((PROJECT / "tia2/models/configs/aesthetic.json").read_text())
    # openai/clip-vit-large-patch14 is a whole CLIP model folder; the predictor reads its image tower.
    full = CLIPModel(CLIPConfig(vision_config=vision["arch"]["vision"], projection_dim=768,
                                text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                 num_hidden_layers=12, projection_dim=768)))
    missing, unexpected = full.load_state_dict(source.clip.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("text_model.", "text_projection", "logit_scale")) for k in missing)
    clip_dir = hub_snapshot(tmp_path / "hub", "openai/clip-vit-large-patch14")
    full.save_pretrained(clip_dir)
    CLIPImageProcessor(**vision["preprocess"]["image_processor"]).save_pretrained(clip_dir)
    mlp_dir = hub_snapshot(tmp_path / "hub", "trl-lib/ddpo-aesthetic-predictor")
    torch.save({f"layers.{k}": v for k, v in source.mlp.state_dict().items()}, mlp_dir / "aesthetic-model.pth")
    del full
    expected = expected_scores(two_image_store, source)
    got, versions = score_offline(two_image_store, "aesthetic", tmp_path / "hub")
    assert_same_scores(got, expected)
    assert next(iter(versions)).startswith("trl-lib/ddpo-aesthetic-predictor@sha256:")
