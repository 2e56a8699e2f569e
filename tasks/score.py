"""Stage: reward scores. For now: importing scores computed elsewhere (`tia2 import-scores`).

An import file has one row per (image, text, reward model): columns `set, image, prompt,
reward_model, score` and optionally `model_version`. Every row is checked against the store
before anything is written; the whole file is then appended in one atomic part.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from tia2.errors import UserError
from tia2.store import Store

REQUIRED_COLUMNS = ("set", "image", "prompt", "reward_model", "score")
IMPORTED_VERSION = "imported"
SHOWN_ROWS = 5


def read_score_file(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        if path.suffix.lower() == ".parquet":
            return pq.read_table(path)
        if path.suffix.lower() in (".csv", ".tsv"):
            opts = pacsv.ParseOptions(delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            # Keep every column as text except the score, so ids like "007" stay as written.
            convert = pacsv.ConvertOptions(column_types={"score": pa.string()}, strings_can_be_null=False)
            return pacsv.read_csv(path, parse_options=opts, convert_options=convert)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: cannot read it as {path.suffix[1:].upper()}: {exc}") from exc
    raise UserError(f"{path}: unknown file type {path.suffix!r} (use .parquet or .csv)")


# Each check: (what is wrong, SQL selecting offending rows from `checked`, columns to show).
_CHECKS = [
    ("have an empty set, image, prompt or reward_model",
     "set IS NULL OR set = '' OR image IS NULL OR image = '' OR prompt IS NULL OR prompt = '' "
     "OR reward_model IS NULL OR reward_model = ''", "set, image, reward_model"),
    ("have a non-finite score", "value IS NULL OR NOT isfinite(value)", "score"),
    ("refer to an unknown (set, image)", "image_id IS NULL AND set <> '' AND image <> ''", "set, image"),
    ("have a prompt that is neither the image's caption nor one of its contrast prompts",
     "image_id IS NOT NULL AND NOT prompt_known", "set, image, prompt"),
    ("repeat a key (set, image, prompt, reward_model, model_version) of an earlier row",
     "occurrence > 1", "set, image, prompt, reward_model, model_version"),
]


def check_scores(store: Store, incoming: pa.Table, label: str) -> pa.Table:
    """Validate an import; return rows in the `scores` schema or raise UserError listing problems."""
    missing = [c for c in REQUIRED_COLUMNS if c not in incoming.column_names]
    if missing:
        raise UserError(f"{label}: missing column(s) {', '.join(missing)} "
                        f"(needs {', '.join(REQUIRED_COLUMNS)}, optional model_version)")
    if "model_version" not in incoming.column_names:
        incoming = incoming.append_column("model_version", pa.array([IMPORTED_VERSION] * incoming.num_rows))
    incoming = incoming.select([*REQUIRED_COLUMNS, "model_version"])
    con = store.connect()
    con.register("incoming_raw", incoming)
    con.execute(
        """
        CREATE TEMP TABLE checked AS
        WITH raw AS (
            SELECT row_number() OVER () AS row, CAST(set AS VARCHAR) AS set,
                   CAST(image AS VARCHAR) AS image, CAST(prompt AS VARCHAR) AS prompt,
                   CAST(reward_model AS VARCHAR) AS reward_model,
                   coalesce(CAST(model_version AS VARCHAR), $default_version) AS model_version,
                   score, TRY_CAST(score AS DOUBLE) AS value
            FROM incoming_raw),
        texts AS (
            SELECT prompt_id, text FROM prompts
            UNION SELECT prompt_id, text FROM contrast_prompts)
        SELECT raw.*, i.image_id, t.text IS NOT NULL AS prompt_known,
               row_number() OVER (PARTITION BY raw.set, raw.image, raw.prompt, raw.reward_model,
                                  raw.model_version ORDER BY raw.row) AS occurrence
        FROM raw
        LEFT JOIN images i ON i.set = raw.set AND i.file = raw.image
        LEFT JOIN texts t ON t.prompt_id = i.prompt_id AND t.text = raw.prompt
        """,
        {"default_version": IMPORTED_VERSION},
    )
    problems = []
    for what, condition, shown in _CHECKS:
        count = con.execute(f"SELECT count(*) FROM checked WHERE {condition}").fetchall()[0][0]
        if count:
            first = con.execute(
                f"SELECT row, {shown} FROM checked WHERE {condition} ORDER BY row LIMIT {SHOWN_ROWS}"
            ).fetchall()
            examples = "; ".join(f"row {r[0]}: " + ", ".join(repr(v) for v in r[1:]) for r in first)
            problems.append(f"{count} rows {what} (first: {examples})")
    if problems:
        raise UserError(f"{label}: nothing imported, {len(problems)} problem(s):\n  "
                        + "\n  ".join(problems))
    return con.sql(
        """SELECT image_id, prompt AS text, reward_model, model_version, value AS score,
                  CAST(NULL AS VARCHAR) AS run_id, $now::TIMESTAMPTZ AS scored_at
           FROM checked ORDER BY row""",
        params={"now": datetime.now(timezone.utc)},
    ).to_arrow_table()


def import_scores(store: Store, path: str | Path, run_id: str | None = None) -> dict:
    """Check and append a score file; re-importing the same file adds nothing."""
    rows = check_scores(store, read_score_file(path), str(path))
    if run_id is not None:
        rows = rows.set_column(rows.schema.get_field_index("run_id"), "run_id",
                               pa.array([run_id] * rows.num_rows, pa.string()))
    try:
        result = store.append_missing("scores", rows, compare="score")
    except ValueError as exc:
        raise UserError(f"{path}: nothing imported: {exc} (a new score for the same model needs "
                        f"a new model_version)") from exc
    models = sorted(set(rows.column("reward_model").to_pylist()))
    return {"rows": rows.num_rows, "added": result.added,
            "already_present": result.already_present, "reward_models": models}

