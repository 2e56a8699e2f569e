"""Derived rewards depend only on the multiset of the scores they combine: images whose scores tie
exactly (in another order of the contrast prompts, or of the ensemble's members) get exactly tied
values, and those values agree with exact arithmetic. Fp16 scores tie often, and a last-bit
difference is an order that AUROC, AP and the rank correlations count where people see a tie."""

from __future__ import annotations

import mpmath
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tasks.rewards import RewardEvaluator, load_frame, textnorm, textnorm_probability
from tia2.specs import parse_spec


def exact_textnorm(caption: float, contrast: list[float], tau: float) -> float:
    with mpmath.workdps(60):
        terms = [mpmath.exp(mpmath.mpf(s) / tau) for s in contrast]
        top = mpmath.exp(mpmath.mpf(caption) / tau)
        return float(top / (top + mpmath.fsum(terms)))


def permuted_rows(n_rows: int, n_contrast: int, seed: int):
    """Every row: the same caption score and the same contrast multiset, each in its own order;
    the contrast rows of all images interleaved, as a join may return them. The values are fp16
    (many ties) of mixed magnitude, so that the order of a float sum shows in its last bits."""
    rng = np.random.default_rng(seed)
    values = rng.normal(scale=3.0, size=n_contrast).astype(np.float16).astype(np.float64)
    values[: n_contrast // 3] = values[0]  # tied contrast scores within the row too
    contrast = np.concatenate([rng.permutation(values) for _ in range(n_rows)])
    contrast_row = np.repeat(np.arange(n_rows), n_contrast)
    shuffle = rng.permutation(len(contrast))
    return np.full(n_rows, float(values[1])), contrast_row[shuffle], contrast[shuffle], values


@pytest.mark.parametrize("tau", [0.01, 0.5, 3.0])
def test_textnorm_ties_exactly_and_matches_exact_arithmetic(tau):
    caption, contrast_row, contrast, values = permuted_rows(n_rows=200, n_contrast=24, seed=7)
    got = textnorm(caption, contrast_row, contrast, tau)
    assert np.unique(got).size == 1, "the same multiset of scores gave different values"
    assert got[0] == pytest.approx(exact_textnorm(caption[0], list(values), tau), rel=1e-13, abs=1e-300)


def test_online_textnorm_ties_exactly():
    rng = np.random.default_rng(3)
    values = torch.tensor(rng.normal(scale=3.0, size=24).astype(np.float16).astype(np.float32))
    contrast = torch.stack([values[torch.randperm(24, generator=torch.Generator().manual_seed(i))] for i in range(64)])
    got = textnorm_probability(torch.full((64,), float(values[1])), contrast, tau=0.5)
    assert torch.unique(got).numel() == 1
    assert float(got[0]) == pytest.approx(exact_textnorm(float(values[1]), values.tolist(), 0.5), rel=1e-5)


def test_evaluated_specs_tie_for_tied_scores(tmp_path, mini_release):
    """Through the store: on two images of one caption, model k's scores on the second image
    are model k+1's on the first, with the contrast prompts in another order. So textnorm(m_k)
    on the second image must equal textnorm(m_k+1) on the first, and every ensemble over the
    three must tie. The values are ones whose float sums depend on their order."""
    from tasks.ingest import ingest_tia2
    from tasks.score import import_scores
    from tia2.store import Store
    from tests.support.scores import synthetic_score_table

    store = Store(tmp_path / "store")
    ingest_tia2(store, str(mini_release))
    models = ["m1", "m2", "m3"]
    rows = synthetic_score_table(store, dict.fromkeys(models, 0.0), seed=5).to_pandas()
    frame = load_frame(store)
    files = dict(store.connect().execute("SELECT image_id, file FROM images").fetchall())
    first, second = (files[frame.image_id.iloc[i]] for i in (0, 1))
    caption = frame.caption.iloc[0]
    assert frame.caption.iloc[1] == caption
    contrast = sorted(set(rows.prompt[rows.image == first]) - {caption})
    assert len(contrast) == 3
    caption_scores = [0.1, 0.2, 0.3]  # (0.1 + 0.2) + 0.3 != (0.3 + 0.2) + 0.1
    contrast_scores = [[0.1, 0.2, 0.3], [0.3, 0.1, 0.2], [0.2, 0.3, 0.1]]

    def put(image: str, model: str, k: int, order: list[int]) -> None:
        at = (rows.image == image) & (rows.reward_model == model)
        rows.loc[at & (rows.prompt == caption), "score"] = caption_scores[k]
        for text, position in zip(contrast, order):
            rows.loc[at & (rows.prompt == text), "score"] = contrast_scores[k][position]

    for k, model in enumerate(models):
        put(first, model, k, [0, 1, 2])
        put(second, model, (k + 1) % 3, [2, 0, 1])
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), tmp_path / "s.parquet")
    import_scores(store, tmp_path / "s.parquet")

    evaluator = RewardEvaluator(store, frame)
    for k, model in enumerate(models):
        following = models[(k + 1) % 3]
        assert evaluator(parse_spec(f"textnorm({model}, tau=0.3)"))[1] == \
            evaluator(parse_spec(f"textnorm({following}, tau=0.3)"))[0]
    for spec in ["mean(m1, m2, m3)", "ur(m1, m2, m3, lam=2)",
                 "mean(textnorm(m1, tau=0.3), textnorm(m2, tau=0.3), textnorm(m3, tau=0.3))",
                 "ur(textnorm(m3, tau=1), textnorm(m1, tau=1), textnorm(m2, tau=1), lam=0.5)"]:
        values = evaluator(parse_spec(spec))
        assert values[0] == values[1], spec
