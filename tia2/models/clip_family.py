"""CLIP-family reward models (dual encoders).

- open_clip models (`clip`: ViT-B/32 with OpenAI weights; `hpsv2`: HPSv2.1 on ViT-H/14):
  open_clip's own `CLIP` class built from the config's architecture, its checkpoint loader and
  its BPE tokenizer (shipped with the package, so offline works); each model's official image
  preprocessing (`OpenClipRewardModel`).
- Hugging Face CLIP (`pickscore`): transformers' `CLIPModel`, `logit_scale.exp() × cosine` as
  in PickScore's model card, the processor of laion/CLIP-ViT-H-14 (its tokenizer and image
  processor) for released weights, the same settings built locally for random weights. The
  image processor is transformers' PIL one (`CLIPImageProcessorPil`), after Pillow's plain
  `convert("RGB")`: what PickScore's code ran (transformers 4.27); transformers 5's default
  class resizes with torchvision, one grey level off at a fraction of the pixels.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import open_clip
import torch
from torchvision.transforms.functional import to_tensor
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from tia2.errors import UserError
from tia2.models.base import (DualEncoderRewardModel, folder_weights_file, resolve_weights_file,
                              resolve_weights_folder, weights_identity)


class OpenClipRewardModel(DualEncoderRewardModel):
    """Each model's official preprocessing, by the config's `geometry`:

    - "crop" (`clip`): open_clip's eval transform (OpenAI CLIP's too): in the image's own mode,
      the shortest side to image_size (bicubic, Pillow) and a centre crop; then RGB, ToTensor,
      normalise. The order matters: Pillow resizes RGBA premultiplied by alpha and palette ("P")
      images with NEAREST whatever is asked, so converting first gives other pixels.
    - "pad" (`hpsv2`): HPSv2's scorer (`img_score.py`, `light_augmentation=True`): RGB first,
      ToTensor, then `ResizeMaxSize` on the float tensor (the longest side to image_size,
      bicubic, no uint8 rounding; zero padding, centred), then normalise: the padding is
      -mean/std. HPSv2 converts every mode but RGBA with `convert("RGB")` (L: grey in all three
      channels; P: through its palette; LA and transparent palettes: alpha dropped). It keeps
      RGBA as four channels, which its model then rejects; here RGBA is converted like the
      rest: alpha is dropped and the colour channels stay as stored (not composited on any
      background), which are exactly the colour channels HPSv2's transform gives for RGBA.
      An image whose longest side is already image_size is padded as well (HPSv2 leaves it
      unpadded, and its model cannot take a non-square input).
    """

    def __init__(self, name: str, config: dict, weights: str, seed: int):
        super().__init__()
        arch = config["arch"]
        self.name = name
        self.clip = open_clip.model.CLIP(
            embed_dim=arch["embed_dim"], vision_cfg=open_clip.model.CLIPVisionCfg(**arch["vision_cfg"]),
            text_cfg=open_clip.model.CLIPTextCfg(**arch["text_cfg"]), quick_gelu=arch.get("quick_gelu", False))
        if weights == "random":
            self.identity = f"random-init:{seed}"
        else:
            path = resolve_weights_file(name, config["weights"], weights)
            open_clip.load_checkpoint(self.clip, str(path), weights_only=False)
            self.identity = weights_identity(config["weights"]["hf_repo"], path)
        pre = config["preprocess"]
        self.image_size = arch["vision_cfg"]["image_size"]
        self.mean, self.std = tuple(pre["mean"]), tuple(pre["std"])
        self.geometry = pre["geometry"]
        if self.geometry == "crop":
            self.transform = open_clip.image_transform(
                self.image_size, is_train=False, mean=self.mean, std=self.std,
                resize_mode="shortest", interpolation="bicubic")
        elif self.geometry != "pad":
            raise UserError(f"{name}: geometry {self.geometry!r}: open_clip models take 'crop' or 'pad'")
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=arch["text_cfg"]["context_length"])
        self._scale = config["score"]["scale"]  # "logit_scale" or a number (1: plain cosine)

    def preprocess(self, images) -> torch.Tensor:
        if self.geometry == "pad":  # HPSv2: RGB and a float tensor first, then the tensor path
            return torch.cat([self.preprocess_tensor(to_tensor(image.convert("RGB"))[None]) for image in images])
        return torch.stack([self.transform(image) for image in images])

    def encode_images(self, pixels):
        return self.clip.encode_image(pixels.to(self._dtype()), normalize=True).float()

    def encode_texts(self, texts):
        tokens = self.tokenizer(texts).to(self.clip.logit_scale.device)
        return self.clip.encode_text(tokens, normalize=True).float()

    def score_scale(self):
        return self.clip.logit_scale.exp().float() if self._scale == "logit_scale" else float(self._scale)

    def _dtype(self) -> torch.dtype:
        return self.clip.visual.conv1.weight.dtype


class HFClipRewardModel(DualEncoderRewardModel):
    def __init__(self, name: str, config: dict, weights: str, seed: int):
        super().__init__()
        self.name = name
        pre = config["preprocess"]
        if weights == "random":
            self.clip = CLIPModel(CLIPConfig(**config["arch"]))
            self.identity = f"random-init:{seed}"
            self.use_image_processor(CLIPImageProcessorPil(**pre["image_processor"]))
            self.tokenizer = clip_bpe_tokenizer()
        else:
            folder = resolve_weights_folder(name, config["weights"], weights)
            self.clip = CLIPModel.from_pretrained(folder, dtype=torch.float32)  # a half-precision release too
            self.identity = weights_identity(config["weights"]["hf_repo"], folder_weights_file(folder))
            processor = resolve_weights_folder(name, config["processor"], "pretrained")
            self.use_image_processor(CLIPImageProcessorPil.from_pretrained(processor))
            self.tokenizer = CLIPTokenizer.from_pretrained(processor)
        check_tokenizer(name, self.tokenizer)
        self.max_length = pre["max_length"]

    def encode_images(self, pixels):
        features = self.clip.get_image_features(pixel_values=pixels.to(self.clip.dtype))
        features = getattr(features, "pooler_output", features)  # transformers 5 returns an output object
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def encode_texts(self, texts):
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.clip.device)
        features = self.clip.get_text_features(**tokens)
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def score_scale(self):
        return self.clip.logit_scale.exp().float()


def check_tokenizer(name: str, tokenizer) -> None:
    """transformers 5 offline can silently hand back a tokenizer of a few tokens (NOTES.md)."""
    if len(tokenizer) < 1000:
        raise UserError(f"{name}: the tokenizer loaded with only {len(tokenizer)} tokens: its "
                        f"vocabulary files are missing from the model folder or HF cache")


def clip_bpe_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer built from the BPE vocabulary open_clip ships: the same token ids as the
    released CLIP tokenizers, with no download. A new one per call (0.2 s): the Rust tokenizer
    keeps each call's padding and truncation in its own state, so two pipelines sharing one in
    threads (generation shards) padded each other's batches ("Sizes of tensors must match")."""
    folder = Path.home() / ".cache" / "tia2" / "clip-bpe"
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if not vocab_file.exists():
        folder.mkdir(parents=True, exist_ok=True)
        lines = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
        byte_chars = list(open_clip.tokenizer.bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        tmp = folder / f".vocab.{id(vocab)}.tmp"
        merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        tmp.write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
        tmp.replace(vocab_file)
    return CLIPTokenizer(str(vocab_file), str(merges_file), pad_token="<|endoftext|>", model_max_length=77)
