"""The protocol's per-caption metrics against scikit-learn/scipy, and derived rewards against
their defining formulas, on constructed cases (ties, no positive in the top k, inconclusive
labels, excluded captions)."""

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.special import logsumexp
from scipy.stats import kendalltau, spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score

from tasks.metrics import Captions, batch_metrics, caption_metrics
from tasks.rewards import textnorm


def _cases(seed=0, n_cases=400):
    rng = np.random.default_rng(seed)
    for case in range(n_cases):
        n = int(rng.integers(2, 60))
        z = rng.integers(0, 2, n)
        if z.min() == z.max():
            z[0] = 1 - z[0]
        if case % 3 == 0:  # heavy ties
            r = rng.integers(0, 3, n).astype(float)
        elif case % 3 == 1:
            r = np.round(rng.normal(size=n), 1)
        else:
            r = rng.normal(size=n)
        graded = rng.integers(0, 7, n) / 6
        yield z, r, graded


def auroc(z, r):
    return caption_metrics(z, z, r, ("auroc",))["auroc"]


def average_precision(z, r):
    return caption_metrics(z, z, r, ("auprc",))["auprc"]


def ap_at_k(z, r, k):
    return caption_metrics(z, z, r, (f"ap{k}",))[f"ap{k}"]


def test_auroc_and_auprc_match_sklearn():
    for z, r, _ in _cases():
        assert auroc(z, r) == pytest.approx(roc_auc_score(z, r), abs=1e-12)
        assert average_precision(z, r) == pytest.approx(average_precision_score(z, r), abs=1e-12)


def test_rank_correlations_match_scipy():
    for z, r, graded in _cases(seed=1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = {"spearman": spearmanr(r, graded).statistic, "kendall": kendalltau(r, graded).statistic}
        got = caption_metrics(z, graded, r, ("spearman", "kendall"))
        for name, value in expected.items():
            if np.isnan(value):
                assert np.isnan(got[name])
            else:
                assert got[name] == pytest.approx(value, abs=1e-12)


def test_a_batch_equals_captions_one_by_one():
    rng = np.random.default_rng(5)
    z = rng.integers(0, 2, (30, 50))
    z[:, 0], z[:, 1] = 0, 1
    r = np.round(rng.normal(size=(30, 50)), 1)
    graded = rng.integers(0, 7, (30, 50)) / 6
    batch = batch_metrics(z, graded, r)
    for i in range(30):
        one = caption_metrics(z[i], graded[i], r[i])
        assert one == pytest.approx({k: v[i] for k, v in batch.items()}, abs=1e-12)
        assert one["ap10"] == pytest.approx(
            average_precision_score(z[i][np.argsort(-r[i], kind="stable")[:10]],
                                    r[i][np.argsort(-r[i], kind="stable")[:10]])
            if z[i][np.argsort(-r[i], kind="stable")[:10]].any() else 0.0, abs=1e-12)


def test_constant_reward_gives_nan_correlations_like_scipy():
    got = caption_metrics(np.array([0, 1] * 5), np.linspace(0, 1, 10), np.ones(10))
    assert np.isnan(got["spearman"]) and np.isnan(got["kendall"])
    assert got["auroc"] == 0.5


def test_ap_at_k_uses_the_top_k_with_stable_ties():
    # Rewards tie across the boundary of the top 5: the earlier images in benchmark order are kept.
    z = np.array([0, 1, 0, 1, 1, 0, 0, 1])
    r = np.array([0.9, 0.5, 0.5, 0.8, 0.5, 0.5, 0.1, 0.5])
    top5 = np.array([0, 3, 1, 2, 4])  # 0.9, 0.8, then the first three of the five 0.5 ties
    assert ap_at_k(z, r, 5) == pytest.approx(average_precision_score(z[top5], r[top5]))
    # Another benchmark order of the same images puts other tied images in the top 5.
    perm = np.array([0, 3, 2, 5, 6, 1, 4, 7])
    zp, rp = z[perm], r[perm]
    top5p = np.array([0, 1, 2, 3, 5])
    assert ap_at_k(zp, rp, 5) == pytest.approx(average_precision_score(zp[top5p], rp[top5p]))
    assert ap_at_k(z, r, 5) != pytest.approx(ap_at_k(zp, rp, 5))


def test_ap_at_k_is_zero_without_a_positive_in_the_top_k():
    z = np.array([0, 0, 0, 0, 0, 1])
    r = np.array([6, 5, 4, 3, 2, 1.0])
    assert ap_at_k(z, r, 5) == 0.0
    assert ap_at_k(z, r, 10) == pytest.approx(average_precision_score(z, r))


def test_ap_at_k_larger_than_the_caption_uses_all_images():
    z = np.array([1, 0, 1])
    r = np.array([0.2, 0.3, 0.1])
    assert ap_at_k(z, r, 25) == pytest.approx(average_precision_score(z, r))


def _frame(groups):
    rows = []
    for g, (labels, rewards) in enumerate(groups):
        for i, (votes, reward) in enumerate(zip(labels, rewards)):
            z = int(sum(v == 1 for v in votes) >= 2)
            graded = np.mean([{1: 1.0, 0: 0.0, -1: 0.5}[v] for v in votes])
            rows.append(dict(set="counting", prompt_id=f"p{g}", caption=f"caption {g}",
                             image_id=f"i{g}_{i}", ordinal=i, z=z, graded=graded, reward=reward))
    return pd.DataFrame(rows)


def test_inconclusive_labels_and_exclusion():
    frame = _frame([
        # included: majority labels 1, 0, 0, 1 (two 1s needed; -1 never counts as good)
        ([[1, 1, 0], [1, -1, -1], [0, 0, 1], [1, 1, 1]], [0.9, 0.4, 0.2, 0.8]),
        # excluded: every image has a majority of 1
        ([[1, 1, 0], [1, 1, 1]], [0.1, 0.2]),
        # excluded: no image has a majority of 1, though graded labels differ
        ([[-1, -1, 1], [0, 0, 0]], [0.3, 0.1]),
    ])
    captions = Captions.of(frame)
    assert list(captions.keys["prompt_id"]) == ["p0"]
    assert captions.keys["human"].iloc[0] == pytest.approx(0.5)
    table = captions.evaluate(frame["reward"].to_numpy())
    z = np.array([1, 0, 0, 1])
    graded = np.array([2 / 3, 2 / 3, 1 / 3, 1.0])  # -1 counts 0.5 in the graded label
    r = np.array([0.9, 0.4, 0.2, 0.8])
    expected = caption_metrics(z, graded, r)
    assert expected["auroc"] == pytest.approx(roc_auc_score(z, r))
    assert expected["spearman"] == pytest.approx(spearmanr(r, graded).statistic)
    for name, value in expected.items():
        assert table[name].iloc[0] == pytest.approx(value)


def test_textnorm_matches_its_definition_and_is_stable():
    rng = np.random.default_rng(3)
    caption = rng.normal(size=6) * 50  # large scores: a naive softmax would overflow at tau=0.01
    contrast_row = np.repeat(np.arange(6), [1, 2, 3, 4, 5, 6])
    contrast = rng.normal(size=len(contrast_row)) * 50
    tau = 0.01
    got = textnorm(caption, contrast_row, contrast, tau)
    for row in range(6):
        logits = np.r_[caption[row], contrast[contrast_row == row]] / tau
        assert got[row] == pytest.approx(np.exp(logits[0] - logsumexp(logits)), rel=1e-9, abs=1e-300)
    assert np.all(np.isfinite(got))
