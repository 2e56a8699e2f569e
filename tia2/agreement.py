"""Agreement of annotators with each other, and of reward models with them (ImageReward Table 2a).

Pure functions over frames; tasks/annotate.py reads and writes the store.
- `rating_agreement` (TIA2's good / bad / skip per image; a skip is no judgement): per annotator
  pair and pooled, the share of items both labelled alike; each annotator against the strict
  majority of the item's other annotators (leave-one-out; items without one are left out);
  Krippendorff's α of the labels (nominal).
- `aspect_agreement` (ImageReward's 1-7 ratings): α per aspect (interval, and ordinal as
  `krippendorff_alpha_ordinal`), and the share of annotator pairs giving the same value.
- `ranking_agreement` (an item's images ranked, ties allowed): of the image pairs two annotators
  both order strictly, the share ordered alike (Table 2a); each annotator against the strict
  majority of the others who ranked the pair (a tie is a vote for neither image, so it counts
  towards the others but never makes a majority preference).
- `reward_agreement`: ImageReward's accuracy of a reward against each annotator and against the
  majority: of the image pairs people order strictly, the share the reward orders strictly the
  same way (a reward tie is wrong). Ratings give pairs within a group (one prompt's images): good
  over bad; the majority label is the TIA2 protocol's (good iff at least two annotators said good,
  as the store's image_labels view). For rankings the majority is the strict majority of all
  annotators of the pair.

Every figure is a function of per-item sums, so the 95 % bootstrap interval resamples items (for
ratings against rewards: groups, since pairs lie within one) by weighting those sums with
`tia2.preference.bootstrap_weights`. Krippendorff's α is computed from the coincidence matrix
(Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability"), itself a sum over items.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from tia2.errors import UserError
from tia2.preference import BOOTSTRAP_SEED, Items, bootstrap_weights, interval, within_item_pairs

GOOD, BAD, SKIP = 1, 0, -1
RATING_VALUES = tuple(range(1, 8))
LEVELS = ("nominal", "ordinal", "interval")
ALL, MAJORITY = "all", "majority"
REWARD_KINDS = ("rating", "ranking")
COLUMNS = ("measure", "subject", "other", "value", "low", "high", "n")
# a judgement on an image pair (first, second) is coded sign + 1: 0 the second better, 1 a tie,
# 2 the first better; only a tie takes no side
PAIR_STRICT = np.array([True, False, True])


@dataclass(frozen=True)
class Agreement:
    measure: str   # "pairwise" | "majority" | "krippendorff_alpha" | "krippendorff_alpha_ordinal" | "reward"
    subject: str   # an annotator, "all", an aspect, "label", or a reward spec
    other: str     # the other annotator, "majority", or ""
    value: float   # NaN when undefined
    low: float     # 95 % bootstrap interval (NaN when undefined)
    high: float
    n: int         # the items or pairs behind the value


def agreement_frame(rows: list[Agreement]) -> pd.DataFrame:
    frame = pd.DataFrame([dataclasses.astuple(row) for row in rows], columns=list(COLUMNS))
    return frame.astype({"measure": str, "subject": str, "other": str, "value": float, "low": float,
                         "high": float, "n": "int64"})


# --- Krippendorff's alpha --------------------------------------------------------------------------
def krippendorff_alpha(unit, value, level: str = "interval") -> float:
    """α of judgements given as one row per (unit, coder) judgement (a missing one is no row);
    NaN when no unit has two judgements or the pairable values do not vary."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}")
    unit_index = pd.factorize(np.asarray(unit))[0]
    domain, code = np.unique(np.asarray(value, float), return_inverse=True)
    if not len(unit_index):
        return float("nan")
    sums = _unit_coincidences(unit_index, code, int(unit_index.max()) + 1, len(domain)).sum(axis=0)
    return float(_alpha(sums, domain, level))


