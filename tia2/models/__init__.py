"""Reward models: a registry of named configs and one entry point whose weight source is one
argument (after open_clip's factory).

    create_reward_model("clip")                      released weights: the hub when online, the
                                                     HF cache when HF_HUB_OFFLINE=1
    create_reward_model("clip", weights="/models/x") a local file or folder in the released format
    create_reward_model("clip", weights="random")    the full-size architecture, random weights
    create_reward_model("tiny-clip")                 a tiny twin: same classes, small config

Configs are JSON files in `configs/` (architecture, released weights, preprocessing, score).
Every model (a `tia2.models.base.RewardModel`) exposes `preprocess` (the reference
preprocessing of PIL images), `encode_images` (once per image), `score_encoded` (any number of texts per encoded image, reusing the image
encoding) and `forward(pixels, texts)`, a differentiable path from pixels to rewards.
"""

from __future__ import annotations

import json
from pathlib import Path

from tia2.errors import UserError

class ConfigRegistry:
    """Named JSON configs in one folder (after open_clip's `model_configs/`), read on use: no
    module-level mutable registry."""

    def __init__(self, folder: Path, kind: str):
        self.folder, self.kind = folder, kind

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.json"))

    def config(self, name: str) -> dict:
        path = self.folder / f"{name}.json"
        if not path.exists():
            raise UserError(f"unknown {self.kind} {name!r} (known: {', '.join(self.names())})")
        return json.loads(path.read_text())

    @staticmethod
    def weights_source(name: str, has_release: bool, weights: str) -> str:
        """"pretrained", "random" or a path; tiny twins have no release and are always random."""
        if has_release:
            return weights
        if weights not in ("pretrained", "random"):
            raise UserError(f"{name} is a tiny random-weight twin: it loads no weights")
        return "random"


REWARD_MODELS = ConfigRegistry(Path(__file__).parent / "configs", "reward model")
list_models = REWARD_MODELS.names
model_config = REWARD_MODELS.config


def create_reward_model(name: str, weights: str = "pretrained", seed: int = 0, device: str = "cpu"):
    """Build a registered reward model. `weights`: "pretrained", "random" or a local path.
    Tiny twins have no released weights: they are always random (seeded)."""
    from tia2.models import aesthetic, blip2, clip_family, imagereward
    from tia2.seeding import seeded_init

    config = model_config(name)
    weights = REWARD_MODELS.weights_source(name, config.get("weights") is not None, weights)
    families = {"open_clip": clip_family.OpenClipRewardModel, "hf_clip": clip_family.HFClipRewardModel,
                "blip2_itm": blip2.Blip2ItmRewardModel, "imagereward": imagereward.ImageRewardModel,
                "aesthetic": aesthetic.AestheticRewardModel}
    with seeded_init(seed):
        model = families[config["family"]](name, config, weights, seed)
    return model.to(device).eval()
