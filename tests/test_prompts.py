"""Prompt stage: TIA2's synthetic prompts, pool reading, embeddings, k-NN graphs, vote-k selection
and `tia2 sample-prompts`."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.prompts import (cached_embeddings, covered_mask, embed_texts, knn_graph, load_embedder, read_pool,
                           synthetic_prompts, vote_k)
from tests.support.stores import copy_store
from cli.main import main
from tia2.errors import UserError
from tia2.store import Store

POOL = [f"a {adj} {animal} {place}" for adj in ("small", "red", "sleepy", "giant", "cartoon")
        for animal in ("cat", "dog", "horse", "owl") for place in ("in a forest", "on a beach", "in space")] + [
    "portrait of an astronaut, oil painting", "a cyberpunk city at night, neon lights, 8k, artstation",
    "a bowl of ramen, studio photo", "minimalist logo of a fox", "a watercolor map of an island"]


def test_synthetic_prompts_reproduce_tia2_caption_sets(tia2_source, real_store, tmp_path):
    for set_name, size in (("counting", 150), ("composition", 300)):
        released = list(json.loads((tia2_source / "prompts" / f"prompt_set_{set_name}.json").read_text()))
        made = synthetic_prompts(set_name)
        assert made.num_rows == size
        assert made.column("text").to_pylist() == released  # same texts, same order
    store = copy_store(real_store, tmp_path / "store")
    for set_name in ("counting", "composition"):  # same ids as the ingested captions: nothing new
        assert main(["--store", str(store.root), "sample-prompts", "--synthetic", set_name]) == 0
    assert store.read("prompts").num_rows == real_store.read("prompts").num_rows


def test_synthetic_prompts_fill_an_empty_store(tmp_path):
    assert main(["--store", str(tmp_path / "s"), "sample-prompts", "--synthetic", "counting",
                 "--synthetic", "composition"]) == 0
    prompts = Store(tmp_path / "s").read("prompts").to_pandas()
    assert prompts.groupby("set").size().to_dict() == {"composition": 300, "counting": 150}
    assert "a realistic photo of six teddy bears" in set(prompts.text)
    assert "a realistic photo of an umbrella and a vase" in set(prompts.text)
    assert set(prompts.source) == {"synthetic"}


def _greedy_scores(neighbours: np.ndarray, picked: list[int], rho: float = 10.0) -> np.ndarray:
    """vote-k scores computed from scratch (Su et al. 2022): the votes of unselected prompts."""
    size = len(neighbours)
    selected = set(picked)
    score = np.zeros(size)
    for voter in range(size):
        if voter in selected:
            continue
        weight = rho ** -sum(int(u) in selected for u in neighbours[voter])
        for u in neighbours[voter]:
            score[u] += weight
    return score


def test_vote_k_picks_the_best_scored_prompt_at_every_step():
    rng = np.random.default_rng(3)
    points = rng.standard_normal((120, 8)).astype(np.float32)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    neighbours = knn_graph(points, 6)
    selection = vote_k(neighbours, 15, seed=0)
    for step, pick in enumerate(selection.picked):
        score = _greedy_scores(neighbours, list(selection.picked[:step]))
        score[list(selection.picked[:step])] = -np.inf
        assert score[pick] == pytest.approx(score.max(), abs=1e-9), f"step {step}"
    for m in range(1, 16):
        assert selection.coverage[m - 1] == pytest.approx(covered_mask(neighbours, selection.picked[:m]).mean())


def test_vote_k_moves_to_another_cluster_after_covering_one():
    rng = np.random.default_rng(0)
    centres = np.eye(16, dtype=np.float32)[:2]
    points = np.concatenate([centres[0] + 0.05 * rng.standard_normal((30, 16)),
                             centres[1] + 0.05 * rng.standard_normal((20, 16))]).astype(np.float32)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    neighbours = knn_graph(points, 10)
    first, second = vote_k(neighbours, 2, seed=0).picked
    assert first < 30 <= second  # the bigger cluster first, then the other one, not a second in the first


def test_selection_is_deterministic_for_a_seed_and_ties_follow_the_seed():
    ring = np.array([[(i + 1) % 50, (i - 1) % 50] for i in range(50)])  # every prompt has the same votes
    assert np.array_equal(vote_k(ring, 5, seed=7).picked, vote_k(ring, 5, seed=7).picked)
    assert len({int(vote_k(ring, 1, seed=s).picked[0]) for s in range(6)}) > 1


def test_approximate_knn_agrees_with_exact_and_never_lists_a_prompt_itself():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((40, 32))
    points = (centres[rng.integers(0, 40, 4000)] + 0.4 * rng.standard_normal((4000, 32))).astype(np.float32)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    exact = knn_graph(points, 20)
    approx = knn_graph(points, 20, exact_limit=0, nprobe=16)  # forced onto the inverted-file index
    rows = np.arange(len(points))[:, None]
    assert not (exact == rows).any() and not (approx == rows).any()
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(exact, approx)])
    assert recall > 0.9
    assert np.array_equal(approx, knn_graph(points, 20, exact_limit=0, nprobe=16))  # deterministic


@pytest.mark.slow
def test_embeddings_equal_sentence_transformers_encode():
    model = load_embedder()
    texts = POOL + ["a " + "very " * 300 + "long prompt"]  # past the model's 256-token limit too
    ours = embed_texts(texts, model, show_progress=False)
    theirs = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    assert np.min(np.sum(ours * theirs, axis=1)) > 0.99999


def test_embeddings_are_computed_once_and_kept_in_the_store(tmp_path):
    store = Store(tmp_path / "s")
    first, embedded = cached_embeddings(store, POOL[:20], show_progress=False)
    assert embedded == 20
    both, embedded = cached_embeddings(store, POOL[10:30] , show_progress=False)
    assert embedded == 10  # only the ten new texts
    assert np.array_equal(both[:10], first[10:])
    assert store.read("text_embeddings").num_rows == 30


@pytest.mark.parametrize("kind", ["json-strings", "json-objects", "csv", "parquet", "txt"])
def test_pool_formats(tmp_path, kind):
    texts = ["a cat", "a dog", "a cat", " ", "an owl"]
    path = tmp_path / {"json-strings": "p.json", "json-objects": "p.json", "csv": "p.csv",
                       "parquet": "p.parquet", "txt": "p.txt"}[kind]
    if kind == "json-strings":
        path.write_text(json.dumps(texts))
    elif kind == "json-objects":
        path.write_text(json.dumps([{"text": t, "image": i} for i, t in enumerate(texts)]))
    elif kind == "csv":
        path.write_text("id,prompt\n" + "".join(f"{i},{t}\n" for i, t in enumerate(texts)))
    elif kind == "parquet":
        pq.write_table(pa.table({"id": range(5), "caption": texts}), path)
    else:
        path.write_text("\n".join(texts))
    assert read_pool(path) == ["a cat", "a dog", "an owl"]


@pytest.mark.parametrize("content, message", [
    ("[1, 2", "malformed JSON"), ('{"a": 1}', "expected a JSON list"), ('[{"id": 1}]', "none of the fields"),
    ("[]", "no prompts"), ('["a", 3]', "not a prompt string")])
def test_bad_pools_are_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "pool.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_pool(path)
    assert main(["--store", str(tmp_path / "s"), "sample-prompts", "--pool", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("args, message", [(["--n", "0"], "--n: must be a whole number of at least 1"),
                                           (["--n", "1000"], "--n must be"),
                                           (["--k", "0"], "--k: must be a whole number of at least 1")])
def test_bad_sizes_are_one_line(tmp_path, capsys, args, message):
    path = tmp_path / "pool.txt"
    path.write_text("\n".join(POOL))
    assert main(["--store", str(tmp_path / "s"), "sample-prompts", "--pool", str(path), *args]) == 2
    assert message in capsys.readouterr().err


def test_sample_prompts_end_to_end(tmp_path, capsys):
    import mlflow

    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(POOL))
    store_dir = tmp_path / "s"
    argv = ["--store", str(store_dir), "sample-prompts", "--pool", str(pool), "--n", "8", "--k", "5", "--seed", "3"]
    assert main(argv) == 0
    assert f"embedded {len(POOL)} prompts" in capsys.readouterr().out
    store = Store(store_dir)
    picks = store.connect().execute(
        "SELECT p.text, s.rank, s.coverage FROM prompt_selections s JOIN prompts p USING (prompt_id) "
        "WHERE s.set = 'selected' ORDER BY s.rank").fetchall()
    assert [rank for _, rank, _ in picks] == list(range(1, 9))
    coverage = [c for _, _, c in picks]
    assert coverage == sorted(coverage) and 0 < coverage[-1] <= 1
    assert {text for text, _, _ in picks} <= set(POOL)

    assert main(argv) == 0  # again: embeddings from the store, the same picks
    assert "embedded 0 prompts" in capsys.readouterr().out
    again = store.connect().execute(
        "SELECT p.text, s.rank, s.coverage FROM prompt_selections s JOIN prompts p USING (prompt_id) "
        "ORDER BY s.rank").fetchall()
    assert again == picks

    [run, *_] = mlflow.search_runs(experiment_names=["tia2"], filter_string="tags.`tia2.stage` = 'sample-prompts'",
                                   output_format="list")
    assert run.data.metrics["coverage"] == pytest.approx(coverage[-1])
    assert "random_coverage" in run.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "sample-prompts")}
    assert artifacts == {"sample-prompts/pool_map.png", "sample-prompts/selected.txt"}


def test_help_explains_the_selection(capsys):
    with pytest.raises(SystemExit):
        main(["sample-prompts", "--help"])
    out = capsys.readouterr().out
    assert "vote-k" in out and "--pool" in out and "--synthetic" in out
