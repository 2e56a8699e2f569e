"""Stage: derived rewards. The value of a reward spec for every image: raw model scores, TextNorm
(TextNorm paper eq. 1) and the two ensembles (eq. 2, 3), each formula written once
(`spec_values`) over either source of scores:

- `RewardEvaluator`: the scores stored for a frame, float64 (metrics, best-of-n, evaluation). A
  frame is the list of images a run covers, one row per image, in benchmark order (set, caption,
  ordinal). Scores are fetched once per (model, version, contrast method) and reused, so
  evaluating many specs or a grid of tau values costs one query per model.
- `OnlineReward` (tasks/online_reward.py): the reward models run on a batch of pixels,
  differentiable (fine-tuning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd
import torch

from tasks.ingest import SETS
from tia2.errors import UserError
from tia2.specs import Mean, Model, Spec, TextNorm, UncertaintyRegularized, scores_needed
from tia2.store import Store


def load_frame(store: Store, sets: list[str] | None = None) -> pd.DataFrame:
    """Labelled images with their caption, binary label z and graded label (DESIGN.md protocol)."""
    con = store.connect()
    known = [r[0] for r in con.execute(
        "SELECT DISTINCT i.set FROM images i JOIN labels l USING (image_id) ORDER BY 1").fetchall()]
    if not known:
        raise UserError(f"the store at {store.root} has no labelled images: run `tia2 ingest-tia2` first")
    sets = sets or known
    unknown = sorted(set(sets) - set(known))
    if unknown:
        raise UserError(f"unknown set(s) {', '.join(unknown)}; sets with labels: {', '.join(known)}")
    frame = con.execute(
        """
        SELECT i.set, i.prompt_id, p.text AS caption, i.image_id, i.ordinal, l.z, l.graded
        FROM images i JOIN prompts p USING (prompt_id) JOIN image_labels l USING (image_id)
        WHERE i.set IN (SELECT unnest($sets))
        ORDER BY list_position($order, i.set) NULLS LAST, i.set, i.prompt_id, i.ordinal
        """,
        {"sets": sets, "order": list(SETS)},
    ).df()
    frame.index.name = "row"
    return frame


def generated_frame(store: Store, generator: str | None = None, sets: list[str] | None = None) -> pd.DataFrame:
    """Generated images (one generator and LoRA) with their caption, in (set, prompt, ordinal)
    order. `generator` matches the start of `images.generator` (e.g. "tiny-sd"); it may be left
    out when the store holds one generator's images only."""
    con = store.connect()
    made = con.execute(
        """SELECT DISTINCT generator, lora FROM images WHERE steps IS NOT NULL AND path IS NOT NULL
           AND starts_with(generator, coalesce($generator, '')) ORDER BY 1, 2 NULLS FIRST""",
        {"generator": generator}).fetchall()
    if len(made) != 1:
        listed = ", ".join(g + (f" (lora {lora})" if lora else "") for g, lora in made) or "none"
        raise UserError(f"choose one generator's images with --generator (generated: {listed})")
    (generator_id, lora), = made
    frame = con.execute(
        """SELECT i.set, i.prompt_id, p.text AS caption, i.image_id, i.ordinal, i.path
           FROM images i JOIN prompts p USING (prompt_id)
           WHERE i.generator = $generator AND i.lora IS NOT DISTINCT FROM $lora AND i.path IS NOT NULL
             AND ($sets IS NULL OR i.set IN (SELECT unnest($sets)))
           ORDER BY i.set, i.prompt_id, i.ordinal""",
        {"generator": generator_id, "lora": lora, "sets": sets}).df()
    frame.index.name = "row"
    frame.attrs.update(generator=generator_id, lora=lora)
    return frame


# --- the formulas: one walk over a spec, for both sources of scores ----------------------------
class ScoreSource(Protocol):
    """Where `spec_values` reads a reward model's scores of the images, one row per image."""

    def caption(self, model: Model) -> torch.Tensor:
        """[B]: each image's score against its caption."""

    def with_contrast(self, model: Model, method: str) -> tuple[torch.Tensor, torch.Tensor]:
        """[B] caption scores and [B, M] scores against the caption's contrast prompts of
        `method`, padded with -inf where a caption has fewer than M."""


