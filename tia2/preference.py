"""Agreement of a reward with human rankings: the published preference figures, over items.

An item is one prompt's images ranked by people (lower rank is better, equal ranks are a tie);
pairs are formed within an item only. Every figure is computed from per-item counts, so a
bootstrap over items resamples counts instead of recomputing pairs.

- `accuracy`: ImageReward's test.py: of the pairs whose human ranks differ, the share the reward
  orders strictly the same way; a reward tie is a pair, never a correct one. Pooled over items
  (Σ correct / Σ pairs: the papers' 65.14 %); `item_accuracy` is the mean over items instead.
- `tie_half`: the same pairs, a reward tie counting one half.
- `tie_calibrated`: Deutsch et al. 2023 ("Ties Matter"), acc_eq: over all pairs, human ties
  included, the share where reward and people agree (same strict order, or both a tie), the reward
  calling a pair a tie when its values differ by at most ε, with ε chosen to maximise the figure.
- `ranking_accuracy`: HPDv2's evaluation.py: per item 1 − (pairs ordered oppositely) / (n(n−1)/2)
  between the human ranks and the reward's ranking (a stable sort: tied rewards keep file order),
  human ties never opposite; the mean over items.
- `pickapic`: PickScore's eval_preference_predictor.py at threshold 0: per pair 1 when reward and
  people give the same answer (a, b or tie), 0.5 when one of them says tie, else 0; over all pairs.
- `recall@k` / `filter@k` (ImageReward Appendix C.2): for items with one human-best and one
  human-worst image, whether the best is among the reward's top k, the worst among its bottom k.
  Tied rewards are the expectation over a random order of the tied images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOP_K = (1, 2, 4)
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Items:
    """Images in item order: `starts[i]:starts[i+1]` are item i's rows."""
    starts: np.ndarray  # int64, len = items + 1
    rank: np.ndarray    # human rank per image row

    @classmethod
    def from_item_index(cls, item_index: np.ndarray, rank: np.ndarray) -> "Items":
        """From each row's item number (0..m-1, rows grouped by item, in order)."""
        if len(item_index) and np.any(np.diff(item_index) < 0):
            raise ValueError("rows must be grouped by item in ascending item order")
        counts = np.bincount(item_index) if len(item_index) else np.zeros(0, np.int64)
        return cls(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), np.asarray(rank, float))

    @property
    def count(self) -> int:
        return len(self.starts) - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.starts)


@dataclass(frozen=True)
class Pairs:
    """Every within-item pair (a, b), a before b in file order."""
    item: np.ndarray
    a: np.ndarray
    b: np.ndarray


def within_item_pairs(items: Items) -> Pairs:
    """All pairs of rows of one item, vectorised by item size (no Python loop over items)."""
    parts = []
    sizes = items.sizes
    for n in np.unique(sizes[sizes >= 2]):
        chosen = np.flatnonzero(sizes == n)
        first, second = np.triu_indices(int(n), 1)
        starts = items.starts[chosen][:, None]
        parts.append((np.repeat(chosen, len(first)), (starts + first).ravel(), (starts + second).ravel()))
    if not parts:
        empty = np.zeros(0, np.int64)
        return Pairs(empty, empty, empty)
    item, a, b = (np.concatenate(p) for p in zip(*parts))
    order = np.lexsort((b, a))  # item order, then file order: the order test.py visits pairs
    return Pairs(item[order], a[order], b[order])


@dataclass
class ItemCounts:
    """Per item: the counts every figure is made of (arrays of length items)."""
    pairs: np.ndarray           # pairs with different human ranks
    correct: np.ndarray         # ... the reward orders strictly the same way
    model_ties: np.ndarray      # ... the reward ties
    human_ties: np.ndarray      # pairs people tie
    all_pairs: np.ndarray       # n(n-1)/2
    opposite: np.ndarray        # HPDv2: pairs the reward's stable ranking orders against people
    pick_score: np.ndarray      # PickScore: Σ of 1 / 0.5 / 0 over all pairs
    recall: dict[int, np.ndarray]  # k -> P(human best in the reward's top k); NaN: not applicable
    filter: dict[int, np.ndarray]  # k -> P(human worst in the reward's bottom k)
    best_bucket: np.ndarray     # [items, max n]: where the human-best image falls in the reward's order
    worst_bucket: np.ndarray


