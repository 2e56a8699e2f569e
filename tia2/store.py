"""The store: every path and schema of the project's data lives here.

Layout under the store root (default ``./storage``)::

    <table>.parquet        small tables, rewritten whole on each change (temp file + rename)
    scores/part-*.parquet  the score table, append-only parts (only missing keys are appended)
    images/                generated images, content-addressed
    adapters/              fine-tuned LoRA adapters with their training state, one folder per run
    reward_models/NAME/    reward models trained here (`tia2 train-reward`): config.json (the
                           base's family and architecture), model.safetensors, card.json; the
                           model registry builds them by NAME (tia2/models/__init__.py)
    reward_training/RUN/   reward-model training runs: the last training state and the best weights
    tia2.duckdb            DuckDB catalog: one view per table, absolute paths, rebuilt atomically
    .locks/                one lock file per table; writers hold it while they read-modify-write
    .store_id              random id of this store's life (renewed when tables were deleted);
                           part of every stage's cache key

Every write checks the schema, never leaves a half-written file (readers see the old or the new
file, never a torn one) and is idempotent on the table's key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from tia2.errors import UserError

TIMESTAMP = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class TableSpec:
    schema: pa.Schema
    key: tuple[str, ...]
    append_only: bool = False  # stored as parts; existing keys are never rewritten
    # Nullable columns added after stores were written: older files and rows may lack them
    # (null). Files are given them when a store is opened.
    added_later: tuple[str, ...] = ()


def _schema(*fields: tuple[str, pa.DataType, bool]) -> pa.Schema:
    return pa.schema([pa.field(name, dtype, nullable=nullable) for name, dtype, nullable in fields])


TABLES: dict[str, TableSpec] = {
    "prompts": TableSpec(
        _schema(
            ("prompt_id", pa.string(), False),
            ("text", pa.string(), False),
            ("set", pa.string(), False),
            ("category", pa.string(), True),
            ("subcategory", pa.string(), True),
            ("source", pa.string(), False),
        ),
        key=("prompt_id",),
    ),
    "contrast_prompts": TableSpec(
        _schema(
            ("prompt_id", pa.string(), False),
            ("text", pa.string(), False),
            ("method", pa.string(), False),
            ("generator", pa.string(), True),
            ("created_at", TIMESTAMP, False),
            ("note", pa.string(), True),  # why a row is not what was asked for (an LLM fallback)
        ),
        key=("prompt_id", "text", "method"),
        added_later=("note",),
    ),
    # Chat completions of the LLM contrast method, so the same request never calls the API twice.
    # request_key hashes model, messages and sampling parameters (not the server's URL).
    "llm_replies": TableSpec(
        _schema(
            ("request_key", pa.string(), False),
            ("model", pa.string(), False),
            ("prompt", pa.string(), False),
            ("reply", pa.string(), False),
            ("created_at", TIMESTAMP, False),
        ),
        key=("request_key",),
    ),
    # Sentence embeddings of prompt texts (graph-based selection), computed once per embedder.
    "text_embeddings": TableSpec(
        _schema(
            ("embedder", pa.string(), False),
            ("text", pa.string(), False),
            ("embedding", pa.list_(pa.float32()), False),
        ),
        key=("embedder", "text"),
    ),
    # Prompts picked from a pool by graph-based selection, in the order they were picked.
    "prompt_selections": TableSpec(
        _schema(
            ("set", pa.string(), False),
            ("prompt_id", pa.string(), False),
            ("rank", pa.int32(), False),
            ("pool", pa.string(), False),
            ("k", pa.int32(), False),
            ("seed", pa.int64(), False),
            ("coverage", pa.float64(), False),  # share of the pool covered after this pick
        ),
        key=("set", "prompt_id"),
    ),
    # `ordinal` (the image's position among its prompt's images: benchmark file order, or the
    # generation index) is not in DESIGN.md's list: AP@k breaks reward ties by it.
    "images": TableSpec(
        _schema(
            ("image_id", pa.string(), False),
            ("prompt_id", pa.string(), False),
            ("set", pa.string(), False),
            ("file", pa.string(), False),
            ("ordinal", pa.int32(), False),
            ("seed", pa.int64(), True),
            ("generator", pa.string(), True),
            ("lora", pa.string(), True),
            ("steps", pa.int32(), True),
            ("guidance", pa.float64(), True),
            ("path", pa.string(), True),
            ("sha256", pa.string(), True),
            ("width", pa.int32(), True),
            ("height", pa.int32(), True),
        ),
        key=("image_id",),
    ),
    "labels": TableSpec(
        _schema(
            ("image_id", pa.string(), False),
            ("annotator", pa.int32(), False),
            ("label", pa.int8(), False),
        ),
        key=("image_id", "annotator"),
    ),
    "scores": TableSpec(
        _schema(
            ("image_id", pa.string(), False),
            ("text", pa.string(), False),
            ("reward_model", pa.string(), False),
            ("model_version", pa.string(), False),
            ("score", pa.float64(), False),
            ("run_id", pa.string(), True),
            ("scored_at", TIMESTAMP, False),
        ),
        key=("image_id", "text", "reward_model", "model_version"),
        append_only=True,
    ),
    "score_failures": TableSpec(
        _schema(
            ("image_id", pa.string(), False),
            ("reward_model", pa.string(), False),
            ("model_version", pa.string(), False),
            ("reason", pa.string(), False),
            ("failed_at", TIMESTAMP, False),
        ),
        key=("image_id", "reward_model", "model_version"),
    ),
    "best_of_n": TableSpec(
        _schema(
            ("prompt_id", pa.string(), False),
            ("generator", pa.string(), False),
            ("lora", pa.string(), False),  # "" without an adapter: key columns are never null
            ("reward", pa.string(), False),
            ("n", pa.int32(), False),
            ("image_id", pa.string(), False),
            ("value", pa.float64(), False),
            ("run_id", pa.string(), True),
        ),
        key=("prompt_id", "generator", "lora", "reward", "n"),
    ),
    "prompt_metrics": TableSpec(
        _schema(
            ("set", pa.string(), False),
            ("prompt_id", pa.string(), False),
            ("prompt", pa.string(), False),
            ("reward", pa.string(), False),
            ("n_images", pa.int32(), False),
            ("human", pa.float64(), False),
            ("auroc", pa.float64(), True),
            ("auprc", pa.float64(), True),
            ("ap5", pa.float64(), True),
            ("ap10", pa.float64(), True),
            ("ap25", pa.float64(), True),
            ("spearman", pa.float64(), True),
            ("kendall", pa.float64(), True),
            ("run_id", pa.string(), True),
        ),
        key=("set", "prompt_id", "reward"),
    ),
    # Human rankings of one item's images (tasks/preferences.py): an item is one prompt's images as
    # people ranked them together (a file's entry, a comparison); lower rank is better, equal ranks
    # tie. Pairs are formed within an item only. `annotator` is "consensus" for a file's combined
    # ranking, else the annotator's name.
    "preference_ranks": TableSpec(
        _schema(
            ("set", pa.string(), False),
            ("item", pa.string(), False),
            ("image_id", pa.string(), False),
            ("annotator", pa.string(), False),
            ("rank", pa.float64(), False),
        ),
        key=("set", "item", "image_id", "annotator"),
    ),
    # Per item and reward spec: the counts behind the preference figures (tia2/preference.py).
    "preference_metrics": TableSpec(
        _schema(
            ("set", pa.string(), False),
            ("item", pa.string(), False),
            ("prompt", pa.string(), False),
            ("reward", pa.string(), False),
            ("annotator", pa.string(), False),
            ("images", pa.int32(), False),
            ("pairs", pa.int32(), False),          # pairs people rank differently
            ("correct", pa.int32(), False),        # ... the reward orders the same way, strictly
            ("model_ties", pa.int32(), False),     # ... the reward ties
            ("human_ties", pa.int32(), False),
            ("accuracy", pa.float64(), True),      # correct / pairs (null without pairs)
            ("ranking_accuracy", pa.float64(), True),  # HPDv2's per-item figure
            ("recall_at_1", pa.float64(), True),
            ("recall_at_2", pa.float64(), True),
            ("recall_at_4", pa.float64(), True),
            ("filter_at_1", pa.float64(), True),
            ("filter_at_2", pa.float64(), True),
            ("filter_at_4", pa.float64(), True),
            ("run_id", pa.string(), True),
        ),
        key=("set", "item", "reward", "annotator"),
    ),
    # Generators ranked by reward (tasks/generator_ranking.py): per reward spec and generator (a
    # label: NAME, NAME+ADAPTER or set:SET) over the prompts all the ranked generators have; `sets`
    # is the prompt sets asked for ("" for all), best_of 0 without best-of-N.
    "generator_rankings": TableSpec(
        _schema(
            ("sets", pa.string(), False),
            ("reward", pa.string(), False),
            ("generator", pa.string(), False),
            ("best_of", pa.int32(), False),
            ("prompts", pa.int32(), False),
            ("mean_reward", pa.float64(), False),
            ("rank", pa.float64(), False),
            ("best_of_n", pa.float64(), True),
            ("best_of_n_rank", pa.float64(), True),
            ("run_id", pa.string(), True),
        ),
        key=("sets", "reward", "generator", "best_of"),
    ),
    # Fine-tuning checkpoints (tasks/finetune.py): a run is one (algorithm, base model, reward,
    # hyperparameters, prompts); each checkpoint's adapter, evaluated against the base model on the
    # training prompts with fixed seeds (wins: images whose reward beats the base image's).
    "finetune_checkpoints": TableSpec(
        _schema(
            ("run", pa.string(), False),
            ("algo", pa.string(), False),
            ("generator", pa.string(), False),
            ("reward", pa.string(), False),
            ("step", pa.int32(), False),
            ("path", pa.string(), False),
            ("mean_reward", pa.float64(), False),
            ("base_mean_reward", pa.float64(), False),
            ("wins", pa.int32(), False),
            ("n_eval", pa.int32(), False),
            ("loss", pa.float64(), True),
            ("created_at", TIMESTAMP, False),
        ),
        key=("run", "step"),
    ),
    # Adapters against their base model on held-out prompts (tasks/evaluate_finetune.py). An
    # evaluation is one setting: base model, held-out prompts, images per prompt, denoising steps,
    # guidance, seed and tie tolerance (hashed into `evaluation`). Per adapter and reward spec: of
    # the matched pairs (same prompt and seed) how many the adapter's image wins, ties and loses.
    "finetune_evaluation": TableSpec(
        _schema(
            ("evaluation", pa.string(), False),
            ("adapter", pa.string(), False),  # the adapter file
            ("reward", pa.string(), False),
            ("generator", pa.string(), False),
            ("lora", pa.string(), False),
            ("run", pa.string(), True),  # the fine-tuning run, when the adapter is one of its checkpoints
            ("step", pa.int32(), True),
            ("prompts", pa.int32(), False),
            ("images_per_prompt", pa.int32(), False),
            ("denoise_steps", pa.int32(), False),
            ("guidance", pa.float64(), False),
            ("seed", pa.int64(), False),
            ("tol", pa.float64(), False),
            ("wins", pa.int32(), False),
            ("ties", pa.int32(), False),
            ("losses", pa.int32(), False),
            ("n", pa.int32(), False),
            ("mean_reward", pa.float64(), False),
            ("base_mean_reward", pa.float64(), False),
            ("run_id", pa.string(), True),
            ("evaluated_at", TIMESTAMP, False),
        ),
        key=("evaluation", "adapter", "reward"),
    ),
    # Reward models trained from preferences (tasks/train_reward.py), one card per registered name:
    # what it was trained from and how it did on its held-out validation pairs.
    "reward_model_cards": TableSpec(
        _schema(
            ("name", pa.string(), False),
            ("version", pa.string(), False),          # the model_version its scores get
            ("family", pa.string(), False),
            ("base", pa.string(), False),
            ("base_version", pa.string(), False),
            ("sets", pa.list_(pa.string()), False),
            ("items_train", pa.int32(), False),
            ("items_validation", pa.int32(), False),
            ("pairs_train", pa.int32(), False),
            ("pairs_validation", pa.int32(), False),
            ("steps", pa.int32(), False),             # optimizer steps trained
            ("best_step", pa.int32(), False),         # the step of the registered weights
            ("validation_accuracy", pa.float64(), False),
            ("untrained_validation_accuracy", pa.float64(), False),
            ("settings", pa.string(), False),         # JSON: every training setting
            ("run", pa.string(), False),              # the training run (reward_training/RUN)
            ("run_id", pa.string(), True),
            ("created_at", TIMESTAMP, False),
        ),
        key=("name",),
    ),
    # --- people's judgements (tasks/annotate.py): annotators, batches of items, answers ---------
    # An annotator's id doubles as `labels.annotator` (from 1000 up: TIA2's own are 0-2); only a
    # hash of the secret token of their link is kept. role: annotator or admin.
    "annotators": TableSpec(
        _schema(
            ("annotator_id", pa.int32(), False),
            ("name", pa.string(), False),
            ("role", pa.string(), False),
            ("token_sha256", pa.string(), False),
            ("created_at", TIMESTAMP, False),
        ),
        key=("annotator_id",),
    ),
    # A batch is one task (rating, ranking, pairwise, best-worst) over items of one prompt set;
    # settings is its JSON (images per item, the 1-7 aspects, the instruction, where it came from).
    # Its rankings and pairs go to preference_ranks under the batch's name as the set.
    "annotation_batches": TableSpec(
        _schema(
            ("batch", pa.string(), False),
            ("task", pa.string(), False),
            ("set", pa.string(), False),
            ("per_item", pa.int32(), False),  # annotators per item
            ("seed", pa.int64(), False),
            ("settings", pa.string(), False),
            ("created_at", TIMESTAMP, False),
        ),
        key=("batch",),
    ),
    # The images shown together (one image for rating), in the batch's seeded order.
    "annotation_items": TableSpec(
        _schema(
            ("batch", pa.string(), False),
            ("item", pa.string(), False),
            ("position", pa.int32(), False),
            ("prompt_id", pa.string(), False),
            ("image_ids", pa.list_(pa.string()), False),
        ),
        key=("batch", "item"),
    ),
    # Who sees which item, where in their queue, and in which order its images are shown (the
    # pairwise sides).
    "annotation_assignments": TableSpec(
        _schema(
            ("batch", pa.string(), False),
            ("item", pa.string(), False),
            ("annotator_id", pa.int32(), False),
            ("queue_position", pa.int32(), False),
            ("shown", pa.list_(pa.string()), False),
        ),
        key=("batch", "item", "annotator_id"),
    ),
    # One answer per (item, annotator): the latest; `answer` is its canonical JSON over image ids
    # (tia2/annotation.py), `settings` the batch's settings it was given under.
    "annotations": TableSpec(
        _schema(
            ("batch", pa.string(), False),
            ("item", pa.string(), False),
            ("annotator_id", pa.int32(), False),
            ("task", pa.string(), False),
            ("shown", pa.list_(pa.string()), False),
            ("answer", pa.string(), False),
            ("settings", pa.string(), False),
            ("source", pa.string(), False),  # app, label-studio, ...
            ("answered_at", TIMESTAMP, False),
        ),
        key=("batch", "item", "annotator_id"),
    ),
    # Every change of an answer: answer (first), change (replaced `previous`), undo (removed it).
    "annotation_log": TableSpec(
        _schema(
            ("change_id", pa.string(), False),
            ("batch", pa.string(), False),
            ("item", pa.string(), False),
            ("annotator_id", pa.int32(), False),
            ("action", pa.string(), False),
            ("answer", pa.string(), True),
            ("previous", pa.string(), True),
            ("at", TIMESTAMP, False),
        ),
        key=("change_id",),
    ),
    # ImageReward's optional 1-7 ratings of an image: alignment, fidelity, harmlessness.
    "image_ratings": TableSpec(
        _schema(
            ("image_id", pa.string(), False),
            ("annotator", pa.int32(), False),
            ("aspect", pa.string(), False),
            ("value", pa.int8(), False),
        ),
        key=("image_id", "annotator", "aspect"),
    ),
    # Agreement of people with each other and of reward models with people, per batch or set
    # (tasks/annotate.py; ImageReward Table 2a), with a bootstrap interval over items.
    "annotation_agreement": TableSpec(
        _schema(
            ("scope", pa.string(), False),      # the batch, or the labelled set
            ("measure", pa.string(), False),
            ("subject", pa.string(), False),    # an annotator, a reward spec, or "all"
            ("other", pa.string(), False),      # the annotator compared with, "majority", or ""
            ("value", pa.float64(), True),
            ("low", pa.float64(), True),
            ("high", pa.float64(), True),
            ("n", pa.int32(), False),           # the items or pairs behind the value
            ("run_id", pa.string(), True),
        ),
        key=("scope", "measure", "subject", "other"),
    ),
}

# The TIA2 protocol's labels of each labelled image (DESIGN.md): binary z = 1 iff at least two of
# its three annotators gave 1; graded = the mean over its annotators of 1 -> 1, 0 -> 0, -1 -> 0.5.
# Images people label in the annotation app count once they have three labels; with more, z is
# the strict majority of 1s (two of three, as TIA2).
IMAGE_LABELS_VIEW = """CREATE OR REPLACE VIEW image_labels AS
    SELECT image_id, (2 * count_if(label = 1) > count(*))::INTEGER AS z,
           avg(CASE label WHEN 1 THEN 1.0 WHEN 0 THEN 0.0 WHEN -1 THEN 0.5 END) AS graded
    FROM labels GROUP BY image_id HAVING count(*) >= 3"""


def stable_id(*parts: str) -> str:
    """A short, stable identifier for a tuple of strings (prompt ids, TIA2 image ids)."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class AppendResult:
    added: int
    already_present: int
    replaced: int = 0  # stored rows given a new value (append_missing with replace)


