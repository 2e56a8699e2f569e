"""Agreement measures (tia2/agreement.py) against direct loops written from their definitions,
Krippendorff's α against the `krippendorff` package and Krippendorff's own worked example, and
the bootstrap against resamples recomputed by those loops."""

import itertools
import time
from collections import Counter, defaultdict

import krippendorff
import numpy as np
import pandas as pd
import pytest

from tia2.agreement import (Agreement, agreement_frame, aspect_agreement, krippendorff_alpha, ranking_agreement,
                            rating_agreement, reward_agreement)
from tia2.errors import UserError
from tia2.preference import bootstrap_weights

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the example of section C:
# 4 observers, 12 units, values 1..5; he reports α nominal .743, ordinal .815, interval .849.
KRIPPENDORFF_2011 = [[1, 2, 3, 3, 2, 1, 4, 1, 2, np.nan, np.nan, np.nan],
                     [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, np.nan, 3],
                     [np.nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, np.nan],
                     [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, np.nan]]


def by_key(rows: list[Agreement]) -> dict:
    return {(r.measure, r.subject, r.other): r for r in rows}


def long_form(reliability):
    """(unit, coder, value) rows of a coders × units matrix, NaN cells left out."""
    data = np.asarray(reliability, float)
    coder, unit = np.nonzero(~np.isnan(data))
    return unit, coder, data[coder, unit]


def share(hits, n):
    return hits / n if n else np.nan


# --- direct computations, one loop per definition -------------------------------------------------
def direct_label_agreement(labels, weight=None):
    """{key: (hits, n)} of the pairwise and leave-one-out majority agreement of labels; weight:
    an item's multiplicity in a bootstrap resample."""
    weight = weight or defaultdict(lambda: 1)
    judged = defaultdict(dict)
    for row in labels.itertuples():
        if row.label != -1:  # a skip is no judgement
            judged[row.item][str(row.annotator)] = row.label
    counts = defaultdict(lambda: [0.0, 0.0])
    for item, by_annotator in judged.items():
        w = weight[item]
        for a, b in itertools.combinations(sorted(by_annotator), 2):
            for key in (("pairwise", a, b), ("pairwise", "all", "")):
                counts[key][0] += w * (by_annotator[a] == by_annotator[b])
                counts[key][1] += w
        for a, own in by_annotator.items():
            others = Counter(v for b, v in by_annotator.items() if b != a)
            total = sum(others.values())
            majority = [v for v, c in others.items() if c > total / 2]
            if majority:
                for key in (("majority", a, "majority"), ("majority", "all", "majority")):
                    counts[key][0] += w * (own == majority[0])
                    counts[key][1] += w
    return dict(counts)


def image_orders(ranks):
    """{(item, annotator): {image: rank}}."""
    orders = defaultdict(dict)
    for row in ranks.itertuples():
        orders[(row.item, str(row.annotator))][row.image_id] = row.rank
    return orders


def direct_ranking_agreement(ranks, weight=None):
    weight = weight or defaultdict(lambda: 1)
    orders = image_orders(ranks)
    counts = defaultdict(lambda: [0.0, 0.0])
    for item in sorted(set(ranks["item"])):
        w = weight[item]
        annotators = sorted(a for (i, a) in orders if i == item)
        images = sorted(set(ranks.loc[ranks["item"] == item, "image_id"]))
        for x, y in itertools.combinations(images, 2):
            votes = {a: np.sign(orders[(item, a)][y] - orders[(item, a)][x]) for a in annotators
                     if x in orders[(item, a)] and y in orders[(item, a)]}
            for a, b in itertools.combinations(sorted(votes), 2):
                if votes[a] != 0 and votes[b] != 0:
                    for key in (("pairwise", a, b), ("pairwise", "all", "")):
                        counts[key][0] += w * (votes[a] == votes[b])
                        counts[key][1] += w
            for a, own in votes.items():
                others = [v for b, v in votes.items() if b != a]
                preferred = [side for side in (1, -1) if sum(v == side for v in others) > len(others) / 2]
                if own != 0 and preferred:
                    for key in (("majority", a, "majority"), ("majority", "all", "majority")):
                        counts[key][0] += w * (own == preferred[0])
                        counts[key][1] += w
    return dict(counts)


