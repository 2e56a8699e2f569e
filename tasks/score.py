"""Stage: reward scores, computed with a reward model (`tia2 score`) or imported (`tia2
import-scores`).

Scoring encodes each image once and scores it against its caption and every contrast prompt;
only rows missing for the model's name and weights identity are computed.

An import file has one row per (image, text, reward model): columns `set, image, prompt,
reward_model, score` and optionally `model_version`. Every row is checked against the store
before anything is written; the whole file is then appended in one atomic part. A stored key with
another score is refused, or with `replace` given the file's score (all such rows, or none).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from tia2.errors import UserError
from tia2.store import TIMESTAMP, Store

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
    ("have no score", "score IS NULL OR trim(CAST(score AS VARCHAR)) = ''", "score"),
    ("have a score that is not a number", "value IS NULL AND trim(CAST(score AS VARCHAR)) <> ''", "score"),
    ("have a non-finite score", "NOT isfinite(value)", "score"),
    ("refer to an unknown (set, image)", "image_id IS NULL AND set <> '' AND image <> ''", "set, image"),
    ("have a prompt that is neither the image's caption nor one of its contrast prompts",
     "image_id IS NOT NULL AND NOT prompt_known", "set, image, prompt"),
    ("repeat a key (set, image, prompt, reward_model, model_version) of an earlier row",
     "occurrence > 1", "set, image, prompt, reward_model, model_version"),
]


def check_scores(store: Store, incoming: pa.Table, label: str, replace: bool = False) -> pa.Table:
    """Validate an import; return rows in the `scores` schema or raise UserError listing problems.
    A row whose key is stored with another score is a problem unless `replace`."""
    missing = [c for c in REQUIRED_COLUMNS if c not in incoming.column_names]
    if missing:
        raise UserError(f"{label}: missing column(s) {', '.join(missing)} "
                        f"(needs {', '.join(REQUIRED_COLUMNS)}, optional model_version)")
    if incoming.num_rows == 0:
        raise UserError(f"{label}: nothing to import: the file has no rows")
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
        raise UserError(f"{label}: nothing imported, {len(problems)} problem(s): " + "; ".join(problems))
    if not replace:
        changed = con.execute(
            """SELECT c.row, c.set, c.image, c.prompt, s.score, c.value FROM checked c JOIN scores s
               ON s.image_id = c.image_id AND s.text = c.prompt AND s.reward_model = c.reward_model
               AND s.model_version = c.model_version WHERE s.score <> c.value ORDER BY c.row""").fetchall()
        if changed:
            examples = "; ".join(f"row {row}: {set_name!r}, {image!r}, {prompt!r}: stored {old!r}, file {new!r}"
                                 for row, set_name, image, prompt, old, new in changed[:SHOWN_ROWS])
            raise UserError(f"{label}: nothing imported: {len(changed)} rows have another score than the one "
                            f"stored for their (set, image, prompt, reward_model, model_version) (first: "
                            f"{examples}); --replace replaces the stored scores, a new model_version keeps both")
    return con.sql(
        """SELECT image_id, prompt AS text, reward_model, model_version, value AS score,
                  CAST(NULL AS VARCHAR) AS run_id, $now::TIMESTAMPTZ AS scored_at
           FROM checked ORDER BY row""",
        params={"now": datetime.now(timezone.utc)},
    ).to_arrow_table()


def import_scores(store: Store, path: str | Path, run_id: str | None = None, replace: bool = False) -> dict:
    """Check and append a score file; re-importing the same file adds nothing. With `replace`,
    the file's scores replace stored ones of the same key (all of them or, on failure, none)."""
    rows = check_scores(store, read_score_file(path), str(path), replace)
    if run_id is not None:
        rows = rows.set_column(rows.schema.get_field_index("run_id"), "run_id",
                               pa.array([run_id] * rows.num_rows, pa.string()))
    try:
        result = store.append_missing("scores", rows, compare="score", replace=replace)
    except ValueError as exc:  # scores stored by another process since the check
        raise UserError(f"{path}: nothing imported: {exc} (--replace replaces them)") from exc
    models = sorted(set(rows.column("reward_model").to_pylist()))
    return {"rows": rows.num_rows, "added": result.added, "already_present": result.already_present,
            "replaced": result.replaced, "reward_models": models}