class Store:
    """A store rooted at a folder. Opening creates the layout; it never deletes data."""

    CATALOG = "tia2.duckdb"

    def __init__(self, root: str | os.PathLike, *, create: bool = True):
        self.root = store_path(root)
        if not create and not (self.root / ".store_id").exists():
            raise UserError(f"no store at {self.root}: create one with `tia2 ingest-tia2`, "
                            f"or point --store / TIA2_STORE at an existing one")
        try:
            for sub in (self.root, self.root / ".locks", self.root / "scores", self.images_dir):
                sub.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the store at {self.root}: {exc.strerror}") from exc
        missing = [name for name, spec in TABLES.items() if not spec.append_only and not self._file(name).exists()]
        id_file = self.root / ".store_id"
        if missing or not id_file.exists():
            # A new store, or one whose tables were deleted: a new life, so no cached stage result
            # of the old one is taken for this one.
            _atomic_write_bytes(id_file, uuid.uuid4().hex.encode())
        self.store_id = id_file.read_text().strip()
        for name in missing:
            self._write_file(self._file(name), TABLES[name].schema.empty_table())
        self._add_later_columns()
        self.refresh_catalog()

    def _add_later_columns(self) -> None:
        """Give files written before a column was added that column (null), so that views and
        readers see one schema."""
        for name, spec in TABLES.items():
            if spec.added_later and not set(spec.added_later) <= set(pq.read_schema(self._file(name)).names):
                with self.lock(name):
                    self._write_file(self._file(name), pq.read_table(self._file(name), schema=spec.schema))

    # --- paths ---------------------------------------------------------------------------
    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def adapters_dir(self) -> Path:
        """Fine-tuned LoRA adapters and their training state, one folder per run."""
        return self.root / "adapters"

    @property
    def reward_models_dir(self) -> Path:
        """Reward models trained here, one folder per registered name (`reward_models_folder`)."""
        return reward_models_folder(self.root)

    @property
    def reward_training_dir(self) -> Path:
        """Reward-model training runs: the last training state and the best weights of each."""
        return self.root / "reward_training"

    @property
    def catalog_path(self) -> Path:
        return self.root / self.CATALOG

    def _file(self, table: str) -> Path:
        return self.root / f"{table}.parquet"

    def _glob(self, table: str) -> str:
        if TABLES[table].append_only:
            return str(self.root / table / "*.parquet")
        return str(self._file(table))

    def _parts(self, table: str) -> list[Path]:
        return sorted((self.root / table).glob("*.parquet"))

    # --- reading -------------------------------------------------------------------------
    def connect(self, *tables: str) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with one view per table and `image_labels` (holds no
        file lock). With `tables`, those only, and each small table read once, now: a view reads
        its file by name at every query, and a writer renaming a new file in between tears the
        read (the annotation app reads while answers are written)."""
        con = duckdb.connect()
        for name in tables or TABLES:
            if tables and not TABLES[name].append_only:
                con.register(name, self.read(name))
            else:
                con.execute(self._view_sql(name))
        if not tables or "labels" in tables:
            con.execute(IMAGE_LABELS_VIEW)
        return con

    def _view_sql(self, table: str) -> str:
        if TABLES[table].append_only and not self._parts(table):
            cols = ", ".join(
                f"CAST(NULL AS {_DUCKDB_TYPES[f.type]}) AS \"{f.name}\"" for f in TABLES[table].schema
            )
            return f"CREATE OR REPLACE VIEW {table} AS SELECT {cols} WHERE false"
        path = self._glob(table).replace("'", "''")
        return f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet('{path}')"

    def read(self, table: str) -> pa.Table:
        if TABLES[table].append_only:
            with self.connect(table) as con:
                return con.sql(f"SELECT * FROM {table}").to_arrow_table().cast(TABLES[table].schema)
        # One open file: pyarrow opening the path again (footer, then pages) could meet the file
        # a writer renamed into place in between.
        with open(self._file(table), "rb") as fh:
            return pq.read_table(fh, schema=TABLES[table].schema)

    def fingerprint(self, *tables: str) -> str:
        """Changes whenever any of the tables' files change; used in stage cache keys."""
        h = hashlib.sha256(self.store_id.encode())
        for table in tables:
            files = self._parts(table) if TABLES[table].append_only else [self._file(table)]
            for f in files:
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def query_readonly(self, sql: str) -> tuple[list[str], list[tuple]]:
        """The column names and all rows of one read-only statement (see `stream_readonly`)."""
        with self.stream_readonly(sql) as (columns, batches):
            return columns, [row for batch in batches for row in batch]

    @contextlib.contextmanager
    def stream_readonly(self, sql: str, batch_rows: int = 10_000):
        """Run one read-only statement through the catalog (what `tia2 sql` runs): yields its
        column names and its rows in lists of at most `batch_rows`, fetched as they are read, so
        a big result never sits in memory whole.

        Only SELECT / EXPLAIN are accepted, the catalog is opened read-only, and DuckDB is locked
        to the store's folder: no attaching, extension loading or file access outside it.
        """
        try:
            statements = duckdb.extract_statements(sql)
        except duckdb.Error as exc:
            raise UserError(f"SQL error: {exc}") from exc
        if len(statements) != 1:
            raise UserError(f"give exactly one SQL statement (got {len(statements)})")
        kind = statements[0].type
        if kind not in (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN):
            raise UserError(f"only read-only queries (SELECT, EXPLAIN) are allowed, not {_statement_name(statements[0])}: "
                            f"the catalog is read-only; change data with tia2 commands")
        self.refresh_catalog()
        config = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
        with duckdb.connect(str(self.catalog_path), read_only=True, config=config) as con:
            con.execute(f"SET allowed_directories = ['{str(self.root).replace(chr(39), chr(39) * 2)}/']")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            with _sql_errors():
                cursor = con.execute(sql)
            yield [d[0] for d in cursor.description], _fetch_batches(cursor, batch_rows)

    # --- writing -------------------------------------------------------------------------
    def check_writable(self) -> None:
        """A UserError now, before any work, when this process may not write to the store."""
        if not os.access(self.root, os.W_OK):
            raise UserError(f"cannot write to the store at {self.root}: it is read-only for this user")

    @contextlib.contextmanager
    def lock(self, table: str):
        """Exclusive lock on one table across processes, for a read-modify-write. Every write takes
        one first, so a store this process cannot write fails here, before anything changes."""
        try:
            fh = open(self.root / ".locks" / f"{table}.lock", "w")
        except OSError as exc:
            raise UserError(f"cannot write to the store at {self.root}: {exc.strerror}") from exc
        with fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def conform(self, table: str, rows: pa.Table) -> pa.Table:
        """Check `rows` against the table's schema and return them in its column order and types."""
        spec = TABLES[table]
        for name in set(spec.added_later) - set(rows.column_names):
            rows = rows.append_column(name, pa.nulls(rows.num_rows, spec.schema.field(name).type))
        expected = set(spec.schema.names)
        missing = expected - set(rows.column_names)
        extra = set(rows.column_names) - expected
        if missing or extra:
            raise ValueError(
                f"rows for table {table!r} do not match its schema: "
                f"missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        try:
            rows = rows.select(spec.schema.names).cast(spec.schema, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ValueError(f"rows for table {table!r} have the wrong types: {exc}") from exc
        for field in spec.schema:
            if not field.nullable and rows.column(field.name).null_count:
                raise ValueError(f"table {table!r}: column {field.name!r} has null values")
        return rows

    def upsert(self, table: str, rows: pa.Table, *, replace: bool = True) -> int:
        """Insert rows into a small table and return how many keys are new.

        A row whose key is stored replaces it (or, with replace=False, is dropped). When nothing
        changes the file is left untouched, so fingerprints and cache keys stay the same.
        """
        return self.upsert_together({table: rows}, keep_stored=() if replace else (table,))[table]

    def upsert_together(self, tables: dict[str, pa.Table], *, keep_stored: tuple[str, ...] = (),
                        remove: dict[str, pa.Table] | None = None) -> dict[str, int]:
        """`upsert` into several small tables as one change: every new file is written (under all
        their locks, taken in name order) before any stored file is replaced, so a failure (a
        repeated key, a full disk) leaves every table as it was. In the tables of `keep_stored` a
        stored row wins over a new one of its key. `remove` names, per table, keys (a table of the
        key columns) whose stored rows go, before the new rows are added. Returns the new keys per
        table."""
        remove = remove or {}
        conformed = {table: self.conform(table, rows) for table, rows in tables.items()}
        for table in remove:
            conformed.setdefault(table, TABLES[table].schema.empty_table())
        added, staged = {}, []  # (temporary file, the table file it replaces)
        with contextlib.ExitStack() as held:
            for table in sorted(conformed):
                held.enter_context(self.lock(table))
            try:
                for table, rows in conformed.items():
                    merged, added[table] = self._merged(table, rows, replace=table not in keep_stored,
                                                        remove=remove.get(table))
                    if merged is not None:
                        staged.append((self._stage_file(self._file(table), merged), self._file(table)))
            except BaseException:
                for tmp, _ in staged:
                    tmp.unlink(missing_ok=True)
                raise
            for tmp, path in staged:
                os.replace(tmp, path)
        return added

    def _merged(self, table: str, rows: pa.Table, replace: bool,
                remove: pa.Table | None = None) -> tuple[pa.Table | None, int]:
        """The table with the keys of `remove` deleted and `rows` upserted (None when nothing
        changes) and how many keys are new."""
        spec = TABLES[table]
        assert not spec.append_only, f"{table} is append-only: use append_missing"
        key = ", ".join(f'"{k}"' for k in spec.key)
        with _scratch() as con:
            con.register("new_rows", rows)
            if con.execute(f"SELECT count(*) - count(DISTINCT ({key})) FROM new_rows").fetchall()[0][0]:
                raise ValueError(f"table {table!r}: the new rows repeat a key ({key})")
            old_rows = pq.read_table(self._file(table), schema=spec.schema)
            removed = 0
            if remove is not None and remove.num_rows:
                con.register("stored", old_rows)
                con.register("removed_keys", remove.select(list(spec.key)))
                kept = con.sql(f"SELECT * FROM stored ANTI JOIN removed_keys USING ({key})").to_arrow_table()
                removed, old_rows = old_rows.num_rows - kept.num_rows, kept.select(spec.schema.names).cast(spec.schema)
            con.register("old_rows", old_rows)
            if not replace:
                rows = con.sql(f"SELECT * FROM new_rows ANTI JOIN old_rows USING ({key})").to_arrow_table()
                con.register("new_rows", rows)
            added = con.execute(
                f"SELECT count(*) FROM new_rows ANTI JOIN old_rows USING ({key})"
            ).fetchall()[0][0]
            changed = con.execute(
                "SELECT count(*) FROM (SELECT * FROM new_rows EXCEPT SELECT * FROM old_rows)"
            ).fetchall()[0][0]
            if not changed and not removed:
                return None, 0
            merged = con.sql(
                f"SELECT * FROM old_rows ANTI JOIN new_rows USING ({key}) "
                f"UNION ALL BY NAME SELECT * FROM new_rows"
            ).to_arrow_table()
        return merged.select(spec.schema.names).cast(spec.schema), added

    def append_missing(self, table: str, rows: pa.Table, *, compare: str, replace: bool = False) -> AppendResult:
        """Append the rows whose key is not yet stored (an append-only table).

        A stored row with the same key but a different value in column `compare` is a conflict:
        nothing is written and ValueError names how many there are. With `replace` such stored
        rows are replaced instead (corrected imported scores): every new file (the parts that
        lose rows, one part of the new rows) is written before any stored file changes, then
        renamed into place, so a failure leaves the table as it was.
        """
        spec = TABLES[table]
        assert spec.append_only
        rows = self.conform(table, rows)
        key = ", ".join(f'"{k}"' for k in spec.key)
        same_key = " AND ".join(f'n."{k}" = o."{k}"' for k in spec.key)
        with self.lock(table), self.connect() as con:
            con.register("new_rows", rows)
            fresh = con.sql(f'SELECT n.* FROM new_rows n ANTI JOIN {table} o ON {same_key} '
                            f'AND n."{compare}" IS NOT DISTINCT FROM o."{compare}"').to_arrow_table()
            con.register("fresh", fresh)
            changed = con.execute(f"SELECT count(*) FROM fresh SEMI JOIN {table} USING ({key})").fetchall()[0][0]
            if changed and not replace:
                raise ValueError(f"{changed} rows have a key already stored in {table!r} with a different {compare}")
            staged, emptied = [], []  # (temporary file, its name once committed); parts left without rows
            try:
                for part in self._parts(table) if changed else []:
                    stored = pq.read_table(part, schema=spec.schema)
                    con.register("stored", stored)
                    kept = con.sql(f"SELECT * FROM stored ANTI JOIN fresh USING ({key})").to_arrow_table()
                    if kept.num_rows == 0:
                        emptied.append(part)
                    elif kept.num_rows < stored.num_rows:
                        staged.append((self._stage_file(part, kept.cast(spec.schema)), part))
                if fresh.num_rows:
                    part = self.root / table / f"part-{uuid.uuid4().hex}.parquet"
                    staged.append((self._stage_file(part, fresh.select(spec.schema.names).cast(spec.schema)), part))
            except BaseException:
                for tmp, _ in staged:
                    tmp.unlink(missing_ok=True)
                raise
            had_parts = bool(self._parts(table))
            for tmp, path in staged:
                os.replace(tmp, path)
            for part in emptied:
                part.unlink()
            if had_parts != bool(self._parts(table)):
                self.refresh_catalog()
        return AppendResult(added=fresh.num_rows - changed, already_present=rows.num_rows - fresh.num_rows,
                            replaced=changed)

    def delete_rows(self, table: str, where: str, params: dict) -> int:
        """Remove the rows of an append-only table that match `where` (SQL over the part, as
        `rows`; it may read the table's view too) and return how many. Each part that holds such
        rows is rewritten atomically; the others are left untouched."""
        assert TABLES[table].append_only
        if not self._parts(table):
            return 0
        with self.lock(table), self.connect() as con:
            # one scan finds the parts holding such rows (usually none): only those are read again
            glob = self._glob(table).replace("'", "''")
            con.execute(f"CREATE OR REPLACE TEMP VIEW rows AS SELECT * FROM read_parquet('{glob}', filename = true)")
            doomed = con.execute(f"SELECT filename, count(*) FROM rows WHERE {where} GROUP BY ALL", params).fetchall()
            for filename, _ in doomed:
                path = filename.replace("'", "''")
                con.execute(f"CREATE OR REPLACE TEMP VIEW rows AS SELECT * FROM read_parquet('{path}')")
                kept = con.sql(f"SELECT * FROM rows WHERE NOT ({where})", params=params).to_arrow_table()
                if kept.num_rows:
                    self._write_file(Path(filename), kept.cast(TABLES[table].schema))
                else:
                    Path(filename).unlink()
            if doomed and not self._parts(table):
                self.refresh_catalog()
        return sum(count for _, count in doomed)

    @staticmethod
    def _stage_file(path: Path, table: pa.Table) -> Path:
        """Write `table` to a temporary file beside `path`, on disk; renaming it to `path` commits it."""
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            pq.write_table(table, tmp, compression="zstd")
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    @classmethod
    def _write_file(cls, path: Path, table: pa.Table) -> None:
        tmp = cls._stage_file(path, table)
        try:
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    # --- the DuckDB catalog --------------------------------------------------------------
    def refresh_catalog(self) -> None:
        """Rebuild tia2.duckdb when its views would change, by writing a new file and renaming it.

        Readers keep the old file open and are never blocked; no writer holds the catalog open.
        """
        sql = ";\n".join(self._view_sql(t) for t in TABLES) + ";\n"
        stamp = self.root / ".catalog.sql"
        if self.catalog_path.exists() and stamp.exists() and stamp.read_text() == sql:
            return
        with self.lock("_catalog"):
            tmp = self.root / f".{self.CATALOG}.{uuid.uuid4().hex}.tmp"
            try:
                with duckdb.connect(str(tmp)) as con:
                    con.execute(sql)
                os.replace(tmp, self.catalog_path)
            finally:
                tmp.unlink(missing_ok=True)
                Path(f"{tmp}.wal").unlink(missing_ok=True)
            _atomic_write_bytes(stamp, sql.encode())


_DUCKDB_TYPES = {
    pa.string(): "VARCHAR",
    pa.float64(): "DOUBLE",
    pa.int64(): "BIGINT",
    pa.int32(): "INTEGER",
    pa.int8(): "TINYINT",
    TIMESTAMP: "TIMESTAMPTZ",
}


_scratch_connections = threading.local()


@contextlib.contextmanager
def _scratch() -> Iterator[duckdb.DuckDBPyConnection]:
    """This thread's in-memory DuckDB connection for merging rows, with the tables registered on
    it dropped afterwards. Opening a connection costs tens of milliseconds, more than a small
    merge: an annotation app's every answer merges."""
    con = getattr(_scratch_connections, "con", None)
    if con is None:
        con = _scratch_connections.con = duckdb.connect()
    try:
        yield con
    finally:
        for (name,) in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal AND temporary").fetchall():
            con.unregister(name)


def _statement_name(statement) -> str:
    """A statement's kind as written: DuckDB files INSTALL under LOAD."""
    if statement.type == duckdb.StatementType.LOAD and "INSTALL" in statement.query.upper().split()[:2]:
        return "INSTALL"
    return statement.type.name


@contextlib.contextmanager
def _sql_errors():
    """DuckDB's errors of a user's query as one UserError line."""
    try:
        yield
    except duckdb.PermissionException as exc:
        raise UserError(f"not allowed: {str(exc).splitlines()[0]} (queries may only read "
                        f"the store's tables)") from exc
    except duckdb.Error as exc:
        raise UserError(f"SQL error: {str(exc).splitlines()[0]}") from exc


def _fetch_batches(cursor, size: int) -> Iterator[list[tuple]]:
    while True:
        with _sql_errors():  # a query can fail halfway, e.g. on a row it cannot cast
            rows = cursor.fetchmany(size)
        if not rows:
            return
        yield rows


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def store_path(root: str | os.PathLike) -> Path:
    """The store's folder from a path or an fsspec URL. The store writes by atomic rename under
    POSIX file locks, so the URL must name a POSIX file system: `file://` (a local disk, or a
    network file system such as NFS mounted on every machine that shares the store); an object
    store (s3://, gs://, ...) is used by mounting it as a file system first."""
    text = os.fspath(root)
    if "://" not in text:
        return Path(text).expanduser().resolve()
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    protocol, _ = fsspec.core.split_protocol(text)
    if protocol not in LocalFileSystem.protocol:
        raise UserError(f"store {text}: the store needs a POSIX file system (atomic renames, file locks); "
                        f"mount {protocol}:// storage as a file system and give its path or a file:// URL")
    return Path(LocalFileSystem._strip_protocol(text)).resolve()


def reward_models_folder(root: str | os.PathLike) -> Path:
    """The registered reward models of the store at `root`, without opening the store (a
    config check reads it and must write nothing)."""
    return store_path(root) / "reward_models"


def default_store_root() -> str:
    return os.environ.get("TIA2_STORE", "storage")