def direct_rating_reward(labels, reward):
    """Per annotator and for the TIA2 majority: (pairs of one group's images labelled good vs bad,
    those the reward scores strictly higher on the good one)."""
    counts = defaultdict(lambda: [0, 0])
    z = {item: int((rows["label"] == 1).sum() >= 2) for item, rows in labels.groupby("item")}
    group_of = dict(zip(labels["item"], labels["group"]))
    judges = {"majority": {item: z[item] for item in z}}
    for row in labels.itertuples():
        if row.label != -1:
            judges.setdefault(str(row.annotator), {})[row.item] = row.label
    for name, labelled in judges.items():
        for good, bad in itertools.permutations(labelled, 2):
            if group_of[good] == group_of[bad] and labelled[good] == 1 and labelled[bad] == 0:
                counts[name][0] += reward[good] > reward[bad]
                counts[name][1] += 1
    return counts


def direct_ranking_reward(ranks, reward):
    """ImageReward's test.py acc() per annotator (its double loop over an item's ranked images),
    and against the strict majority preference of all annotators of a pair."""
    counts = defaultdict(lambda: [0, 0])
    orders = image_orders(ranks)
    for (item, annotator), rank in orders.items():
        for x, y in itertools.combinations(sorted(rank), 2):
            if rank[x] != rank[y]:
                counts[annotator][1] += 1
                counts[annotator][0] += (rank[x] < rank[y] and reward[x] > reward[y]) or \
                                        (rank[x] > rank[y] and reward[x] < reward[y])
    for item in sorted(set(ranks["item"])):
        images = sorted(set(ranks.loc[ranks["item"] == item, "image_id"]))
        for x, y in itertools.combinations(images, 2):
            votes = [np.sign(rank[y] - rank[x]) for (i, _), rank in orders.items() if i == item and x in rank and y in rank]
            for side in (1, -1):
                if sum(v == side for v in votes) > len(votes) / 2:
                    counts["majority"][1] += 1
                    counts["majority"][0] += np.sign(reward[x] - reward[y]) == side
    return counts


# --- random frames ---------------------------------------------------------------------------------
ANNOTATORS = ["ann", "bea", "cyd", "dov", "eli"]


def random_labels(rng, items=40):
    rows = []
    for i in range(items):
        for annotator in rng.choice(ANNOTATORS, int(rng.integers(1, 5)), replace=False):
            rows.append((f"img{i:03d}", f"p{i // 3}", annotator, int(rng.choice([1, 0, -1], p=[0.5, 0.35, 0.15]))))
    return pd.DataFrame(rows, columns=["item", "group", "annotator", "label"])


def random_ranks(rng, items=30):
    rows = []
    for i in range(items):
        n = int(rng.integers(2, 6))
        for annotator in rng.choice(ANNOTATORS, int(rng.integers(1, 5)), replace=False):
            shown = [j for j in range(n) if rng.random() > 0.1 or n == 2]  # now and then an image left unranked
            for j in shown:
                rows.append((f"q{i}", f"q{i}-{j}", annotator, float(rng.integers(1, n + 1))))  # repeated ranks: ties
    return pd.DataFrame(rows, columns=["item", "image_id", "annotator", "rank"])


def random_ratings(rng, items=40, aspects=("alignment", "fidelity")):
    rows = []
    for i in range(items):
        base = int(rng.integers(1, 8))
        for annotator in rng.choice(ANNOTATORS, int(rng.integers(1, 5)), replace=False):
            for aspect in aspects:
                if rng.random() > 0.1:
                    rows.append((f"img{i}", annotator, aspect, int(np.clip(base + rng.integers(-2, 3), 1, 7))))
    return pd.DataFrame(rows, columns=["item", "annotator", "aspect", "value"])


def assert_matches(rows, counts):
    got = by_key(rows)
    for key, (hits, n) in counts.items():
        assert got[key].n == n, key
        assert got[key].value == pytest.approx(hits / n, abs=1e-12), key
    return got


