"""The preference figures against direct computations written the way the reference scripts
compute them (ImageReward test.py's double loop, HPSv2's inversion_score over an argsort ranking,
PickScore's calc_score), on random items with ties in both human ranks and rewards."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from tia2.preference import (TOP_K, Items, bootstrap_weights, figures, interval, item_counts, tie_agreements,
                             tie_calibrated_accuracy, within_item_pairs)

TEST_JSON = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagereward" / "test.json"


def random_items(rng, count=60, sizes=(2, 3, 4, 7, 9)):
    ranks, rewards, item_index = [], [], []
    for i in range(count):
        n = int(rng.choice(sizes))
        ranks += list(rng.integers(1, n + 1, n))           # repeated ranks: human ties
        rewards += list(rng.integers(0, 4, n) / 4)          # few values: reward ties
        item_index += [i] * n
    return Items.from_item_index(np.array(item_index), np.array(ranks, float)), np.array(rewards)


def direct(items, reward):
    """Per item, as the reference scripts compute it."""
    out = []
    for i in range(items.count):
        rows = range(items.starts[i], items.starts[i + 1])
        rank, value = items.rank[list(rows)], reward[list(rows)]
        n = len(rank)
        pairs = correct = ties = pick = 0
        for a, b in itertools.combinations(range(n), 2):  # ImageReward test.py's acc()
            if rank[a] > rank[b]:
                pairs += 1
                correct += value[a] < value[b]
                ties += value[a] == value[b]
            elif rank[a] < rank[b]:
                pairs += 1
                correct += value[a] > value[b]
                ties += value[a] == value[b]
            label = "tie" if rank[a] == rank[b] else ("0" if rank[a] < rank[b] else "1")  # PickScore
            pred = "tie" if value[a] == value[b] else ("0" if value[a] > value[b] else "1")
            pick += 1 if label == pred else 0.5 if "tie" in (label, pred) else 0
        predicted = list(np.argsort(-value, kind="stable"))  # HPSv2: position of each image in the ranking
        hps_rank = [predicted.index(j) for j in range(n)]
        inversions = sum(1 for a, b in itertools.combinations(range(n), 2)
                         if (hps_rank[a] > hps_rank[b] and rank[a] < rank[b])
                         or (hps_rank[a] < hps_rank[b] and rank[a] > rank[b]))
        out.append(dict(pairs=pairs, correct=correct, ties=ties, pick=pick, all=n * (n - 1) / 2,
                        ranking=1 - inversions / (n * (n - 1) / 2)))
    return out


def test_counts_and_figures_match_the_reference_loops():
    items, reward = random_items(np.random.default_rng(1))
    counts = item_counts(items, reward)
    expected = direct(items, reward)
    assert counts.pairs.tolist() == [e["pairs"] for e in expected]
    assert counts.correct.tolist() == [e["correct"] for e in expected]
    assert counts.model_ties.tolist() == [e["ties"] for e in expected]
    got = figures(counts)
    assert got["accuracy"] == pytest.approx(sum(e["correct"] for e in expected) / sum(e["pairs"] for e in expected))
    assert got["tie_half"] == pytest.approx(sum(e["correct"] + e["ties"] / 2 for e in expected)
                                            / sum(e["pairs"] for e in expected))
    assert got["item_accuracy"] == pytest.approx(np.mean([e["correct"] / e["pairs"] for e in expected if e["pairs"]]))
    assert got["ranking_accuracy"] == pytest.approx(np.mean([e["ranking"] for e in expected]))
    assert got["pickapic"] == pytest.approx(sum(e["pick"] for e in expected) / sum(e["all"] for e in expected))


def test_an_item_whose_ranks_all_tie_has_no_pairs_and_is_left_out_of_the_item_mean():
    items = Items.from_item_index(np.array([0, 0, 0, 1, 1]), np.array([2.0, 2, 2, 1, 2]))
    counts = item_counts(items, np.array([0.1, 0.2, 0.3, 0.9, 0.1]))
    assert counts.pairs.tolist() == [0, 1] and counts.human_ties.tolist() == [3, 0]
    assert figures(counts)["item_accuracy"] == 1.0 and figures(counts)["accuracy"] == 1.0


def test_pairs_never_cross_items():
    items = Items.from_item_index(np.array([0, 0, 1, 1, 1]), np.zeros(5))
    pairs = within_item_pairs(items)
    assert list(zip(pairs.item, pairs.a, pairs.b)) == [(0, 0, 1), (1, 2, 3), (1, 2, 4), (1, 3, 4)]


def test_recall_and_filter_count_tied_rewards_by_expectation():
    # one item of 5: human best is row 0, worst row 4
    items = Items.from_item_index(np.zeros(5, int), np.array([1.0, 2, 3, 4, 5]))
    counts = item_counts(items, np.array([0.5, 0.9, 0.5, 0.1, 0.1]))
    # best: one image scores higher, one ties with it -> top-1 never, top-2 half the time, top-4 always
    assert [counts.recall[k][0] for k in TOP_K] == [0.0, 0.5, 1.0]
    # worst ties with one other at the bottom: bottom-1 half, bottom-2 and -4 always
    assert [counts.filter[k][0] for k in TOP_K] == [0.5, 1.0, 1.0]
    assert counts.best_bucket[0].tolist() == [0, 0.5, 0.5, 0, 0]
    assert counts.worst_bucket[0].tolist() == [0.5, 0.5, 0, 0, 0]
    # a tied human best: not an item of this figure
    tied = item_counts(Items.from_item_index(np.zeros(3, int), np.array([1.0, 1, 2])), np.array([1.0, 2, 3]))
    assert np.isnan(tied.recall[1][0]) and np.isnan(figures(tied)["recall@1"])


def test_recall_against_a_random_tie_break():
    rng = np.random.default_rng(3)
    items, reward = random_items(rng, count=40, sizes=(8,))
    counts = item_counts(items, reward)
    for i in range(items.count):
        rows = np.arange(items.starts[i], items.starts[i + 1])
        rank, value = items.rank[rows], reward[rows]
        if (rank == rank.min()).sum() != 1 or (rank == rank.max()).sum() != 1:
            assert np.isnan(counts.recall[1][i])
            continue
        best = int(np.argmin(rank))
        for k in TOP_K:  # the exact expectation over every order of the tied images
            ahead, level = (value > value[best]).sum(), (value == value[best]).sum()
            hits = sum(ahead + position < k for position in range(level)) / level
            assert counts.recall[k][i] == pytest.approx(hits)


def test_tie_calibration_finds_the_best_threshold():
    rng = np.random.default_rng(5)
    items, reward = random_items(rng, count=80)
    reward = reward + rng.normal(0, 0.01, len(reward))
    found = tie_calibrated_accuracy(items, reward)
    pairs = within_item_pairs(items)
    human = np.sign(items.rank[pairs.b] - items.rank[pairs.a])
    delta = reward[pairs.a] - reward[pairs.b]

    def acc_eq(eps):
        model = np.where(np.abs(delta) <= eps, 0, np.sign(delta))
        return np.mean(model == human)

    candidates = np.unique(np.abs(delta))
    best = max(acc_eq(e) for e in candidates)
    assert found.accuracy == pytest.approx(best)
    assert acc_eq(found.epsilon) == pytest.approx(best)
    assert found.epsilon == min(e for e in candidates if acc_eq(e) == best)
    counts = item_counts(items, reward)
    assert tie_agreements(items, reward, found.epsilon).sum() / counts.all_pairs.sum() == pytest.approx(best)


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    items, reward = random_items(np.random.default_rng(7), count=200)
    counts = item_counts(items, reward)
    first = np.concatenate([figures(counts, w)["accuracy"] for w in bootstrap_weights(items.count, 300)])
    again = np.concatenate([figures(counts, w)["accuracy"] for w in bootstrap_weights(items.count, 300)])
    assert np.array_equal(first, again) and first.shape == (300,)
    low, high = interval(first)
    assert low < figures(counts)["accuracy"] < high and high - low < 0.2


@pytest.mark.skipif(not TEST_JSON.is_file(), reason="needs ../shared/data/imagereward/test.json")
def test_the_imagereward_test_set_has_6399_pairs():
    data = json.loads(TEST_JSON.read_text())
    ranks = np.array([r for item in data for r in item["ranking"]], float)
    index = np.array([i for i, item in enumerate(data) for _ in item["ranking"]])
    items = Items.from_item_index(index, ranks)
    reward = np.random.default_rng(0).normal(size=len(ranks))
    counts = item_counts(items, reward)
    assert counts.pairs.sum() == 6399 and counts.human_ties.sum() == 831
    expected = direct(items, reward)
    assert figures(counts)["accuracy"] == pytest.approx(
        sum(e["correct"] for e in expected) / sum(e["pairs"] for e in expected))