def _unit_coincidences(unit: np.ndarray, code: np.ndarray, units: int, values: int) -> np.ndarray:
    """Each unit's coincidence matrix, flattened ([units, values²]): its ordered pairs of values
    from different coders, over (judgements − 1); a unit judged once adds nothing."""
    counts = np.bincount(unit * values + code, minlength=units * values).reshape(units, values).astype(float)
    judged = counts.sum(axis=1)
    pairs = counts[:, :, None] * counts[:, None, :]
    diagonal = np.arange(values)
    pairs[:, diagonal, diagonal] -= counts
    scale = np.where(judged > 1, 1 / np.maximum(judged - 1, 1), 0.0)
    return (pairs * scale[:, None, None]).reshape(units, values * values)


def _alpha(sums: np.ndarray, domain: np.ndarray, level: str) -> np.ndarray:
    """α from summed coincidences ([..., values²]; leading axes: bootstrap resamples):
    1 − (n − 1) Σ o·δ / Σ n_c n_k δ, δ being 0 on the diagonal for every level."""
    values = len(domain)
    o = sums.reshape(*sums.shape[:-1], values, values)
    n_v = o.sum(axis=-1)
    n = n_v.sum(axis=-1)
    if level == "nominal":
        delta = 1.0 - np.eye(values)
    elif level == "interval":
        delta = np.subtract.outer(domain, domain).astype(float) ** 2
    else:  # ordinal: Krippendorff's (Σ_{g=c..k} n_g − (n_c + n_k)/2)², the squared gap of the mid-ranks
        mid = np.cumsum(n_v, axis=-1) - n_v / 2
        delta = (mid[..., :, None] - mid[..., None, :]) ** 2
    observed = (o * delta).sum(axis=(-2, -1))
    expected = (n_v[..., :, None] * n_v[..., None, :] * delta).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(expected > 0, 1 - (n - 1) * observed / np.where(expected > 0, expected, 1), np.nan)


# --- figures from per-item sums, with their bootstrap ----------------------------------------------
@dataclass(frozen=True)
class _Statistic:
    measure: str
    subject: str
    other: str
    per_item: np.ndarray                          # [items, k]: each item's part of the sums
    figure: Callable[[np.ndarray], np.ndarray]    # [..., k] sums -> [...] figures
    n: int


def _share(sums: np.ndarray) -> np.ndarray:
    hits, count = sums[..., 0], sums[..., 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, hits / np.where(count > 0, count, 1), np.nan)


def _summarise(statistics: list[_Statistic], items: int, resamples: int, seed: int) -> list[Agreement]:
    """Every statistic and its bootstrap interval, all from one matrix product per chunk of
    resamples (the same resampled items for every statistic)."""
    if not statistics:
        return []
    matrix = np.concatenate([s.per_item for s in statistics], axis=1)
    ends = np.cumsum([s.per_item.shape[1] for s in statistics])
    totals = matrix.sum(axis=0)
    chunks = [weights @ matrix for weights in bootstrap_weights(items, resamples, seed)]
    samples = np.concatenate(chunks) if chunks else np.zeros((0, matrix.shape[1]))
    rows = []
    for statistic, end in zip(statistics, ends):
        columns = slice(end - statistic.per_item.shape[1], end)
        value = float(statistic.figure(totals[columns]))
        low, high = (np.nan, np.nan) if np.isnan(value) else interval(statistic.figure(samples[:, columns]))
        rows.append(Agreement(statistic.measure, statistic.subject, statistic.other, value, low, high, statistic.n))
    return rows


def _shares(measure: str, item: np.ndarray, group: np.ndarray, hit: np.ndarray, items: int,
            names: list[tuple[str, str]], pooled: tuple[str, str] | None = None) -> list[_Statistic]:
    """The share of hits among comparisons (one per array row), per group (names: its subject
    and other) and, with `pooled`, over all groups."""
    cells = item * len(names) + group
    shape = (items, len(names))
    count = np.bincount(cells, minlength=items * len(names)).reshape(shape).astype(float)
    hits = np.bincount(cells, weights=hit.astype(float), minlength=items * len(names)).reshape(shape)
    statistics = [_Statistic(measure, subject, other, np.stack([hits[:, g], count[:, g]], axis=1), _share,
                             int(count[:, g].sum()))
                  for g, (subject, other) in enumerate(names)]
    if pooled:
        statistics.append(_Statistic(measure, *pooled, np.stack([hits.sum(axis=1), count.sum(axis=1)], axis=1),
                                     _share, int(count.sum())))
    return statistics


