"""Prompt-sampling benchmark (issue 4): embedding speed, selection speed, coverage, and scale.

On the 10,000 real user prompts of ImageReward's ReFL set (../shared/data/imagereward):
  1. embeddings: sentence-transformers' default `encode` against `tasks.prompts.embed_texts`,
     side by side, with the top-10 neighbour agreement of the two (target >= 0.95); then the
     same pool again through the store (embedded once, read back after);
  2. selection of 100 prompts with k = 150 given the embeddings (target < 5 s);
  3. coverage (share of the pool with a selected prompt among its k nearest neighbours, or
     selected) of vote-k against random selection.
With --million (about 10 minutes here): 1,000,000 384-d embeddings made from the real ones
(each a real prompt's embedding plus noise), selection with the approximate k-NN graph, wall
time and peak memory (targets 10 min, 8 GiB; run in a child process for a clean peak); and on a
20,000 subset, approximate against exact selection, both scored on the exact graph.

    python benchmarks/sampling_bench.py [--pool FILE] [--million]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tasks.prompts import (cached_embeddings, covered_mask, knn_graph, load_embedder,  # noqa: E402
                           random_selection, read_pool, vote_k)
from tia2.store import Store  # noqa: E402

DEFAULT_POOL = PROJECT.parent / "shared" / "data" / "imagereward" / "refl_prompts.json"


def top10_agreement(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = knn_graph(a, 10), knn_graph(b, 10)
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(na, nb)]))


def embedding_section(texts: list[str]) -> np.ndarray:
    model = load_embedder()
    model.encode(texts[:64])  # warm-up for both
    start = time.perf_counter()
    default = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    t_default = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")
        start = time.perf_counter()
        ours, embedded = cached_embeddings(store, texts, show_progress=False)
        t_ours = time.perf_counter() - start
        start = time.perf_counter()
        again, embedded_again = cached_embeddings(store, texts, show_progress=False)
        t_again = time.perf_counter() - start
    assert embedded == len(texts) and embedded_again == 0 and np.array_equal(ours, again)
    print(f"embeddings of {len(texts)} prompts")
    print(f"  sentence-transformers encode  {t_default:7.1f} s  {len(texts) / t_default:7.1f} prompts/s")
    print(f"  tia2 (length buckets), stored {t_ours:7.1f} s  {len(texts) / t_ours:7.1f} prompts/s  "
          f"speed-up {t_default / t_ours:.2f}x")
    print(f"  again, read from the store    {t_again:7.2f} s  speed-up {t_default / t_again:.0f}x")
    print(f"  top-10 neighbour agreement with encode: {top10_agreement(default, ours):.4f}  (target >= 0.95); "
          f"mean cosine {np.mean(np.sum(default * ours, axis=1)):.6f}")
    return ours


def selection_section(embeddings: np.ndarray, n: int = 100, k: int = 150) -> None:
    start = time.perf_counter()
    neighbours = knn_graph(embeddings, k)
    t_graph = time.perf_counter() - start
    start = time.perf_counter()
    selection = vote_k(neighbours, n, seed=0)
    t_select = time.perf_counter() - start
    print(f"selection of {n} with k={k} from {len(embeddings)}: k-NN graph {t_graph:.2f} s + vote-k "
          f"{t_select:.2f} s = {t_graph + t_select:.2f} s  (target < 5 s)")
    print("  coverage   picks  vote-k  random (mean of 5 seeds)")
    for m in (10, 25, 50, 100):
        rand = np.mean([covered_mask(neighbours, random_selection(len(embeddings), m, s)).mean() for s in range(5)])
        print(f"           {m:>6}  {selection.coverage[m - 1]:6.1%}  {rand:6.1%}")


def synthetic_embeddings(real: np.ndarray, size: int, seed: int = 0, noise: float = 0.6) -> np.ndarray:
    """Each row: a real embedding plus Gaussian noise, renormalised (cosine to its source ~0.86)."""
    rng = np.random.default_rng(seed)
    out = np.empty((size, real.shape[1]), np.float32)
    for start in range(0, size, 100_000):
        stop = min(size, start + 100_000)
        rows = real[rng.integers(0, len(real), stop - start)]
        rows = rows + rng.standard_normal(rows.shape, dtype=np.float32) * (noise / np.sqrt(real.shape[1]))
        out[start:stop] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def million_child(embeddings_file: str) -> None:
    """Runs in its own process: selection over 1M embeddings, peak memory from the kernel."""
    real = np.load(embeddings_file)
    pool = synthetic_embeddings(real, 1_000_000)
    start = time.perf_counter()
    neighbours = knn_graph(pool, 150, show_progress=sys.stderr.isatty())
    t_graph = time.perf_counter() - start
    start = time.perf_counter()
    selection = vote_k(neighbours, 100, seed=0)
    t_select = time.perf_counter() - start
    rand = covered_mask(neighbours, random_selection(len(pool), 100, 0)).mean()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"selection of 100 with k=150 from 1,000,000 (approximate k-NN): graph {t_graph:.0f} s + vote-k "
          f"{t_select:.1f} s = {(t_graph + t_select) / 60:.1f} min (target < 10 min); peak memory {peak:.2f} GiB "
          f"(target < 8 GiB); coverage {selection.coverage[-1]:.1%}, random {rand:.1%}")

    subset = pool[:20_000]
    exact = knn_graph(subset, 150)
    approx = knn_graph(subset, 150, exact_limit=0)
    recall = np.mean([len(set(a) & set(b)) / 150 for a, b in zip(exact[:2000], approx[:2000])])
    by_exact, by_approx = vote_k(exact, 100, 0), vote_k(approx, 100, 0)
    print(f"20,000 subset: approximate k-NN recall@150 {recall:.3f}; coverage on the exact graph: exact "
          f"selection {covered_mask(exact, by_exact.picked).mean():.1%}, approximate selection "
          f"{covered_mask(exact, by_approx.picked).mean():.1%}, random "
          f"{covered_mask(exact, random_selection(20_000, 100, 0)).mean():.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", default=str(DEFAULT_POOL))
    parser.add_argument("--million", action="store_true", help="also the 1,000,000-prompt selection (~10 min)")
    parser.add_argument("--million-child", metavar="NPY", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # in order with the child's lines
    if args.million_child:
        million_child(args.million_child)
        return
    texts = read_pool(args.pool)
    embeddings = embedding_section(texts)
    selection_section(embeddings)
    if args.million:
        with tempfile.TemporaryDirectory() as tmp:
            np.save(Path(tmp) / "real.npy", embeddings)
            subprocess.run([sys.executable, __file__, "--million-child", str(Path(tmp) / "real.npy")], check=True)


if __name__ == "__main__":
    main()
