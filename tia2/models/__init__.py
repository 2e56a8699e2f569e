"""Reward models: a registry of named configs and one entry point whose weight source is one
argument (after open_clip's factory).

    create_reward_model("clip")                      released weights: the hub when online, the
                                                     HF cache when HF_HUB_OFFLINE=1
    create_reward_model("clip", weights="/models/x") a local file or folder in the released format
    create_reward_model("clip", weights="random")    the full-size architecture, random weights
    create_reward_model("tiny-clip")                 a tiny twin: same classes, small config

Configs are JSON files in `configs/` (architecture, released weights, preprocessing, score).
Reward models trained here (`tia2 train-reward`) are registered in a store instead, under
`<store>/reward_models/NAME/` (`config.json`: the base's family, architecture, preprocessing and
score, with a `trained` section; `model.safetensors`: the whole module's weights): pass the store
to see them (`list_models(store)`, `model_config(name, store)`, `create_reward_model(name,
store=store)`). A trained model is built as its base's architecture with random weights, then given
its weights; its identity is `NAME@sha256:<12 hex>` of the weights file, so scores of other weights
under the same name are another version.
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
TRAINED_CONFIG, TRAINED_WEIGHTS = "config.json", "model.safetensors"  # a registered trained model's files


def trained_models_folder(store) -> Path | None:
    """Where a store (a `tia2.store.Store` or a store root) registers trained reward models; None
    without a store."""
    if store is None:
        return None
    from tia2.store import Store, reward_models_folder

    return store.reward_models_dir if isinstance(store, Store) else reward_models_folder(store)


def trained_models(store) -> list[str]:
    """The names of the reward models trained and registered in `store`."""
    folder = trained_models_folder(store)
    return sorted(p.parent.name for p in folder.glob(f"*/{TRAINED_CONFIG}")) if folder else []


def list_models(store=None) -> list[str]:
    """The built-in reward models, and with a store the ones trained there."""
    return REWARD_MODELS.names() + [n for n in trained_models(store) if n not in REWARD_MODELS.names()]


def model_config(name: str, store=None) -> dict:
    """A built-in model's config, or (with a store) a trained model's."""
    if name not in REWARD_MODELS.names() and name in trained_models(store):
        return json.loads((trained_models_folder(store) / name / TRAINED_CONFIG).read_text())
    if name not in REWARD_MODELS.names():
        raise UserError(f"unknown reward model {name!r} (known: {', '.join(list_models(store))})")
    return REWARD_MODELS.config(name)


def create_reward_model(name: str, weights: str = "pretrained", seed: int = 0, device: str = "cpu", store=None):
    """Build a registered reward model. `weights`: "pretrained", "random" or a local path.
    Tiny twins have no released weights: they are always random (seeded). With `store`, the
    models trained there too: "pretrained" is their registered weights, a path another weights
    file of the same architecture."""
    from tia2.models import aesthetic, blip2, clip_family, imagereward
    from tia2.seeding import seeded_init

    config = model_config(name, store)
    trained = config.get("trained")
    weights = REWARD_MODELS.weights_source(name, trained is not None or config.get("weights") is not None, weights)
    families = {"open_clip": clip_family.OpenClipRewardModel, "hf_clip": clip_family.HFClipRewardModel,
                "blip2_itm": blip2.Blip2ItmRewardModel, "imagereward": imagereward.ImageRewardModel,
                "aesthetic": aesthetic.AestheticRewardModel}
    with seeded_init(seed):
        model = families[config["family"]](name, config, "random" if trained else weights, seed)
    if trained and weights != "random":
        path = trained_models_folder(store) / name / TRAINED_WEIGHTS if weights == "pretrained" else Path(weights)
        _load_trained_weights(model, path)
    return model.to(device).eval()


def _load_trained_weights(model, path: Path) -> None:
    """A trained model's weights: the whole module's state, as `tia2 train-reward` saves it."""
    from safetensors.torch import load_model

    from tia2.models.base import weights_identity

    if not path.is_file():
        raise UserError(f"{model.name}: no weights file at {path}")
    try:
        load_model(model, str(path), strict=True)
    except Exception as exc:  # safetensors raises several kinds for a file of another architecture
        raise UserError(f"{model.name}: {path} does not match its architecture ({str(exc).splitlines()[0][:200]})") \
            from exc
    model.identity = weights_identity(model.name, path)
