"""The reward-model interface and the loading of released weights, shared by every family."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from tia2.errors import UserError


class RewardModel(torch.nn.Module):
    """A reward r(image, text) with an image encoder that is run once per image."""

    name: str
    identity: str  # weights identity: "<source>@sha256:<12 hex>" or "random-init:<seed>"
    # The revision of the scoring code (preprocessing, tokenisation, score formula). Bump it with
    # any change that moves a score, so that stored scores of older code are recomputed, not
    # kept (README, "Scorer revisions"). 2: the official preprocessing of each model (issue 14).
    scorer_revision = 2
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # How `preprocess` fits an image into image_size², which `preprocess_tensor` follows:
    # "crop": shortest side to image_size, then centre crop (CLIP, ImageReward, PickScore);
    # "squash": resized to image_size² whatever its aspect ratio (BLIP-2);
    # "pad": longest side to image_size, then zero padding, centred (HPSv2).
    geometry = "crop"

    image_processor = None  # a transformers image processor, for the models whose reference uses one

    @property
    def version(self) -> str:
        """A stored score's `model_version`: the weights and the scoring code that made it."""
        return f"{self.identity}/scorer-{self.scorer_revision}"

    def use_image_processor(self, processor) -> None:
        """Preprocess with a transformers image processor, the reference's own."""
        self.image_processor = processor
        # `preprocess` has Pillow convert to RGB first, as the references did (transformers 4,
        # LAVIS); transformers 5's own conversion would then composite onto white the transparent
        # colour that Pillow keeps in the converted image's info (palette PNGs with one, say).
        processor.do_convert_rgb = False
        size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
        self.image_size = size["height"]
        self.mean, self.std = tuple(processor.image_mean), tuple(processor.image_std)

    def preprocess(self, images) -> torch.Tensor:
        """The reference preprocessing of a list of PIL images into a pixel batch."""
        if self.image_processor is None:
            raise NotImplementedError
        return self.image_processor(images=[image.convert("RGB") for image in images],
                                    return_tensors="pt")["pixel_values"]

    def preprocess_tensor(self, images01: torch.Tensor) -> torch.Tensor:
        """Differentiable preprocessing of a [B, 3, H, W] batch in [0, 1] (decoded latents, for
        ReFL), with `preprocess`'s geometry: bicubic antialiased resize, then centre crop,
        nothing, or zero padding (0 before normalising, as HPSv2 pads), then normalise."""
        size = self.image_size
        if self.geometry == "crop":
            x = TF.resize(images01, [size], interpolation=InterpolationMode.BICUBIC, antialias=True)
            x = TF.center_crop(x, [size, size])
        elif self.geometry == "squash":
            x = TF.resize(images01, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        elif self.geometry == "pad":
            x = resize_longest_side_and_pad(images01, size)
        else:
            raise ValueError(f"{self.name}: unknown geometry {self.geometry!r}")
        return TF.normalize(x, list(self.mean), list(self.std))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score_encoded(self, image_features: torch.Tensor, image_index: torch.Tensor,
                      texts: list[str]) -> torch.Tensor:
        """Score pair p = (image_features[image_index[p]], texts[p]) for every p."""
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """One reward per (pixels[i], texts[i]); differentiable in the pixels."""
        index = torch.arange(len(texts), device=pixels.device)
        return self.score_encoded(self.encode_images(pixels), index, texts)


class DualEncoderRewardModel(RewardModel):
    """score = scale · cos(image embedding, text embedding); each distinct text is encoded once."""

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def score_scale(self) -> torch.Tensor | float:
        return 1.0

    def score_encoded(self, image_features, image_index, texts):
        distinct = list(dict.fromkeys(texts))
        position = {t: i for i, t in enumerate(distinct)}
        text_index = torch.tensor([position[t] for t in texts], device=image_features.device)
        text_features = self.encode_texts(distinct)
        return self.score_scale() * (image_features[image_index] * text_features[text_index]).sum(-1)


def resize_longest_side_and_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """HPSv2's `ResizeMaxSize` on a float [..., H, W] tensor: the longest side to `size`
    (bicubic; antialiased, torchvision's default since 0.17, which HPSv2's call keeps), the
    other side rounded as it rounds, then zero padding to size², the odd pixel at the bottom /
    right. One difference, on purpose: an image whose longest side is already `size` is padded
    too (HPSv2 returns it unpadded, and its model then cannot take it)."""
    height, width = images.shape[-2:]
    scale = size / float(max(height, width))
    new_height, new_width = round(height * scale), round(width * scale)
    x = TF.resize(images, [new_height, new_width], interpolation=InterpolationMode.BICUBIC, antialias=True)
    pad_h, pad_w = size - new_height, size - new_width
    return TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)


def reward_head(width: int, dims: list[int]) -> torch.nn.Sequential:
    """The MLP head of the improved aesthetic predictor, reused by ImageReward: linear layers with
    dropout and no activations (as released). Keys: layers.0, .2, .4, .6, .7 for four dims."""
    dropouts = [0.2, 0.2, 0.1]
    layers, previous = [], width
    for i, dim in enumerate(dims):
        layers.append(torch.nn.Linear(previous, dim))
        if i < len(dropouts):
            layers.append(torch.nn.Dropout(dropouts[i]))
        previous = dim
    layers.append(torch.nn.Linear(previous, 1))
    return torch.nn.Sequential(*layers)


# --- released weights -------------------------------------------------------------------------
def resolve_weights_file(name: str, released: dict, weights: str) -> Path:
    """The checkpoint file: `weights` is "pretrained" (hub or HF cache) or a local file/folder."""
    filename = released["filename"]
    if weights != "pretrained":
        path = Path(weights)
        path = path / filename if path.is_dir() else path
        if not path.is_file():
            raise UserError(f"{name}: no weights file at {path} (expected {filename}, as released in "
                            f"{released['hf_repo']})")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(released["hf_repo"], filename))
    except Exception as exc:  # the hub client raises many kinds; all mean "not available here"
        raise UserError(_missing_weights_message(name, released, exc)) from exc


def resolve_weights_folder(name: str, released: dict, weights: str) -> Path:
    """A Hugging Face model folder (config + weights): local path, or the hub / HF cache."""
    if weights != "pretrained":
        path = Path(weights)
        if not (path / "config.json").is_file():
            raise UserError(f"{name}: {path} is not a Hugging Face model folder (no config.json)")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(released["hf_repo"], allow_patterns=released.get("files")))
    except Exception as exc:
        raise UserError(_missing_weights_message(name, released, exc)) from exc


def _missing_weights_message(name: str, released: dict, exc: Exception) -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
    return (f"{name}: weights not found: looked for {released['hf_repo']} "
            f"({released.get('filename', 'model folder')}) in the HF cache {HF_HUB_CACHE}"
            f"{' (HF_HUB_OFFLINE=1, no download)' if offline else ''}: {type(exc).__name__}; "
            f"download them once online, or pass --weights PATH to a local copy")


def folder_weights_file(folder: Path) -> Path:
    """The (first) weights file of a Hugging Face model folder, for its identity."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise UserError(f"{folder}: no *.safetensors or *.bin weights in this model folder")
    return files[0]


def weights_identity(source: str, path: Path) -> str:
    """`source@sha256:<12 hex>` of a checkpoint. Files in the HF cache are blobs named by their
    sha256 (for LFS files), so those are not hashed again."""
    blob = path.resolve().name
    digest = blob if re.fullmatch(r"[0-9a-f]{64}", blob) else _sha256(path)
    return f"{source}@sha256:{digest[:12]}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()