# --- scoring with a reward model -------------------------------------------------------------------
def pending_pairs(store: Store, reward_model: str, model_version: str,
                  sets: list[str] | None = None, shard: tuple[int, int] = (0, 1)) -> pd.DataFrame:
    """(image_id, path, text) still to score: every image with pixels, against its caption and
    every distinct contrast prompt, minus the rows already stored for this model and version.
    With shard (i, n), only every n-th image (by image id) from the i-th."""
    con = store.connect()
    return con.execute(
        """
        WITH texts AS (
            SELECT prompt_id, text FROM prompts
            UNION SELECT prompt_id, text FROM contrast_prompts),
        wanted AS (
            SELECT i.image_id, i.path, t.text, i.prompt_id, i.ordinal FROM images i JOIN texts t USING (prompt_id)
            WHERE i.path IS NOT NULL AND ($sets IS NULL OR i.set IN (SELECT unnest($sets)))
            QUALIFY (dense_rank() OVER (ORDER BY i.image_id) - 1) % $shards = $shard)
        SELECT w.image_id, w.path, w.text FROM wanted w ANTI JOIN (
            SELECT image_id, text FROM scores WHERE reward_model = $model AND model_version = $version) s
        USING (image_id, text)
        -- a caption's images side by side: a batch then shares its texts, encoded once
        ORDER BY w.prompt_id, w.ordinal, w.image_id, w.text
        """,
        {"sets": sets, "model": reward_model, "version": model_version, "shard": shard[0], "shards": shard[1]},
    ).df()


def remove_superseded_scores(store: Store, model) -> int:
    """Delete the rows that older scoring code (an earlier scorer revision, or none: rows from
    before revisions were recorded) made with the same weights, where this model's version has
    recomputed them: a score is what the current code computes, and one version per model keeps
    specs unambiguous. Rows not yet recomputed (a run killed half-way) stay until they are."""
    return store.delete_rows("scores", """
        reward_model = $model AND model_version <> $version
        AND (model_version = $identity OR starts_with(model_version, $identity || '/scorer-'))
        AND (image_id, text) IN (SELECT image_id, text FROM scores
                                 WHERE reward_model = $model AND model_version = $version)""",
        {"model": model.name, "version": model.version, "identity": model.identity})