def spec_values(spec: Spec, scores: ScoreSource) -> torch.Tensor:
    """The reward of every image under `spec`."""
    if isinstance(spec, Model):
        return scores.caption(spec)
    if isinstance(spec, TextNorm):
        # Only the base model's own caption/contrast scores enter the softmax, so the inner spec
        # must be a model (a softmax over an ensemble's values is not what eq. 1 defines).
        if not isinstance(spec.inner, Model):
            raise UserError(f"{spec}: textnorm() normalises one reward model's scores; "
                            f"apply it to each model inside the ensemble instead")
        return textnorm_probability(*scores.with_contrast(spec.inner, spec.contrast), spec.tau)
    # Sorted per image before reducing: the value depends only on the multiset of member values,
    # so images whose members tie exactly get exactly tied ensembles (floating-point sums depend
    # on their order, and a last-bit difference is an order where people see a tie).
    parts = torch.stack([spec_values(p, scores) for p in spec.parts]).sort(dim=0).values
    mean = parts.mean(dim=0)  # eq. 2
    if isinstance(spec, Mean):
        return mean
    assert isinstance(spec, UncertaintyRegularized)
    return mean - spec.lam * ((parts - mean) ** 2).mean(dim=0)  # eq. 3


def textnorm_probability(caption: torch.Tensor, contrast: torch.Tensor, tau: float) -> torch.Tensor:
    """TextNorm (eq. 1) for a batch: exp(r0/τ) / (exp(r0/τ) + Σ exp(r_i/τ)), in log space
    (log-sum-exp). `contrast` is [B, M], padded with -inf where an image's caption has fewer than
    M contrast prompts. Each row's contrast scores are sorted first, so the value depends only on
    their multiset, not on the order they come in: images with exactly tied scores get exactly
    tied values."""
    logits = torch.cat([caption[:, None], contrast.sort(dim=1).values], dim=1) / tau
    # The caption's logit less the row's largest, then less log Σ exp(shifted): torch.logsumexp
    # adds the largest back first, which rounds at its scale (1e-14 relative at τ = 0.01).
    shifted = logits - logits.max(dim=1, keepdim=True).values
    return torch.exp(shifted[:, 0] - torch.log(torch.exp(shifted).sum(dim=1)))


def textnorm(caption: np.ndarray, contrast_row: np.ndarray, contrast: np.ndarray,
             tau: float) -> np.ndarray:
    """`textnorm_probability` of float64 scores given as (row, score) pairs: `contrast[k]` is a
    score of row `contrast_row[k]`'s image against one of its contrast prompts."""
    padded = _padded(contrast_row, contrast, len(caption))
    return textnorm_probability(torch.from_numpy(caption), torch.from_numpy(padded), tau).numpy()


def _padded(rows: np.ndarray, values: np.ndarray, n_rows: int) -> np.ndarray:
    """(row, value) pairs as an [n_rows, M] matrix, each row's values first, then -inf."""
    order = np.argsort(rows, kind="stable")
    rows, values = rows[order], values[order]
    counts = np.bincount(rows, minlength=n_rows)
    padded = np.full((n_rows, counts.max(initial=0)), -np.inf)
    padded[rows, np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]] = values
    return padded


# --- stored scores (float64) --------------------------------------------------------------------
@dataclass
class ModelScores:
    caption: np.ndarray   # score of each frame row against its caption
    contrast: np.ndarray  # [rows, M]: against the caption's contrast prompts, padded with -inf