def item_counts(items: Items, reward: np.ndarray, pairs: Pairs | None = None) -> ItemCounts:
    reward = np.asarray(reward, float)
    if reward.shape != items.rank.shape:
        raise ValueError("one reward per image row")
    if np.isnan(reward).any():
        raise ValueError("rewards must not be NaN")
    pairs = pairs or within_item_pairs(items)
    m = items.count
    human = np.sign(items.rank[pairs.b] - items.rank[pairs.a])  # +1: a better (lower rank)
    model = np.sign(reward[pairs.a] - reward[pairs.b])          # +1: a scores higher
    strict = human != 0

    def per_item(mask: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        w = mask.astype(float) if weights is None else np.where(mask, weights, 0.0)
        return np.bincount(pairs.item, weights=w, minlength=m)

    # HPDv2's ranking: a stable sort by descending reward, so of a tied pair the earlier image ranks first
    reward_prefers_a = reward[pairs.a] >= reward[pairs.b]
    opposite = (human < 0) & reward_prefers_a | (human > 0) & ~reward_prefers_a
    pick = np.where(human == model, 1.0, np.where((human == 0) | (model == 0), 0.5, 0.0))
    sizes = items.sizes
    recall, filters, best_bucket, worst_bucket = _best_and_worst(items, reward)
    return ItemCounts(
        pairs=per_item(strict), correct=per_item(strict & (human == model)),
        model_ties=per_item(strict & (model == 0)), human_ties=per_item(~strict),
        all_pairs=(sizes * (sizes - 1) / 2).astype(float), opposite=per_item(opposite),
        pick_score=per_item(np.ones_like(strict), pick), recall=recall, filter=filters,
        best_bucket=best_bucket, worst_bucket=worst_bucket)


def _best_and_worst(items: Items, reward: np.ndarray):
    """Recall@k, Filter@k and the buckets of the human-best and -worst images, per item (NaN or
    zero rows where an item has no single best and single worst image)."""
    m, width = items.count, int(items.sizes.max()) if items.count else 0
    recall = {k: np.full(m, np.nan) for k in TOP_K}
    filters = {k: np.full(m, np.nan) for k in TOP_K}
    best_bucket, worst_bucket = np.zeros((m, width)), np.zeros((m, width))
    item_of_row = np.repeat(np.arange(m), items.sizes)
    # the single best / worst row of each item (-1 where several share the best or worst rank)
    best, worst = _single_extreme(items, item_of_row, items.rank), _single_extreme(items, item_of_row, -items.rank)
    usable = (best >= 0) & (worst >= 0) & (items.sizes >= 2)
    for which, rows, sign, buckets in (("best", best, 1.0, best_bucket), ("worst", worst, -1.0, worst_bucket)):
        index = np.flatnonzero(usable)
        if not len(index):
            continue
        value = sign * reward[rows[index]][:, None]
        members = items.starts[index][:, None] + np.arange(width)[None, :]
        valid = members < items.starts[index + 1][:, None]
        others = np.where(valid, sign * reward[np.minimum(members, len(reward) - 1)], np.nan)
        ahead = np.sum(others > value, axis=1)        # strictly before it in the reward's order
        level = np.sum(others == value, axis=1)       # tied with it, itself included
        for k in TOP_K:
            share = np.clip((k - ahead) / level, 0.0, 1.0)
            share[items.sizes[index] <= k] = np.nan   # k images of n <= k always hold it
            (recall if which == "best" else filters)[k][index] = share
        positions = np.arange(width)[None, :]
        buckets[index] = ((positions >= ahead[:, None]) & (positions < (ahead + level)[:, None])) / level[:, None]
    return recall, filters, best_bucket, worst_bucket


def _single_extreme(items: Items, item_of_row: np.ndarray, key: np.ndarray) -> np.ndarray:
    m = items.count
    low = np.full(m, np.inf)
    np.minimum.at(low, item_of_row, key)
    at_low = key == low[item_of_row]
    count = np.bincount(item_of_row, weights=at_low, minlength=m)
    row = np.full(m, -1, np.int64)
    hits = np.flatnonzero(at_low)
    row[item_of_row[hits]] = hits
    row[count != 1] = -1
    return row


# --- figures from counts (weights: a bootstrap resample's item multiplicities) ------------------
def figure_terms(c: ItemCounts, extra: dict[str, tuple[np.ndarray, np.ndarray]] | None = None):
    """Each figure as a ratio of per-item sums: {name: (numerator per item, denominator per item)}.
    Pooled figures sum counts; means over items sum the item's value over the items that have one."""
    def item_mean(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ok = ~np.isnan(values)
        return np.where(ok, values, 0.0), ok.astype(float)

    with np.errstate(invalid="ignore", divide="ignore"):
        per_item = np.where(c.pairs > 0, c.correct / np.where(c.pairs > 0, c.pairs, 1), np.nan)
        ranking = np.where(c.all_pairs > 0, 1 - c.opposite / np.where(c.all_pairs > 0, c.all_pairs, 1), np.nan)
    terms = {
        "accuracy": (c.correct, c.pairs),
        "item_accuracy": item_mean(per_item),
        "tie_half": (c.correct + 0.5 * c.model_ties, c.pairs),
        "ranking_accuracy": item_mean(ranking),
        "pickapic": (c.pick_score, c.all_pairs),
    }
    for k in TOP_K:
        terms[f"recall@{k}"] = item_mean(c.recall[k])
        terms[f"filter@{k}"] = item_mean(c.filter[k])
    return {**terms, **(extra or {})}


def figures(c: ItemCounts, weights: np.ndarray | None = None,
            extra: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, float | np.ndarray]:
    """Every figure from per-item counts (NaN where no item has it); with `weights` ([B, items]
    item multiplicities of B bootstrap resamples), B values each, from two matrix products."""
    terms = figure_terms(c, extra)
    numerators = np.stack([t[0] for t in terms.values()], axis=1).astype(float)
    denominators = np.stack([t[1] for t in terms.values()], axis=1).astype(float)
    if weights is None:
        top, bottom = numerators.sum(axis=0), denominators.sum(axis=0)
    else:
        top, bottom = weights @ numerators, weights @ denominators
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1), np.nan)
    if weights is None:
        return {name: float(v) for name, v in zip(terms, values)}
    return {name: values[:, i] for i, name in enumerate(terms)}


