"""Stage: derived rewards. Turns stored scores into the value of a reward spec for every image of
a benchmark frame: raw model scores, TextNorm (TextNorm paper eq. 1) and the two ensembles
(eq. 2, 3).

A frame is the list of labelled images a metrics run covers, one row per image, in benchmark
order (set, caption, ordinal). Scores are fetched once per (model, version, contrast method) and
reused, so evaluating many specs or a grid of tau values costs one query per model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from tia2.errors import UserError
from tia2.specs import Mean, Model, Spec, TextNorm, UncertaintyRegularized
from tasks.ingest import SETS
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
        SELECT i.set, i.prompt_id, p.text AS caption, i.image_id, i.ordinal,
               (sum(CASE WHEN l.label = 1 THEN 1 ELSE 0 END) >= 2)::INTEGER AS z,
               avg(CASE l.label WHEN 1 THEN 1.0 WHEN 0 THEN 0.0 ELSE 0.5 END) AS graded
        FROM images i JOIN prompts p USING (prompt_id) JOIN labels l USING (image_id)
        WHERE i.set IN (SELECT unnest($sets))
        GROUP BY i.set, i.prompt_id, p.text, i.image_id, i.ordinal
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


@dataclass
class ModelScores:
    caption: np.ndarray          # score of each frame row against its caption
    contrast_row: np.ndarray     # frame row of each contrast score
    contrast: np.ndarray         # scores against the caption's contrast prompts


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
            if model.version is not None:
                if model.version not in versions:
                    raise UserError(f"reward model {model.name!r} has no scores of version "
                                    f"{model.version!r} (stored: {', '.join(versions)})")
                self._versions[model] = model.version
            elif len(versions) > 1:
                raise UserError(f"reward model {model.name!r} has scores of several versions "
                                f"({', '.join(versions)}): write {model.name}@VERSION")
            else:
                self._versions[model] = versions[0]
        return self._versions[model]

    def check(self, specs: list[Spec]) -> None:
        """Raise one UserError listing every score the specs need that the store lacks."""
        problems = []
        for model, methods in _requirements(specs).items():
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
            contrast_row, contrast = np.empty(0, np.int64), np.empty(0)
            if contrast_method is not None:
                res = self._con.execute(
                    """SELECT f.row, s.score FROM frame f
                       JOIN contrast_prompts c ON c.prompt_id = f.prompt_id AND c.method = ?
                       JOIN scores s ON s.image_id = f.image_id AND s.text = c.text
                       WHERE s.reward_model = ? AND s.model_version = ?""",
                    [contrast_method, model.name, version]).fetchnumpy()
                contrast_row, contrast = res["row"].astype(np.int64), res["score"]
            self._scores[key] = ModelScores(caption, contrast_row, contrast)
        return self._scores[key]

    def __call__(self, spec: Spec) -> np.ndarray:
        """The reward of every frame row under `spec`."""
        if isinstance(spec, Model):
            return self.scores(spec, None).caption
        if isinstance(spec, TextNorm):
            return self._textnorm(spec)
        # Sorted per row before summing: the value depends only on the multiset of member values,
        # so rows whose members tie exactly get exactly tied ensembles (floating-point sums
        # depend on their order, and a last-bit difference is an order where people see a tie).
        parts = np.sort(np.stack([self(p) for p in spec.parts]), axis=0)
        mean = parts.mean(axis=0)
        if isinstance(spec, Mean):
            return mean
        assert isinstance(spec, UncertaintyRegularized)
        return mean - spec.lam * ((parts - mean) ** 2).mean(axis=0)

    def _textnorm(self, spec: TextNorm) -> np.ndarray:
        # Only the base model's own caption/contrast scores enter the softmax, so the inner spec
        # must be a model (a softmax over an ensemble's values is not what eq. 1 defines).
        if not isinstance(spec.inner, Model):
            raise UserError(f"{spec}: textnorm() normalises one reward model's scores; "
                            f"apply it to each model inside the ensemble instead")
        s = self.scores(spec.inner, spec.contrast)
        return textnorm(s.caption, s.contrast_row, s.contrast, spec.tau)


def textnorm(caption: np.ndarray, contrast_row: np.ndarray, contrast: np.ndarray,
             tau: float) -> np.ndarray:
    """exp(r0/τ) / (exp(r0/τ) + Σ exp(r_i/τ)) per row, computed in log space (log-sum-exp).
    Each row's contrast terms are summed in ascending order, so the value depends only on the
    multiset of its contrast scores, not on the order the store returns them in: images with
    exactly tied scores get exactly tied values."""
    order = np.lexsort((contrast, contrast_row))
    contrast_row, contrast = contrast_row[order], contrast[order]
    a = caption / tau
    b = contrast / tau
    peak = a.copy()
    np.maximum.at(peak, contrast_row, b)
    total = np.exp(a - peak) + np.bincount(contrast_row, weights=np.exp(b - peak[contrast_row]),
                                           minlength=len(a))
    return np.exp(a - peak - np.log(total))


def _requirements(specs: list[Spec]) -> dict[Model, set[str | None]]:
    """Each model the specs read, with the contrast methods needed (None: the caption only)."""
    needs: dict[Model, set[str | None]] = {}

    def walk(spec: Spec, method: str | None) -> None:
        if isinstance(spec, Model):
            needs.setdefault(spec, set()).add(method)
        elif isinstance(spec, TextNorm):
            walk(spec.inner, spec.contrast)
        else:
            for part in spec.parts:
                walk(part, method)

    for spec in specs:
        walk(spec, None)
    return needs