class RewardEvaluator:
    """Evaluates reward specs over a frame from the scores in a store."""

    def __init__(self, store: Store, frame: pd.DataFrame):
        self.store, self.frame = store, frame
        self._con = store.connect()
        self._con.register("frame", frame.reset_index()[["row", "set", "image_id", "prompt_id", "caption"]])
        self._scores: dict[tuple[str, str, str | None], ModelScores] = {}
        self._versions: dict[Model, str] = {}

    def version(self, model: Model) -> str:
        if model not in self._versions:
            versions = [r[0] for r in self._con.execute(
                "SELECT DISTINCT model_version FROM scores WHERE reward_model = ? ORDER BY 1",
                [model.name]).fetchall()]
            if not versions:
                stored = [r[0] for r in self._con.execute(
                    "SELECT DISTINCT reward_model FROM scores ORDER BY 1").fetchall()]
                raise UserError(
                    f"no scores for reward model {model.name!r} in the store "
                    f"(models with scores: {', '.join(stored) or 'none'}); "
                    f"score it with `tia2 score` or load scores with `tia2 import-scores`")
            self._versions[model] = model.version_among(versions)
        return self._versions[model]

    def check(self, specs: list[Spec]) -> None:
        """Raise one UserError listing every score the specs need that the store lacks."""
        problems = []
        for model, methods in scores_needed(specs).items():
            version = self.version(model)
            missing = self._con.execute(
                """SELECT f.set, count(*) FROM frame f ANTI JOIN (SELECT image_id, text FROM scores
                   WHERE reward_model = ? AND model_version = ?) s
                   ON s.image_id = f.image_id AND s.text = f.caption GROUP BY 1 ORDER BY 1""",
                [model.name, version]).fetchall()
            for set_name, n in missing:
                problems.append(f"{model}: {n} images of set {set_name} have no score for their caption")
            for method in sorted(m for m in methods if m is not None):
                expected, present = self._con.execute(
                    """SELECT count(*), count(s.score) FROM frame f
                       JOIN contrast_prompts c ON c.prompt_id = f.prompt_id AND c.method = ?
                       LEFT JOIN (SELECT image_id, text, score FROM scores
                                  WHERE reward_model = ? AND model_version = ?) s
                       ON s.image_id = f.image_id AND s.text = c.text""",
                    [method, model.name, version]).fetchall()[0]
                if expected == 0:
                    problems.append(f"{model}: the captions have no contrast prompts of method {method!r}")
                elif present < expected:
                    problems.append(f"{model}: {expected - present} of {expected} (image, contrast "
                                    f"prompt) scores are missing (contrast method {method})")
        if problems:
            raise UserError("missing scores: " + "; ".join(problems))

    def scores(self, model: Model, contrast_method: str | None) -> ModelScores:
        version = self.version(model)
        key = (model.name, version, contrast_method)
        if key not in self._scores:
            caption = np.full(len(self.frame), np.nan)
            rows, vals = self._con.execute(
                """SELECT f.row, s.score FROM frame f JOIN scores s
                   ON s.image_id = f.image_id AND s.text = f.caption
                   WHERE s.reward_model = ? AND s.model_version = ?""",
                [model.name, version]).fetchnumpy().values()
            caption[rows] = vals
            contrast = np.empty((len(self.frame), 0))
            if contrast_method is not None:
                res = self._con.execute(
                    """SELECT f.row, s.score FROM frame f
                       JOIN contrast_prompts c ON c.prompt_id = f.prompt_id AND c.method = ?
                       JOIN scores s ON s.image_id = f.image_id AND s.text = c.text
                       WHERE s.reward_model = ? AND s.model_version = ?""",
                    [contrast_method, model.name, version]).fetchnumpy()
                contrast = _padded(res["row"].astype(np.int64), res["score"], len(self.frame))
            self._scores[key] = ModelScores(caption, contrast)
        return self._scores[key]

    def __call__(self, spec: Spec) -> np.ndarray:
        """The reward of every frame row under `spec`."""
        return spec_values(spec, self).numpy()

    # Scores, for spec_values
    def caption(self, model: Model) -> torch.Tensor:
        return torch.from_numpy(self.scores(model, None).caption)

    def with_contrast(self, model: Model, method: str) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scores(model, method)
        return torch.from_numpy(s.caption), torch.from_numpy(s.contrast)