@dataclass
class ScoreReport:
    images: int = 0
    rows_added: int = 0
    failures: list = field(default_factory=list)   # (image_id, reason)
    rows_superseded: int = 0  # rows of the same weights by older scoring code, now recomputed
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def _load_image(path: str):
    """The decoded image in its own mode: each model converts it to RGB where its official
    preprocessing does (some resize first, which differs for RGBA and palette images)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image


def score_images(store: Store, model, sets: list[str] | None = None, batch_size: int = 32,
                 run_id: str | None = None, show_progress: bool = True,
                 shard: tuple[int, int] = (0, 1)) -> ScoreReport:
    """Score every pending (image, text) pair with `model`; each batch of images is appended as
    one atomic part, so a killed run loses at most the batch in flight and a re-run only
    computes what is missing. Unreadable images go to `score_failures`."""
    import torch

    from tia2.progress import progress_bar
    from tia2.tracking import run_label

    pending = pending_pairs(store, model.name, model.version, sets, shard)
    by_image = list(pending.groupby("image_id", sort=False))
    report = ScoreReport()
    device = next(model.parameters()).device
    start = time.perf_counter()
    with progress_bar(f"scoring with {run_label(model.name, shard)}", len(by_image), show=show_progress) as advance:
        for first in range(0, len(by_image), batch_size):
            batch = by_image[first:first + batch_size]
            images, pairs_image, pairs_text, image_ids = [], [], [], []
            for image_id, rows in batch:
                try:
                    images.append(_load_image(rows["path"].iloc[0]))
                except Exception as exc:  # PIL raises many kinds for unreadable files
                    report.failures.append((image_id, f"{type(exc).__name__}: {exc}"))
                    continue
                pairs_image += [len(images) - 1] * len(rows)
                pairs_text += rows["text"].tolist()
                image_ids += [image_id] * len(rows)
            if images:
                with torch.no_grad():
                    features = model.encode_images(model.preprocess(images).to(device))
                    scores = model.score_encoded(features, torch.tensor(pairs_image, device=device), pairs_text)
                rows = pa.table({
                    "image_id": image_ids, "text": pairs_text, "reward_model": [model.name] * len(image_ids),
                    "model_version": [model.version] * len(image_ids), "score": scores.cpu().double().numpy(),
                    "run_id": pa.array([run_id] * len(image_ids), pa.string()),
                    "scored_at": pa.array([datetime.now(timezone.utc)] * len(image_ids), TIMESTAMP)})
                report.rows_added += store.append_missing("scores", rows, compare="score").added
                report.images += len(images)
            report.seconds = time.perf_counter() - start
            advance(len(batch), report.images_per_second)
    report.rows_superseded = remove_superseded_scores(store, model)
    if report.failures:
        now = datetime.now(timezone.utc)
        store.upsert("score_failures", pa.Table.from_pylist([
            dict(image_id=i, reward_model=model.name, model_version=model.version, reason=r, failed_at=now)
            for i, r in report.failures]))
    return report


def _check_sets_have_images(store: Store, sets: list[str] | None) -> None:
    """A UserError naming the sets asked for that have no image files to score."""
    if not sets:
        return
    with_files = {s for (s,) in store.connect().execute(
        "SELECT DISTINCT set FROM images WHERE path IS NOT NULL").fetchall()}
    empty = sorted(set(sets) - with_files)
    if empty:
        raise UserError(f"no image files in set(s) {', '.join(empty)} (sets with image files: "
                        f"{', '.join(sorted(with_files)) or 'none'}; register some with tia2 import-images "
                        f"or make them with tia2 generate)")


def record_score(store: Store, model_name: str, weights: str = "pretrained", sets: list[str] | None = None,
                 batch_size: int = 32, device: str = "cpu", fp16: bool = False, seed: int = 0,
                 parent_run_id: str | None = None, show_progress: bool = True,
                 shard: tuple[int, int] = (0, 1)) -> ScoreReport:
    """Build the model, score what is missing (of one shard of the images), log identity, counts
    and throughput to MLflow."""
    import mlflow

    from tia2.models import create_reward_model
    from tia2.tracking import run_label, stage_run

    if fp16 and not device.startswith("cuda"):
        raise UserError("--fp16 needs a GPU (--device cuda): half precision on the CPU is slow and inexact")
    _check_sets_have_images(store, sets)
    model = create_reward_model(model_name, weights=weights, seed=seed, device=device, store=store)
    if fp16:
        model = model.half()
    params = {"reward_model": model.name, "model_version": model.version, "sets": sets or "all",
              "batch_size": batch_size, "device": device, "fp16": fp16, "shard": f"{shard[0]}/{shard[1]}"}
    with stage_run("score", params, parent_run_id, label=run_label(model.name, shard)) as run:
        report = score_images(store, model, sets, batch_size, run.info.run_id, show_progress, shard)
        mlflow.log_metrics({"images": report.images, "rows_added": report.rows_added,
                            "rows_superseded": report.rows_superseded,
                            "failures": len(report.failures), "images_per_second": report.images_per_second})
    return report
