"""A reward spec on pixels: fine-tuning's reward. The spec's formulas are tasks/rewards.py's
(`spec_values`), fed by reward models run on the images, differentiably; kept apart from that
module so the stages that read stored scores do not depend on the models' code and configs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from tasks.rewards import spec_values
from tia2.errors import UserError
from tia2.specs import Model, Spec, parse_spec, scores_needed
from tia2.store import Store


class OnlineReward:
    """A reward spec evaluated on pixels: `reward(images01, prompt_ids)` gives one value per image,
    differentiable in the pixels (the reward models' `preprocess_tensor` + encoders). Reward models
    are built once per name; contrast prompts come from the store (the spec's method), else from the
    contrast rules; a prompt with neither is an error that names it."""

    def __init__(self, spec: Spec | str, store: Store, prompts: list[tuple[str, str]], weights: str = "pretrained",
                 device: str = "cpu"):
        from tia2.models import create_reward_model

        self.spec = parse_spec(spec) if isinstance(spec, str) else spec
        self.caption = dict(prompts)
        self.models = {}
        needed = scores_needed([self.spec])
        for model in sorted(needed, key=str):
            reward_model = create_reward_model(model.name, weights=weights, device=device,
                                               store=store).requires_grad_(False)
            model.version_among([reward_model.version], built=True)
            self.models[model.name] = reward_model
        methods = {m for methods in needed.values() for m in methods if m is not None}
        self.contrasts = {method: _contrast_prompts(store, prompts, method) for method in methods}

    def __call__(self, images01: torch.Tensor, prompt_ids: list[str]) -> torch.Tensor:
        return spec_values(self.spec, _PixelScores(self, images01, prompt_ids))


@dataclass
class _PixelScores:
    """One batch's scores for spec_values: each reward model encodes the images once."""
    reward: OnlineReward
    images01: torch.Tensor
    prompt_ids: list[str]
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def _scored(self, name: str, texts_per_image: list[list[str]]) -> torch.Tensor:
        """The scores of image i against each of texts_per_image[i], concatenated."""
        model = self.reward.models[name]
        if name not in self.features:
            self.features[name] = model.encode_images(model.preprocess_tensor(self.images01))
        encoded = self.features[name]
        index = torch.tensor([i for i, texts in enumerate(texts_per_image) for _ in texts], device=encoded.device)
        return model.score_encoded(encoded, index, [t for texts in texts_per_image for t in texts])

    def caption(self, model: Model) -> torch.Tensor:
        return self._scored(model.name, [[self.reward.caption[p]] for p in self.prompt_ids])

    def with_contrast(self, model: Model, method: str) -> tuple[torch.Tensor, torch.Tensor]:
        contrasts = [self.reward.contrasts[method][p] for p in self.prompt_ids]
        scores = self._scored(model.name, [[self.reward.caption[p], *c] for p, c in zip(self.prompt_ids, contrasts)])
        firsts = np.cumsum([0] + [1 + len(c) for c in contrasts[:-1]])
        padded = scores.new_full((len(contrasts), max(map(len, contrasts))), -math.inf)
        for i, (first, c) in enumerate(zip(firsts, contrasts)):
            padded[i, :len(c)] = scores[first + 1:first + 1 + len(c)]
        return scores[torch.as_tensor(firsts, device=scores.device)], padded


def _contrast_prompts(store: Store, prompts: list[tuple[str, str]], method: str) -> dict[str, list[str]]:
    from tasks.contrast import rule_contrasts

    rows = store.connect().execute(
        "SELECT prompt_id, text FROM contrast_prompts WHERE method = ? AND prompt_id IN (SELECT unnest(?)) "
        "ORDER BY prompt_id, text", [method, [p for p, _ in prompts]]).fetchall()
    found: dict[str, list[str]] = {}
    for prompt_id, text in rows:
        found.setdefault(prompt_id, []).append(text)
    contrasts = {}
    for prompt_id, caption in prompts:
        texts = [t for t in found.get(prompt_id) or rule_contrasts(caption) if t != caption]
        if not texts:
            raise UserError(f"prompt {caption!r} has no contrast prompts (method {method}) and the contrast "
                            f"rules make none: TextNorm needs some (run `tia2 contrast`)")
        contrasts[prompt_id] = texts
    return contrasts