# --- judgements ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Judgements:
    """One judgement per (unit, annotator), rows sorted by unit, then annotator. A unit is what is
    judged (an image, an image pair); an item is what the bootstrap resamples."""
    unit: np.ndarray       # per row
    annotator: np.ndarray  # per row: index into names, which are sorted (index order is name order)
    code: np.ndarray       # per row: the value's index
    item: np.ndarray       # per unit: its item
    strict: np.ndarray     # per code: whether it takes a side (a label; a preference, not a tie)
    names: list[str]
    items: int

    @classmethod
    def of(cls, unit, annotator, code, item, strict, names, items) -> "_Judgements":
        order = np.lexsort((annotator, unit))
        return cls(np.asarray(unit, np.int64)[order], np.asarray(annotator, np.int64)[order],
                   np.asarray(code, np.int64)[order], np.asarray(item, np.int64), np.asarray(strict, bool),
                   list(names), int(items))

    @property
    def units(self) -> int:
        return len(self.item)

    def code_counts(self) -> np.ndarray:
        """[units, codes]: how many annotators gave each value."""
        codes = len(self.strict)
        return np.bincount(self.unit * codes + self.code, minlength=self.units * codes).reshape(self.units, codes)


def _strict_majority(counts: np.ndarray, strict: np.ndarray) -> np.ndarray:
    """Per row of value counts, the value more than half of them gave if it takes a side, else -1."""
    top = counts.argmax(axis=1)
    held = 2 * counts[np.arange(len(counts)), top] > counts.sum(axis=1)
    return np.where(held & strict[top], top, -1)


