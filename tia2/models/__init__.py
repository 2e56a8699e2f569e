"""Reward models: a registry of named configs and one entry point whose weight source is one
argument (after open_clip's factory).

    create_reward_model("clip")                      released weights: the hub when online, the
                                                     HF cache when HF_HUB_OFFLINE=1
    create_reward_model("clip", weights="/models/x") a local file or folder in the released format
    create_reward_model("clip", weights="random")    the full-size architecture, random weights
    create_reward_model("tiny-clip")                 a tiny twin: same classes, small config

Configs are JSON files in `configs/` (architecture, released weights, preprocessing, score).
Every model (a `tia2.models.base.RewardModel`) exposes `preprocess` (the reference preprocessing of PIL images), `encode_images`
(once per image), `score_encoded` (any number of texts per encoded image, reusing the image
encoding) and `forward(pixels, texts)`, a differentiable path from pixels to rewards.
"""

from __future__ import annotations

import json
from pathlib import Path

from tia2.errors import UserError

CONFIG_DIR = Path(__file__).parent / "configs"


def list_models() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def model_config(name: str) -> dict:
    path = CONFIG_DIR / f"{name}.json"
    if not path.exists():
        raise UserError(f"unknown reward model {name!r} (known: {', '.join(list_models())})")
    return json.loads(path.read_text())


def create_reward_model(name: str, weights: str = "pretrained", seed: int = 0, device: str = "cpu"):
    """Build a registered reward model. `weights`: "pretrained", "random" or a local path.
    Tiny twins have no released weights: they are always random (seeded)."""
    from tia2.models import aesthetic, blip2, clip_family, imagereward

    config = model_config(name)
    if config.get("weights") is None:
        if weights not in ("pretrained", "random"):
            raise UserError(f"{name} is a tiny random-weight twin: it loads no weights")
        weights = "random"
    families = {"open_clip": clip_family.OpenClipRewardModel, "hf_clip": clip_family.HFClipRewardModel,
                "blip2_itm": blip2.Blip2ItmRewardModel, "imagereward": imagereward.ImageRewardModel,
                "aesthetic": aesthetic.AestheticRewardModel}
    model = families[config["family"]](name, config, weights, seed)
    return model.to(device).eval()
