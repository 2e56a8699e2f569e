"""The LAION improved aesthetic predictor (`aesthetic`): an MLP on the L2-normalised CLIP
ViT-L/14 image embedding (OpenAI weights), as used by DDPO's aesthetic reward.

Released weights: the image tower of `openai/clip-vit-large-patch14` (transformers'
`CLIPVisionModelWithProjection` reads it from the full CLIP folder) and the MLP
`sac+logos+ava1-l14-linearMSE` as `trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth`.
The score judges the image alone: every text of an image gets the same value. A local copy
(`--weights DIR`): DIR/aesthetic-model.pth and the CLIP folder as DIR/clip.

Preprocessing: transformers' PIL image processor (`CLIPImageProcessorPil`), which gives the
bytes of ddpo-pytorch's scorer (`CLIPProcessor` of transformers 4.30, on uint8 RGB tensors).
That scorer takes RGB only; other modes go through Pillow's plain `convert("RGB")` first (alpha
dropped, not composited), as that processor did with a PIL image.
"""

from __future__ import annotations

import torch
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

from tia2.errors import UserError
from tia2.models.base import (RewardModel, folder_weights_file, resolve_weights_file,
                              resolve_weights_folder, reward_head, weights_identity)


class AestheticRewardModel(RewardModel):
    def __init__(self, name: str, config: dict, weights: str, seed: int):
        super().__init__()
        self.name = name
        arch, pre = config["arch"], config["preprocess"]
        if weights == "random":
            self.clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**arch["vision"]))
            self.use_image_processor(CLIPImageProcessorPil(**pre["image_processor"]))
        else:
            folder = resolve_weights_folder(name, config["clip"], "pretrained" if weights == "pretrained"
                                            else f"{weights}/clip")
            self.clip = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=torch.float32)
            self.use_image_processor(CLIPImageProcessorPil.from_pretrained(folder))
        self.mlp = reward_head(self.clip.config.projection_dim, arch["head_dims"])
        if weights == "random":
            self.identity = f"random-init:{seed}"
        else:
            path = resolve_weights_file(name, config["weights"], weights)
            state = torch.load(path, map_location="cpu", weights_only=True)
            try:
                self.mlp.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
            except RuntimeError as exc:
                raise UserError(f"{name}: {path} is not the aesthetic MLP: {str(exc).splitlines()[0]}") from exc
            self.identity = (weights_identity(config["weights"]["hf_repo"], path) + "+"
                             + weights_identity(config["clip"]["hf_repo"], folder_weights_file(folder)))

    def encode_images(self, pixels):
        embeds = self.clip(pixel_values=pixels.to(self.clip.dtype)).image_embeds.float()
        return embeds / embeds.norm(dim=-1, keepdim=True)

    def score_encoded(self, image_features, image_index, texts):
        return self.mlp(image_features[image_index]).squeeze(-1)