def _pairwise(j: _Judgements, pooled_subject: str, per_pair: bool = True) -> list[_Statistic]:
    """Per annotator pair (and pooled), the share of units both judged strictly with the same value."""
    pairs = within_item_pairs(Items.from_item_index(j.unit, np.zeros(len(j.unit))))
    both = j.strict[j.code[pairs.a]] & j.strict[j.code[pairs.b]]
    a, b = pairs.a[both], pairs.b[both]
    item, hit = j.item[j.unit[a]], j.code[a] == j.code[b]
    if not per_pair:
        return _shares("pairwise", item, np.zeros(len(a), np.int64), hit, j.items, [(pooled_subject, "")])
    annotators = len(j.names)
    keys, group = np.unique(j.annotator[a] * annotators + j.annotator[b], return_inverse=True)
    names = [(j.names[k // annotators], j.names[k % annotators]) for k in keys]
    return _shares("pairwise", item, group.reshape(-1), hit, j.items, names, (pooled_subject, ""))


def _leave_one_out(j: _Judgements) -> list[_Statistic]:
    """Each annotator (and all) against the strict majority of the unit's other annotators."""
    others = j.code_counts()[j.unit]
    others[np.arange(len(j.unit)), j.code] -= 1
    majority = _strict_majority(others, j.strict)
    compared = (majority >= 0) & j.strict[j.code]
    return _shares("majority", j.item[j.unit[compared]], j.annotator[compared], (majority == j.code)[compared],
                   j.items, [(name, MAJORITY) for name in j.names], (ALL, MAJORITY))


def _alpha_statistic(j: _Judgements, measure: str, subject: str, domain: np.ndarray, level: str) -> _Statistic:
    """α over units that are the items themselves (ratings of images)."""
    per_item = _unit_coincidences(j.unit, j.code, j.items, len(domain))
    judged = np.bincount(j.unit, minlength=j.items)
    return _Statistic(measure, subject, "", per_item, lambda sums: _alpha(sums, domain, level),
                      int((judged >= 2).sum()))


@dataclass(frozen=True)
class _ImagePairs:
    """Judgements on image pairs: unit u is the pair (first[u], second[u]) of one item's images."""
    judgements: _Judgements
    first: np.ndarray   # image ids
    second: np.ndarray


def _image_pairs(item: np.ndarray, image: np.ndarray, annotator: np.ndarray, rank: np.ndarray,
                 names: list[str], items: int) -> _ImagePairs:
    """Each annotator's order of every pair of images of one item they ranked both of."""
    image_row = pd.DataFrame({"item": item, "image": image}).groupby(["item", "image"], sort=True).ngroup().to_numpy()
    images = int(image_row.max()) + 1 if len(image_row) else 0
    image_item, image_id = np.zeros(images, np.int64), np.empty(images, object)
    image_item[image_row], image_id[image_row] = item, image
    order = np.lexsort((image_row, annotator, item))  # one (item, annotator) after another
    group = np.unique(item[order] * len(names) + annotator[order], return_inverse=True)[1].reshape(-1)
    pairs = within_item_pairs(Items.from_item_index(group, rank[order]))
    rows_first, rows_second = order[pairs.a], order[pairs.b]
    keys, unit = np.unique(image_row[rows_first] * images + image_row[rows_second], return_inverse=True)
    code = np.sign(rank[rows_second] - rank[rows_first]).astype(np.int64) + 1  # lower rank is better
    judgements = _Judgements.of(unit.reshape(-1), annotator[rows_first], code, image_item[keys // images],
                                PAIR_STRICT, names, items)
    return _ImagePairs(judgements, image_id[keys // images], image_id[keys % images])


def _majority_pairs(people: _ImagePairs) -> _ImagePairs:
    """The pairs all their annotators' strict majority orders, as the judgements of "majority"."""
    j = people.judgements
    majority = _strict_majority(j.code_counts(), j.strict)
    units = np.flatnonzero(majority >= 0)
    judgements = _Judgements.of(units, np.zeros(len(units)), majority[units], j.item, j.strict, [MAJORITY], j.items)
    return _ImagePairs(judgements, people.first, people.second)


# --- frames ----------------------------------------------------------------------------------------
def _checked(frame: pd.DataFrame, columns: tuple[str, ...], key: tuple[str, ...], what: str) -> pd.DataFrame:
    if not isinstance(frame, pd.DataFrame):
        raise UserError(f"{what} must be a table")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(f"{what} lack the column(s) {', '.join(missing)}")
    if frame.empty:
        raise UserError(f"no {what} to measure agreement on")
    frame = frame[list(columns)].reset_index(drop=True)
    empty = [c for c in columns if frame[c].isna().any()]
    if empty:
        raise UserError(f"{what} have missing values in {', '.join(empty)}")
    doubled = frame.duplicated(list(key))
    if doubled.any():
        first = frame.loc[doubled, list(key)].iloc[0].tolist()
        raise UserError(f"{what} hold {int(doubled.sum())} repeated judgement(s), e.g. {first}")
    return frame


def _integers(values: pd.Series, allowed: tuple[int, ...], what: str) -> np.ndarray:
    numbers = pd.to_numeric(values, errors="coerce")
    bad = ~numbers.isin(allowed) | numbers.isna()
    if bad.any():
        raise UserError(f"unknown {what} {sorted(set(map(str, values[bad])))[:5]}")
    return numbers.to_numpy().astype(np.int64)


def _labels(labels: pd.DataFrame, columns=("item", "annotator", "label")) -> tuple[pd.DataFrame, np.ndarray]:
    frame = _checked(labels, columns, ("item", "annotator"), "labels")
    return frame, _integers(frame["label"], (GOOD, BAD, SKIP), "label value(s) (1 good, 0 bad, -1 skip)")


def _codes(values: pd.Series) -> tuple[np.ndarray, list]:
    codes, uniques = pd.factorize(values, sort=True)
    return codes.astype(np.int64), list(uniques)


def _check_resamples(resamples: int) -> None:
    if not isinstance(resamples, (int, np.integer)) or resamples < 0:
        raise UserError(f"resamples must be a whole number >= 0, not {resamples!r}")


# --- the measures ----------------------------------------------------------------------------------
def rating_agreement(labels: pd.DataFrame, resamples: int = 1000, seed: int = BOOTSTRAP_SEED) -> list[Agreement]:
    """Pairwise, leave-one-out majority and Krippendorff's α (nominal) of good / bad labels; labels:
    item, annotator, label (1 good, 0 bad, -1 skip); a group column may be present."""
    _check_resamples(resamples)
    frame, label = _labels(labels)
    item, item_ids = _codes(frame["item"])
    annotator, names = _codes(frame["annotator"].astype(str))
    judged = label != SKIP
    j = _Judgements.of(item[judged], annotator[judged], label[judged], np.arange(len(item_ids)),
                       [True, True], names, len(item_ids))
    statistics = [*_pairwise(j, ALL), *_leave_one_out(j),
                  _alpha_statistic(j, "krippendorff_alpha", "label", np.array([BAD, GOOD], float), "nominal")]
    return _summarise(statistics, j.items, resamples, seed)


def aspect_agreement(ratings: pd.DataFrame, resamples: int = 1000, seed: int = BOOTSTRAP_SEED) -> list[Agreement]:
    """Per aspect: Krippendorff's α (interval; ordinal as krippendorff_alpha_ordinal) and the share
    of annotator pairs giving the same value; ratings: item, annotator, aspect, value (1..7)."""
    _check_resamples(resamples)
    frame = _checked(ratings, ("item", "annotator", "aspect", "value"), ("item", "annotator", "aspect"), "ratings")
    value = _integers(frame["value"], RATING_VALUES, "rating value(s) (1..7)")
    item, item_ids = _codes(frame["item"])
    annotator, names = _codes(frame["annotator"].astype(str))
    aspect, aspects = _codes(frame["aspect"].astype(str))
    domain = np.array(RATING_VALUES, float)
    statistics = []
    for index, name in enumerate(aspects):
        rows = aspect == index
        j = _Judgements.of(item[rows], annotator[rows], value[rows] - RATING_VALUES[0], np.arange(len(item_ids)),
                           np.ones(len(domain), bool), names, len(item_ids))
        statistics += [_alpha_statistic(j, "krippendorff_alpha", name, domain, "interval"),
                       _alpha_statistic(j, "krippendorff_alpha_ordinal", name, domain, "ordinal"),
                       *_pairwise(j, name, per_pair=False)]
    return _summarise(statistics, len(item_ids), resamples, seed)


def _ranked_pairs(ranks: pd.DataFrame) -> _ImagePairs:
    frame = _checked(ranks, ("item", "image_id", "annotator", "rank"), ("item", "image_id", "annotator"), "ranks")
    rank = pd.to_numeric(frame["rank"], errors="coerce").to_numpy(float)
    if not np.isfinite(rank).all():
        raise UserError("ranks must be numbers (lower is better, equal ranks tie)")
    item, item_ids = _codes(frame["item"])
    annotator, names = _codes(frame["annotator"].astype(str))
    return _image_pairs(item, frame["image_id"].astype(str).to_numpy(object), annotator, rank, names, len(item_ids))


def ranking_agreement(ranks: pd.DataFrame, resamples: int = 1000, seed: int = BOOTSTRAP_SEED) -> list[Agreement]:
    """Pairwise and leave-one-out majority agreement on the order of image pairs within an item;
    ranks: item, image_id, annotator, rank (lower is better, equal ranks tie)."""
    _check_resamples(resamples)
    j = _ranked_pairs(ranks).judgements
    return _summarise([*_pairwise(j, ALL), *_leave_one_out(j)], j.items, resamples, seed)


def _rated_pairs(labels: pd.DataFrame) -> tuple[_ImagePairs, _ImagePairs]:
    """Pairs of one group's images, each annotator preferring good to bad; and the same by the
    TIA2 majority label of each image (good iff at least two annotators said good)."""
    frame, label = _labels(labels, ("item", "group", "annotator", "label"))
    groups_of_item = frame.groupby("item")["group"].nunique()
    if (groups_of_item > 1).any():
        raise UserError(f"labels put image {groups_of_item[groups_of_item > 1].index[0]!r} in several groups")
    group, group_ids = _codes(frame["group"])
    annotator, names = _codes(frame["annotator"].astype(str))
    image = frame["item"].astype(str).to_numpy(object)
    judged = label != SKIP
    people = _image_pairs(group[judged], image[judged], annotator[judged], (GOOD - label[judged]) + 1.0,
                          names, len(group_ids))
    good = pd.Series(label == GOOD).groupby(image).sum()
    majority_good = good.reindex(image).to_numpy() >= 2
    first = ~pd.Series(image).duplicated().to_numpy()
    majority = _image_pairs(group[first], image[first], np.zeros(int(first.sum()), np.int64),
                            np.where(majority_good[first], 1.0, 2.0), [MAJORITY], len(group_ids))
    return people, majority


def _reward_codes(reward: pd.Series, pairs: _ImagePairs) -> np.ndarray:
    """Per unit, how the reward orders the pair (a tie when equal)."""
    first = reward.reindex(pairs.first).to_numpy(float)
    second = reward.reindex(pairs.second).to_numpy(float)
    return np.sign(first - second).astype(np.int64) + 1


def _check_reward(spec: str, reward: pd.Series, images: set[str]) -> pd.Series:
    if not isinstance(reward, pd.Series):
        raise UserError(f"reward {spec!r} must be a series of scores by image id")
    reward = pd.Series(pd.to_numeric(reward, errors="coerce").to_numpy(float), index=reward.index.astype(str))
    if reward.index.duplicated().any():
        raise UserError(f"reward {spec!r} scores image {reward.index[reward.index.duplicated()][0]!r} twice")
    missing = sorted(images - set(reward.index))
    if missing:
        raise UserError(f"reward {spec!r} has no score for {len(missing)} judged image(s), e.g. {missing[0]!r}")
    wanted = reward.reindex(sorted(images))
    if not np.isfinite(wanted.to_numpy()).all():
        raise UserError(f"reward {spec!r} has non-numeric or infinite scores")
    return wanted


def reward_agreement(judgements: pd.DataFrame, rewards: dict[str, pd.Series], kind: str,
                     resamples: int = 1000, seed: int = BOOTSTRAP_SEED) -> list[Agreement]:
    """Each reward's accuracy against each annotator and the majority (subject: the reward spec,
    other: the annotator or "majority"); kind "rating": judgements are labels with a group column
    (items: image ids), "ranking": ranks."""
    _check_resamples(resamples)
    if kind not in REWARD_KINDS:
        raise UserError(f"kind must be one of {', '.join(REWARD_KINDS)}, not {kind!r}")
    if not rewards:
        raise UserError("no rewards to compare with the annotators")
    if kind == "rating":
        people, majority = _rated_pairs(judgements)
        images = set(judgements["item"].astype(str))
    else:
        people = _ranked_pairs(judgements)
        majority = _majority_pairs(people)
        images = set(judgements["image_id"].astype(str))
    statistics = []
    for spec, reward in rewards.items():
        reward = _check_reward(spec, reward, images)
        for pairs in (people, majority):
            j = pairs.judgements
            compared = j.strict[j.code]
            hit = _reward_codes(reward, pairs)[j.unit] == j.code
            statistics += _shares("reward", j.item[j.unit[compared]], j.annotator[compared], hit[compared], j.items,
                                  [(spec, name) for name in j.names])
    return _summarise(statistics, people.judgements.items, resamples, seed)