# --- Krippendorff's alpha --------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("level", ["nominal", "ordinal", "interval"])
def test_alpha_matches_the_krippendorff_package_with_missing_values(seed, level):
    rng = np.random.default_rng(seed)
    coders, units = int(rng.integers(2, 7)), int(rng.integers(5, 60))
    truth = rng.integers(1, 8, units)
    data = np.clip(truth + rng.integers(-2, 3, (coders, units)), 1, 7).astype(float)
    data[rng.random(data.shape) < 0.3] = np.nan
    unit, _, value = long_form(data)
    expected = krippendorff.alpha(reliability_data=data, level_of_measurement=level)
    assert krippendorff_alpha(unit, value, level) == pytest.approx(expected, abs=1e-9)


def test_alpha_reproduces_krippendorffs_worked_example():
    unit, _, value = long_form(KRIPPENDORFF_2011)
    for level, published in (("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)):
        assert round(krippendorff_alpha(unit, value, level), 3) == published
    # the Wikipedia example the package documents: 3 coders, 15 units
    wikipedia = [[np.nan] * 5 + [3, 4, 1, 2, 1, 1, 3, 3, np.nan, 3],
                 [1, np.nan, 2, 1, 3, 3, 4, 3] + [np.nan] * 7,
                 [np.nan, np.nan, 2, 1, 3, 4, 4, np.nan, 2, 1, 1, 3, 3, np.nan, 4]]
    unit, _, value = long_form(wikipedia)
    assert krippendorff_alpha(unit, value, "nominal") == pytest.approx(0.691358, abs=1e-6)
    assert krippendorff_alpha(unit, value, "interval") == pytest.approx(0.810845, abs=1e-6)


def test_alpha_is_undefined_without_pairable_variation():
    assert np.isnan(krippendorff_alpha(["a", "a", "b", "b"], [3, 3, 3, 3], "interval"))
    assert np.isnan(krippendorff_alpha(["a", "b"], [1, 2], "nominal"))  # no unit judged twice


def test_aspect_alpha_and_exact_equality_match_the_package_and_a_loop():
    ratings = random_ratings(np.random.default_rng(3))
    got = by_key(aspect_agreement(ratings, resamples=0))
    for aspect, rows in ratings.groupby("aspect"):
        matrix = rows.pivot(index="annotator", columns="item", values="value").to_numpy(float)
        for measure, level in (("krippendorff_alpha", "interval"), ("krippendorff_alpha_ordinal", "ordinal")):
            expected = krippendorff.alpha(reliability_data=matrix, level_of_measurement=level,
                                          value_domain=list(range(1, 8)))
            assert got[(measure, aspect, "")].value == pytest.approx(expected, abs=1e-9)
            assert got[(measure, aspect, "")].n == int((np.sum(~np.isnan(matrix), axis=0) >= 2).sum())
        hits = n = 0
        for _, item in rows.groupby("item"):
            for a, b in itertools.combinations(item["value"].tolist(), 2):
                hits, n = hits + (a == b), n + 1
        assert got[("pairwise", aspect, "")].value == pytest.approx(hits / n) and got[("pairwise", aspect, "")].n == n


def test_aspect_agreement_on_krippendorffs_example():
    unit, coder, value = long_form(KRIPPENDORFF_2011)
    ratings = pd.DataFrame({"item": unit, "annotator": coder, "aspect": "fidelity", "value": value.astype(int)})
    got = by_key(aspect_agreement(ratings, resamples=0))
    assert round(got[("krippendorff_alpha", "fidelity", "")].value, 3) == 0.849
    assert round(got[("krippendorff_alpha_ordinal", "fidelity", "")].value, 3) == 0.815


# --- ratings ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_rating_agreement_matches_direct_loops_and_the_package(seed):
    labels = random_labels(np.random.default_rng(seed))
    rows = rating_agreement(labels, resamples=0)
    counts = direct_label_agreement(labels)
    got = assert_matches(rows, counts)
    assert {k for k in got if k[0] in ("pairwise", "majority")} >= set(counts)
    for name in set(labels["annotator"]):  # every annotator has a majority row, compared or not
        assert ("majority", name, "majority") in got
    matrix = labels.pivot(index="annotator", columns="item", values="label").replace(-1, np.nan).to_numpy(float)
    alpha = got[("krippendorff_alpha", "label", "")]
    assert alpha.value == pytest.approx(krippendorff.alpha(reliability_data=matrix, level_of_measurement="nominal"),
                                        abs=1e-9)


def test_perfect_agreement_is_one_and_a_known_disagreement_counts():
    same = pd.DataFrame([(f"i{i}", "p", a, i % 2) for i in range(6) for a in ("x", "y", "z")],
                        columns=["item", "group", "annotator", "label"])
    got = by_key(rating_agreement(same, resamples=50))
    for key in [("pairwise", "x", "y"), ("pairwise", "all", ""), ("majority", "z", "majority"),
                ("krippendorff_alpha", "label", "")]:
        assert got[key].value == 1.0 and got[key].low == 1.0 and got[key].high == 1.0
    assert got[("pairwise", "all", "")].n == 18
    changed = same.copy()
    changed.loc[(changed["item"] == "i0") & (changed["annotator"] == "z"), "label"] = 1  # one label of 18 differs
    got = by_key(rating_agreement(changed, resamples=0))
    assert got[("pairwise", "x", "y")].value == 1.0
    assert got[("pairwise", "x", "z")].value == pytest.approx(5 / 6)
    assert got[("pairwise", "all", "")].value == pytest.approx(16 / 18)
    assert got[("majority", "z", "majority")].value == pytest.approx(5 / 6)   # x, y agree on i0: z is outvoted
    assert got[("majority", "x", "majority")].n == 5                          # y, z split on i0: no majority
    assert got[("majority", "all", "majority")].value == pytest.approx(15 / 16)


def test_leave_one_out_majority_and_skips():
    labels = pd.DataFrame([("i1", "a", 1), ("i1", "b", 1), ("i1", "c", 0),
                           ("i2", "a", 1), ("i2", "b", -1), ("i2", "c", 0),    # b skipped: a and c each have one other
                           ("i3", "a", -1), ("i3", "b", 0), ("i3", "c", 0)],
                          columns=["item", "annotator", "label"])
    got = by_key(rating_agreement(labels, resamples=0))
    # the annotator's own label never votes: on i1, c is compared with a and b (1) and disagrees,
    # while a and b face a 1-0 split of the others, so i1 is left out for them; on i2 and i3 the
    # one other judgement is the majority
    assert (got[("majority", "c", "majority")].value, got[("majority", "c", "majority")].n) == (pytest.approx(1 / 3), 3)
    assert (got[("majority", "a", "majority")].value, got[("majority", "a", "majority")].n) == (0.0, 1)
    assert (got[("majority", "b", "majority")].value, got[("majority", "b", "majority")].n) == (1.0, 1)
    assert got[("pairwise", "a", "b")].n == 1   # only i1: a skip is no judgement
    assert got[("pairwise", "b", "c")].value == pytest.approx(1 / 2) and got[("pairwise", "b", "c")].n == 2
    only_skips = pd.DataFrame([("i1", "a", -1), ("i1", "b", -1)], columns=["item", "annotator", "label"])
    for row in rating_agreement(only_skips, resamples=10):
        assert np.isnan(row.value) and row.n == 0 and np.isnan(row.low)


# --- rankings --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_ranking_agreement_matches_direct_loops(seed):
    ranks = random_ranks(np.random.default_rng(seed))
    assert_matches(ranking_agreement(ranks, resamples=0), direct_ranking_agreement(ranks))


def test_ranking_agreement_by_hand():
    # item q: x ranks a < b < c; y ranks a < c < b; z ties a and b, c last
    ranks = pd.DataFrame([("q", img, who, r) for who, order in
                          (("x", {"a": 1, "b": 2, "c": 3}), ("y", {"a": 1, "b": 3, "c": 2}),
                           ("z", {"a": 1, "b": 1, "c": 2})) for img, r in order.items()],
                         columns=["item", "image_id", "annotator", "rank"])
    got = by_key(ranking_agreement(ranks, resamples=0))
    assert (got[("pairwise", "x", "y")].value, got[("pairwise", "x", "y")].n) == (pytest.approx(2 / 3), 3)
    assert got[("pairwise", "x", "z")].n == 2 and got[("pairwise", "x", "z")].value == 1.0  # z's tie (a, b) is left out
    # y on a-b: x prefers a, z ties: one vote of two is no majority; a-c: agrees; b-c: outvoted
    assert (got[("majority", "y", "majority")].value, got[("majority", "y", "majority")].n) == (0.5, 2)


# --- rewards ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_reward_agreement_on_ratings_matches_a_direct_loop(seed):
    rng = np.random.default_rng(seed)
    labels = random_labels(rng, items=60)
    images = sorted(set(labels["item"]))
    rewards = {"coarse": pd.Series(rng.integers(0, 3, len(images)) / 2, index=images),   # reward ties are wrong
               "fine": pd.Series(rng.normal(size=len(images)), index=images)}
    got = by_key(reward_agreement(labels, rewards, "rating", resamples=0))
    for spec, reward in rewards.items():
        counts = direct_rating_reward(labels, reward)
        for name, (hits, n) in counts.items():
            assert got[("reward", spec, name)].n == n
            assert got[("reward", spec, name)].value == pytest.approx(share(hits, n), nan_ok=True)


@pytest.mark.parametrize("seed", range(3))
def test_reward_agreement_on_ranks_matches_imagerewards_loop(seed):
    rng = np.random.default_rng(seed)
    ranks = random_ranks(rng)
    images = sorted(set(ranks["image_id"]))
    reward = pd.Series(rng.integers(0, 4, len(images)) / 4, index=images)
    got = by_key(reward_agreement(ranks, {"r": reward}, "ranking", resamples=0))
    counts = direct_ranking_reward(ranks, reward)
    assert set(counts) <= {k[2] for k in got}
    for name, (hits, n) in counts.items():
        assert got[("reward", "r", name)].n == n
        assert got[("reward", "r", name)].value == pytest.approx(hits / n)


def test_reward_against_the_tia2_majority_by_hand():
    labels = pd.DataFrame([("g1", "p", a, l) for a, l in zip("xyz", (1, 1, 0))] +      # z = 1
                          [("b1", "p", a, l) for a, l in zip("xyz", (1, 0, -1))] +     # one good: z = 0
                          [("b2", "p", a, l) for a, l in zip("xyz", (-1, -1, -1))],    # all skipped: z = 0
                          columns=["item", "group", "annotator", "label"])
    reward = pd.Series({"g1": 2.0, "b1": 1.0, "b2": 2.0})
    got = by_key(reward_agreement(labels, {"r": reward}, "rating", resamples=0))
    assert (got[("reward", "r", "majority")].value, got[("reward", "r", "majority")].n) == (0.5, 2)  # g1-b2 tie
    assert (got[("reward", "r", "y")].value, got[("reward", "r", "y")].n) == (1.0, 1)
    assert got[("reward", "r", "x")].n == 0 and np.isnan(got[("reward", "r", "x")].value)


# --- the bootstrap ---------------------------------------------------------------------------------
def test_bootstrap_is_the_percentile_interval_over_resampled_items():
    labels = random_labels(np.random.default_rng(7), items=25)
    resamples, seed = 100, 3
    got = by_key(rating_agreement(labels, resamples=resamples, seed=seed))
    items = sorted(set(labels["item"]))
    matrix = labels.pivot(index="annotator", columns="item", values="label").replace(-1, np.nan)[items]
    samples = defaultdict(list)
    for weights in bootstrap_weights(len(items), resamples, seed):
        for row in weights:
            for key, (hits, n) in direct_label_agreement(labels, dict(zip(items, row))).items():
                samples[key].append(share(hits, n))
            repeated = np.repeat(np.arange(len(items)), row.astype(int))  # each item as often as drawn
            samples[("krippendorff_alpha", "label", "")].append(krippendorff.alpha(
                reliability_data=matrix.to_numpy(float)[:, repeated], level_of_measurement="nominal"))
    for key, values in samples.items():
        values = np.array(values, float)
        low, high = np.percentile(values[~np.isnan(values)], [2.5, 97.5])
        assert (got[key].low, got[key].high) == (pytest.approx(low, abs=1e-9), pytest.approx(high, abs=1e-9)), key


def test_bootstrap_contains_the_value_and_is_deterministic():
    rng = np.random.default_rng(11)
    labels, ranks, ratings = random_labels(rng, items=300), random_ranks(rng, items=200), random_ratings(rng, 300)
    reward = pd.Series(rng.normal(size=len(set(ranks["image_id"]))), index=sorted(set(ranks["image_id"])))
    runs = [lambda seed: rating_agreement(labels, resamples=300, seed=seed),
            lambda seed: aspect_agreement(ratings, resamples=300, seed=seed),
            lambda seed: ranking_agreement(ranks, resamples=300, seed=seed),
            lambda seed: reward_agreement(ranks, {"r": reward}, "ranking", resamples=300, seed=seed)]
    for run in runs:
        first, again, other = run(1), run(1), run(2)
        assert agreement_frame(first).equals(agreement_frame(again))
        assert not agreement_frame(first)[["low", "high"]].equals(agreement_frame(other)[["low", "high"]])
        assert agreement_frame(first)["value"].equals(agreement_frame(other)["value"])
        for row in first:
            if row.n >= 30:
                assert row.low <= row.value <= row.high, row
    unbootstrapped = rating_agreement(labels, resamples=0)
    assert all(np.isnan(r.low) and np.isnan(r.high) for r in unbootstrapped)


def test_a_thousand_resamples_over_three_thousand_items_is_quick():
    rng = np.random.default_rng(0)
    labels = pd.DataFrame([(f"i{i}", f"p{i // 4}", f"a{a}", int(rng.choice([1, 0, -1])))
                           for i in range(3000) for a in rng.choice(10, 3, replace=False)],
                          columns=["item", "group", "annotator", "label"])
    reward = pd.Series(rng.normal(size=3000), index=[f"i{i}" for i in range(3000)])
    start = time.perf_counter()
    rating_agreement(labels, resamples=1000)
    reward_agreement(labels, {"r": reward}, "rating", resamples=1000)
    assert time.perf_counter() - start < 5  # about 0.6 s here; a regression to per-resample loops is minutes


# --- the frame and errors --------------------------------------------------------------------------
def test_agreement_frame():
    rows = rating_agreement(random_labels(np.random.default_rng(0)), resamples=20)
    frame = agreement_frame(rows)
    assert list(frame.columns) == ["measure", "subject", "other", "value", "low", "high", "n"]
    assert len(frame) == len(rows) and frame["n"].dtype == np.int64
    assert not frame.duplicated(["measure", "subject", "other"]).any()  # the store's key
    assert list(agreement_frame([]).columns) == list(frame.columns)


def test_user_errors():
    labels = pd.DataFrame([("i", "p", "a", 1), ("i", "p", "b", 0)], columns=["item", "group", "annotator", "label"])
    cases = [
        (lambda: rating_agreement(labels.iloc[:0]), "no labels"),
        (lambda: rating_agreement(labels.assign(label=[1, 2])), "unknown label"),
        (lambda: rating_agreement(labels.assign(label=["good", "bad"])), "unknown label"),
        (lambda: rating_agreement(labels.drop(columns="label")), "lack the column"),
        (lambda: rating_agreement(pd.concat([labels, labels])), "repeated"),
        (lambda: rating_agreement(labels, resamples=-1), "resamples"),
        (lambda: aspect_agreement(pd.DataFrame([("i", "a", "fidelity", 8)],
                                               columns=["item", "annotator", "aspect", "value"])), "rating value"),
        (lambda: aspect_agreement(pd.DataFrame([("i", "a", "fidelity", 0)],
                                               columns=["item", "annotator", "aspect", "value"])), "rating value"),
        (lambda: aspect_agreement(pd.DataFrame(columns=["item", "annotator", "aspect", "value"])), "no ratings"),
        (lambda: ranking_agreement(pd.DataFrame(columns=["item", "image_id", "annotator", "rank"])), "no ranks"),
        (lambda: ranking_agreement(pd.DataFrame([("q", "x", "a", "first")],
                                                columns=["item", "image_id", "annotator", "rank"])), "ranks must"),
        (lambda: reward_agreement(labels, {"r": pd.Series({"i": 1.0})}, "pairs"), "kind"),
        (lambda: reward_agreement(labels, {}, "rating"), "no rewards"),
        (lambda: reward_agreement(labels, {"r": pd.Series({"j": 1.0})}, "rating"), "no score"),
        (lambda: reward_agreement(labels, {"r": pd.Series({"i": np.nan})}, "rating"), "non-numeric"),
        (lambda: reward_agreement(labels.assign(group=["p", "q"]), {"r": pd.Series({"i": 1.0})}, "rating"),
         "several groups"),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=message):
            call()
