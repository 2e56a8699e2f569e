"""ImageReward (Xu et al. 2023): BLIP's ViT-L/16 image encoder, a BERT text encoder that
cross-attends to the image, and an MLP head on the [CLS] output, normalised by the reward
statistics of the release.

Built on transformers' own BLIP modules (`BlipVisionModel`, `BlipTextModel`: BLIP's BERT with
cross-attention), loading the released `ImageReward.pt` and `med_config.json` through a
state-dict mapping. Why not the `image-reward` package: its metadata points a dependency at a
GitHub URL, its BERT code needs helpers transformers 5 removed and its tokenizer set-up uses an
attribute transformers 5 dropped (../shared/NOTES.md); the architecture is small enough to
state here exactly, and then it runs on the pinned stack and offline.

The image encoder runs once per image; the text encoder runs once per (image, text) pair on the
stored image encoding, which is exactly what the reference `score` computes per pair.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torchvision import transforms
from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from tia2.errors import UserError
from tia2.models.base import RewardModel, resolve_weights_file, reward_head, weights_identity
from tia2.models.blip2 import bert_base_uncased_tokenizer
from tia2.models.clip_family import check_tokenizer


def text_config_from_med(med: dict, vision_width: int) -> dict:
    """BlipTextConfig arguments from BLIP's `med_config.json` (BERT with cross-attention)."""
    return dict(vocab_size=med["vocab_size"], hidden_size=med["hidden_size"],
                intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
                num_attention_heads=med["num_attention_heads"],
                max_position_embeddings=med["max_position_embeddings"],
                layer_norm_eps=med.get("layer_norm_eps", 1e-12), hidden_act=med.get("hidden_act", "gelu"),
                pad_token_id=med.get("pad_token_id", 0), encoder_hidden_size=vision_width, is_decoder=True)


def map_release_state_dict(state: dict) -> dict:
    """Keys of `ImageReward.pt` (BLIP's timm-style ViT, BLIP's med BERT, `mlp.layers`) to this
    module's keys. The contrastive projections (`vision_proj`, `text_proj`) are unused by the
    reward and dropped; any other unknown key is an error."""
    vision_names = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
                    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
                    "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    block_names = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
                   "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    mapped = {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            rest = key.removeprefix("blip.visual_encoder.")
            if rest.startswith("blocks."):
                _, index, name = rest.split(".", 2)
                module, _, param = name.rpartition(".")
                mapped[f"vision.encoder.layers.{index}.{block_names[module]}.{param}"] = value
            else:
                mapped[f"vision.{vision_names[rest]}"] = value
        elif key.startswith("blip.text_encoder."):
            if not key.endswith("position_ids"):
                mapped[f"text.{key.removeprefix('blip.text_encoder.')}"] = value
        elif key.startswith("mlp.layers."):
            mapped[f"head.{key.removeprefix('mlp.layers.')}"] = value
        elif not key.startswith(("blip.vision_proj.", "blip.text_proj.")):
            raise UserError(f"ImageReward checkpoint: unexpected key {key!r}")
    return mapped


def convert_to_rgb(image):
    return image.convert("RGB")


class ImageRewardModel(RewardModel):
    def __init__(self, name: str, config: dict, weights: str, seed: int):
        super().__init__()
        self.name = name
        arch, pre = config["arch"], config["preprocess"]
        vision_config = BlipVisionConfig(**arch["vision"])
        if weights == "random":
            text_args = arch["text"]
        else:
            released = config["weights"]
            # med_config.json sits beside the checkpoint (hub repo, folder, or the file's folder)
            beside = weights if weights == "pretrained" or Path(weights).is_dir() else str(Path(weights).parent)
            med_path = resolve_weights_file(name, {**released, "filename": released["config_filename"]}, beside)
            text_args = text_config_from_med(json.loads(med_path.read_text()), vision_config.hidden_size)
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(BlipTextConfig(**text_args), add_pooling_layer=False)
        self.head = reward_head(text_args["hidden_size"], arch["head_dims"])
        if weights == "random":
            self.identity = f"random-init:{seed}"
        else:
            path = resolve_weights_file(name, config["weights"], weights)
            state = torch.load(path, map_location="cpu", weights_only=True)
            missing, unexpected = self.load_state_dict(map_release_state_dict(state), strict=False)
            missing = [k for k in missing if not k.endswith("position_ids")]
            if missing or unexpected:
                raise UserError(f"{name}: {path} does not match the architecture "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
            self.identity = weights_identity(config["weights"]["hf_repo"], path)
        self.tokenizer = bert_base_uncased_tokenizer(extra_special_tokens=["[ENC]"])
        check_tokenizer(name, self.tokenizer)
        self.image_size = pre["image_size"]
        self.mean, self.std = tuple(pre["mean"]), tuple(pre["std"])
        self.max_length = pre["max_length"]
        self.reward_mean, self.reward_std = config["score"]["mean"], config["score"]["std"]
        # ImageReward's `_transform`: resized and cropped in the image's own mode, RGB after
        # (Pillow resizes RGBA premultiplied and palette images with NEAREST: the order matters)
        self.transform = transforms.Compose([
            transforms.Resize(self.image_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(self.image_size), convert_to_rgb, transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std)])

    def preprocess(self, images) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images])

    def encode_images(self, pixels):
        return self.vision(pixel_values=pixels).last_hidden_state

    def score_encoded(self, image_features, image_index, texts):
        # Padded to the longest text, not to 35 tokens as the reference: masked padding changes
        # nothing in the [CLS] output, and TextNorm's short prompts cost a third as much.
        tokens = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(image_features.device)
        image_embeds = image_features[image_index]
        out = self.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                        encoder_hidden_states=image_embeds,
                        encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long,
                                                          device=image_embeds.device))
        rewards = self.head(out.last_hidden_state[:, 0, :].float()).squeeze(-1)
        return (rewards - self.reward_mean) / self.reward_std
