"""Preference metrics: time of `tia2 preference-metrics`' computation.

1. ImageReward's test set (../shared/data/imagereward/test.json: 466 items, 6,399 pairs) in a fresh
   store, 4 reward models' scores imported (random numbers: the time does not depend on them) and
   10 specs over them (models, means, uncertainty-regularised ensembles), with the 1000-resample
   bootstrap: target under 2 s.
2. A synthetic set of 100,000 items x 9 images (3.6 M pairs), one reward, straight through
   tia2/preference.py (counts, every figure, tie calibration, the bootstrap): target under 30 s.
Beside each, the same counts by a plain Python double loop over pairs (ImageReward test.py's way)
on a sample, so the ratio is measured side by side.

Run from the project root: `.venv/bin/python benchmarks/preference_bench.py`.
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEST_JSON = ROOT.parent / "shared" / "data" / "imagereward" / "test.json"

from tasks.preferences import compute_preference_metrics, ingest_preferences  # noqa: E402
from tasks.score import import_scores  # noqa: E402
from tia2.preference import (Items, bootstrap_weights, figures, item_counts, tie_agreements,  # noqa: E402
                             tie_calibrated_accuracy, within_item_pairs)
from tia2.specs import parse_spec  # noqa: E402
from tia2.store import Store  # noqa: E402

SPECS = ["m0", "m1", "m2", "m3", "mean(m0, m1)", "mean(m2, m3)", "mean(m0, m1, m2, m3)",
         "ur(m0, m1, lam=0.5)", "ur(m0, m1, m2, m3, lam=1)", "ur(m2, m3, lam=2)"]


def loop_accuracy(items: Items, reward: np.ndarray) -> tuple[int, int]:
    """ImageReward test.py's double loop: (correct, pairs)."""
    correct = pairs = 0
    for i in range(items.count):
        rows = range(items.starts[i], items.starts[i + 1])
        for a, b in itertools.combinations(rows, 2):
            if items.rank[a] != items.rank[b]:
                pairs += 1
                better, worse = (a, b) if items.rank[a] < items.rank[b] else (b, a)
                correct += reward[better] > reward[worse]
    return correct, pairs


def test_set_bench() -> None:
    if not TEST_JSON.is_file():
        print(f"skipped the test-set bench: {TEST_JSON} is not there")
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")
        ingest_preferences(store, TEST_JSON, "imagereward")
        frame = store.connect().execute("SELECT i.set, i.file AS image, p.text AS prompt FROM images i "
                                        "JOIN prompts p USING (prompt_id)").df()
        rng = np.random.default_rng(0)
        for k in range(4):
            frame.assign(reward_model=f"m{k}", score=rng.normal(size=len(frame))).to_csv(f"{tmp}/m{k}.csv", index=False)
            import_scores(store, f"{tmp}/m{k}.csv")
        specs = [parse_spec(s) for s in SPECS]
        compute_preference_metrics(store, specs[:1], resamples=10)  # imports and first connection
        start = time.perf_counter()
        result = compute_preference_metrics(store, specs)
        seconds = time.perf_counter() - start
    print(f"test set: {len(specs)} specs, {result.items} items, {result.pairs} pairs, 1000 bootstrap resamples: "
          f"{seconds:.2f} s (target < 2 s)")


def synthetic_bench(items_count: int = 100_000, size: int = 9, resamples: int = 1000) -> None:
    rng = np.random.default_rng(1)
    index = np.repeat(np.arange(items_count), size)
    items = Items.from_item_index(index, rng.integers(1, size + 1, len(index)).astype(float))
    reward = rng.normal(size=len(index))
    start = time.perf_counter()
    pairs = within_item_pairs(items)
    counts = item_counts(items, reward, pairs)
    calibration = tie_calibrated_accuracy(items, reward, pairs)
    extra = {"tie_calibrated": (tie_agreements(items, reward, calibration.epsilon, pairs), counts.all_pairs)}
    point = figures(counts, extra=extra)
    samples = [figures(counts, w, extra) for w in bootstrap_weights(items.count, resamples)]
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    accuracy_alone = figures(item_counts(items, reward))["accuracy"]
    vectorised_seconds = time.perf_counter() - start
    sample_items = 2000
    end = items.starts[sample_items]
    small, small_reward = Items(items.starts[:sample_items + 1], items.rank[:end]), reward[:end]
    start = time.perf_counter()
    correct, n = loop_accuracy(small, small_reward)
    loop_seconds = (time.perf_counter() - start) * items_count / sample_items
    check = item_counts(small, small_reward)
    assert (correct, n) == (int(check.correct.sum()), int(check.pairs.sum()))
    print(f"synthetic: {items_count} items x {size} images = {len(pairs.a)} pairs, every figure, tie calibration "
          f"and {resamples} bootstrap resamples: {seconds:.1f} s (target < 30 s); accuracy {point['accuracy']:.4f}")
    print(f"  without the bootstrap: every per-item count and figure {vectorised_seconds:.2f} s; test.py's double loop "
          f"for the accuracy alone {loop_seconds:.1f} s (extrapolated from {sample_items} items): "
          f"{loop_seconds / vectorised_seconds:.1f}x; same accuracy {accuracy_alone == point['accuracy']}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    test_set_bench()
    synthetic_bench()