@dataclass(frozen=True)
class TieCalibration:
    accuracy: float
    epsilon: float


def tie_calibrated_accuracy(items: Items, reward: np.ndarray, pairs: Pairs | None = None) -> TieCalibration:
    """Deutsch et al.'s acc_eq with the ε that maximises it (the smallest such ε): one sort of
    the pairs by |Δreward|, then every threshold at once by cumulative counts."""
    pairs = pairs or within_item_pairs(items)
    if not len(pairs.a):
        return TieCalibration(np.nan, np.nan)
    human = np.sign(items.rank[pairs.b] - items.rank[pairs.a])
    delta = reward[pairs.a] - reward[pairs.b]
    gap = np.abs(delta)
    order = np.argsort(gap, kind="stable")
    gap, human, delta = gap[order], human[order], delta[order]
    correct_strict = (human != 0) & (np.sign(delta) == human)
    # threshold at the j-th distinct gap: pairs [0, end) are reward ties
    ends = np.flatnonzero(np.r_[gap[1:] != gap[:-1], True]) + 1
    ties_agree = np.cumsum(human == 0)[ends - 1]
    strict_agree_after = correct_strict.sum() - np.cumsum(correct_strict)[ends - 1]
    agree = ties_agree + strict_agree_after
    best = int(np.argmax(agree))  # the first maximum: the smallest ε
    return TieCalibration(agree[best] / len(gap), float(gap[ends[best] - 1]))


def tie_agreements(items: Items, reward: np.ndarray, epsilon: float, pairs: Pairs | None = None) -> np.ndarray:
    """Per item, the pairs on which reward and people agree when the reward calls |Δ| <= ε a tie
    (divided by `ItemCounts.all_pairs`: acc_eq at a fixed ε, for the bootstrap)."""
    pairs = pairs or within_item_pairs(items)
    human = np.sign(items.rank[pairs.b] - items.rank[pairs.a])
    delta = reward[pairs.a] - reward[pairs.b]
    model = np.where(np.abs(delta) <= epsilon, 0.0, np.sign(delta))
    return np.bincount(pairs.item, weights=(model == human).astype(float), minlength=items.count)


def bootstrap_weights(items: int, resamples: int, seed: int = BOOTSTRAP_SEED, cells: int = 10_000_000):
    """Item multiplicities of `resamples` bootstrap resamples over items, as [rows, items] chunks
    of at most `cells` values, the same for every reward given the seed (so differences are
    paired)."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, cells // max(items, 1)))
    for first in range(0, resamples, chunk):
        n = min(chunk, resamples - first)
        draws = rng.integers(0, items, size=(n, items))
        yield np.stack([np.bincount(row, minlength=items) for row in draws]).astype(float)


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap samples (NaN resamples left out)."""
    samples = samples[~np.isnan(samples)]
    if not len(samples):
        return (np.nan, np.nan)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)
