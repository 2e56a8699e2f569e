"""Stage: human-preference benchmarks. Ingests ranked or paired images (ImageReward's test set,
HPDv2's, Pick-a-Pic-style pairs) into `prompts`, `images` and `preference_ranks`, and measures how
well reward specs agree with them (`preference_metrics`; the figures are tia2/preference.py's).

An item is one entry of the file: one prompt's images, ranked together. Two items may share a
prompt text (ImageReward's test set has such) and still never form pairs across each other.
"""

from __future__ import annotations

import io
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from tia2.errors import UserError
from tia2.preference import (TOP_K, Items, TieCalibration, bootstrap_weights, figures, interval, item_counts,
                             tie_agreements, tie_calibrated_accuracy, within_item_pairs)
from tia2.specs import Spec
from tia2.store import Store, stable_id

FORMATS = ("imagereward", "hpdv2", "pairs")
DEFAULT_SETS = {"imagereward": "imagereward-test", "hpdv2": "hpdv2-test", "pairs": "pairs"}
CONSENSUS = "consensus"  # the annotator of a file's combined ranking
MEAN_RANKS = "mean"  # as --annotator: each image's mean rank over its item's annotators (not the consensus)
PAIR_FILE_SUFFIXES = (".csv", ".json", ".parquet")
PREFERENCES = {"a": (1.0, 2.0), "b": (2.0, 1.0), "tie": (1.0, 1.0)}  # preference -> ranks of (a, b)
BOOTSTRAP = 1000


# --- reading the files ---------------------------------------------------------------------------
@dataclass
class Entry:
    """One item as read: its prompt, each image (a file name as written, or bytes to store) and
    the ranks of each annotator."""
    item: str
    prompt: str
    images: list[str | bytes]
    ranks: dict[str, list[float]]


def read_imagereward(path: Path) -> list[Entry]:
    """ImageReward's test.json: `[{id, prompt, generations, ranking}]`."""
    entries = []
    for n, raw in enumerate(_json_list(path)):
        where = f"{path}: entry {n}" + (f" (id {raw.get('id')!r})" if isinstance(raw, dict) and "id" in raw else "")
        _needs(raw, ("id", "prompt", "generations", "ranking"), where)
        entries.append(Entry(str(raw["id"]), _text(raw["prompt"], "prompt", where),
                             _files(raw["generations"], "generations", where),
                             {CONSENSUS: _ranks(raw["ranking"], len(raw["generations"]), "ranking", where)}))
    return entries


def read_hpdv2(path: Path) -> list[Entry]:
    """HPDv2's test.json: `[{prompt, image_path, rank, raw_annotations}]`, `rank` the combined
    ranking and `raw_annotations` one ranking per annotator. Items are numbered in file order."""
    entries = []
    for n, raw in enumerate(_json_list(path)):
        where = f"{path}: entry {n}"
        _needs(raw, ("prompt", "image_path", "rank"), where)
        files = _files(raw["image_path"], "image_path", where)
        ranks = {CONSENSUS: _ranks(raw["rank"], len(files), "rank", where)}
        annotations = raw.get("raw_annotations") or []
        if not isinstance(annotations, list):
            raise UserError(f"{where}: raw_annotations must be a list of rankings")
        for k, ranking in enumerate(annotations, start=1):
            ranks[f"annotator-{k}"] = _ranks(ranking, len(files), f"raw_annotations[{k - 1}]", where)
        entries.append(Entry(str(n), _text(raw["prompt"], "prompt", where), files, ranks))
    return entries


def read_pairs(path: Path) -> list[Entry]:
    """A pairwise file (CSV, JSON list of objects or Parquet): `prompt, image_a, image_b,
    preference` (a, b or tie) with an optional `item`; or Pick-a-Pic's layout `caption, jpg_0,
    jpg_1, label_0, label_1` (images as bytes, labels 1/0/0.5)."""
    frame = _table(path)
    pickapic = {"caption", "jpg_0", "jpg_1", "label_0", "label_1"} <= set(frame.columns)
    if not pickapic and not {"prompt", "image_a", "image_b", "preference"} <= set(frame.columns):
        raise UserError(f"{path}: needs columns prompt, image_a, image_b, preference (or Pick-a-Pic's caption, "
                        f"jpg_0, jpg_1, label_0, label_1); it has {', '.join(map(str, frame.columns)) or 'none'}")
    if frame.empty:
        raise UserError(f"{path}: nothing to ingest: the file has no rows")
    entries = []
    for n, row in enumerate(frame.to_dict("records")):
        item = str(row["item"]) if "item" in frame.columns else str(n)
        where = f"{path}: row {n + 1}"
        if pickapic:
            labels = (row["label_0"], row["label_1"])
            ranks = {(1.0, 0.0): (1.0, 2.0), (0.0, 1.0): (2.0, 1.0), (0.5, 0.5): (1.0, 1.0)}.get(
                tuple(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else np.nan
                      for v in labels))
            if ranks is None:
                raise UserError(f"{where}: label_0, label_1 must be 1, 0 or 0.5, 0.5 (got {labels[0]!r}, {labels[1]!r})")
            images = [_image_bytes(row[c], c, where) for c in ("jpg_0", "jpg_1")]
            prompt = _text(row["caption"], "caption", where)
        else:
            ranks = PREFERENCES.get(str(row["preference"]).strip().lower())
            if ranks is None:
                raise UserError(f"{where}: preference must be a, b or tie (got {row['preference']!r})")
            images = _files([row["image_a"], row["image_b"]], "image_a/image_b", where)
            prompt = _text(row["prompt"], "prompt", where)
        if images[0] == images[1]:
            raise UserError(f"{where}: both sides are the same image")
        entries.append(Entry(item, prompt, images, {CONSENSUS: list(ranks)}))
    return entries


READERS = {"imagereward": read_imagereward, "hpdv2": read_hpdv2, "pairs": read_pairs}


def _json_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: expected a non-empty JSON list of entries")
    return data


def _table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix not in PAIR_FILE_SUFFIXES:
        raise UserError(f"{path}: unknown file type {path.suffix!r} (use {', '.join(PAIR_FILE_SUFFIXES)})")
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        return pd.DataFrame(_json_list(path))
    except UserError:
        raise
    except Exception as exc:  # pandas and pyarrow raise many kinds for a damaged file
        raise UserError(f"{path}: cannot read it as {suffix[1:].upper()}: {exc}") from exc


def _needs(raw, fields: tuple[str, ...], where: str) -> None:
    if not isinstance(raw, dict) or not set(fields) <= raw.keys():
        raise UserError(f"{where}: needs fields {', '.join(fields)}")


def _text(value, name: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: {name} must be non-empty text (got {value!r})")
    return value


def _files(value, name: str, where: str) -> list[str]:
    if not isinstance(value, list) or len(value) < 2:
        raise UserError(f"{where}: {name} must list at least two images")
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise UserError(f"{where}: {name} must be image file names")
    if len(set(value)) < len(value):
        raise UserError(f"{where}: {name} names one image twice")
    return list(value)


def _ranks(value, count: int, name: str, where: str) -> list[float]:
    if not isinstance(value, list) or len(value) != count:
        raise UserError(f"{where}: {name} must give one rank per image ({count})")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value):
        raise UserError(f"{where}: {name} must be numbers (got {value!r})")
    return [float(v) for v in value]


def _image_bytes(value, name: str, where: str) -> bytes:
    if isinstance(value, dict) and "bytes" in value:  # datasets' Image feature, as parquet stores it
        value = value["bytes"]
    if not isinstance(value, (bytes, bytearray)) or not value:
        raise UserError(f"{where}: {name} must hold the image's bytes")
    return bytes(value)


# --- into the store ------------------------------------------------------------------------------
@dataclass
class PreferenceTables:
    prompts: pa.Table
    images: pa.Table
    ranks: pa.Table
    image_bytes: dict[Path, bytes] = field(default_factory=dict)  # content-addressed files to write
    report: dict = field(default_factory=dict)


def preference_tables(entries: list[Entry], set_name: str, source: str, label: str,
                      images_dir: Path | None, store_images: Path) -> PreferenceTables:
    """Rows for the store, every entry checked first: items unique, one prompt per image, image
    files under `images_dir` readable (a UserError naming the entry otherwise)."""
    from tasks.ingest import image_facts

    seen_items: set[str] = set()
    prompts, images, ranks, image_bytes = {}, {}, [], {}
    found = 0
    for entry in entries:
        if entry.item in seen_items:
            raise UserError(f"{label}: item {entry.item!r} appears twice")
        seen_items.add(entry.item)
        prompt_id = stable_id(set_name, entry.prompt)
        prompts[prompt_id] = dict(prompt_id=prompt_id, text=entry.prompt, set=set_name, category=None,
                                  subcategory=None, source=source)
        for ordinal, image in enumerate(entry.images):
            facts = {"path": None, "sha256": None, "width": None, "height": None}
            if isinstance(image, bytes):
                facts = _stored_image_facts(image, store_images, f"{label}: item {entry.item!r}: image {ordinal + 1}")
                file = Path(facts["path"]).name
                image_bytes[Path(facts["path"])] = image
            else:
                file = image
                if images_dir is not None and (images_dir / file).is_file():
                    try:
                        facts = image_facts(images_dir / file)
                    except ValueError as exc:
                        raise UserError(f"{label}: item {entry.item!r}: {exc}") from exc
            image_id = stable_id(set_name, file)
            known = images.get(image_id)
            if known is not None and known["prompt_id"] != prompt_id:
                raise UserError(f"{label}: item {entry.item!r}: image {file!r} is also an image of another prompt")
            if known is None:
                found += facts["path"] is not None
                images[image_id] = dict(image_id=image_id, prompt_id=prompt_id, set=set_name, file=file,
                                        ordinal=ordinal, seed=None, generator=None, lora=None, steps=None,
                                        guidance=None, **facts)
            for annotator, values in entry.ranks.items():
                ranks.append(dict(set=set_name, item=entry.item, image_id=image_id, annotator=annotator,
                                  rank=values[ordinal]))
    if images_dir is not None and not found:
        raise UserError(f"{images_dir}: none of the {len(images)} images of {label} is there "
                        f"(looked for the files as written, e.g. {images_dir / next(iter(images.values()))['file']})")
    report = {"set": set_name, "items": len(entries), "prompts": len(prompts), "images": len(images),
              "images_with_pixels": found,
              "annotators": sorted({a for e in entries for a in e.ranks})}
    return PreferenceTables(pa.Table.from_pylist(list(prompts.values())), pa.Table.from_pylist(list(images.values())),
                            pa.Table.from_pylist(ranks), image_bytes, report)


def _stored_image_facts(data: bytes, folder: Path, where: str) -> dict:
    """Facts of an image given as bytes, at its content-addressed place in the store."""
    import hashlib

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            width, height, kind = *image.size, (image.format or "png").lower()
    except UnidentifiedImageError as exc:
        raise UserError(f"{where}: its bytes are not an image") from exc
    except Exception as exc:  # PIL raises many kinds for damaged data
        raise UserError(f"{where}: its bytes do not decode ({exc})") from exc
    digest = hashlib.sha256(data).hexdigest()
    suffix = {"jpeg": ".jpg"}.get(kind, f".{kind}")
    return {"path": str(folder / f"{digest}{suffix}"), "sha256": digest, "width": width, "height": height}


def ingest_preferences(store: Store, path: str | Path, fmt: str, set_name: str | None = None,
                       images_dir: str | Path | None = None) -> dict:
    """Read a preference file and write its items; re-ingesting the same file changes nothing.
    Every entry is checked before anything is written, and the three tables change together."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r} (use {', '.join(FORMATS)})")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    folder = Path(images_dir) if images_dir is not None else None
    if folder is not None and not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    set_name = DEFAULT_SETS[fmt] if set_name is None else set_name
    if not set_name.strip():
        raise UserError("--set must be a non-empty name")
    tables = preference_tables(READERS[fmt](path), set_name, fmt, str(path), folder, store.images_dir)
    clash = store.connect().execute(
        "SELECT count(*) FROM prompts WHERE set = ? AND source <> ?", [set_name, fmt]).fetchall()[0][0]
    if clash:
        raise UserError(f"set {set_name!r} already holds {clash} prompts of another source: choose another --set")
    for target, data in tables.image_bytes.items():  # content-addressed: writing one twice is harmless
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.tmp")
            partial.write_bytes(data)
            partial.rename(target)
    written = store.upsert_together({"prompts": tables.prompts, "images": tables.images,
                                     "preference_ranks": tables.ranks})
    return {**tables.report, "new_rows": written}


# --- measuring rewards against them --------------------------------------------------------------
def preference_sets(store: Store) -> list[str]:
    return [r[0] for r in store.connect().execute(
        "SELECT DISTINCT set FROM preference_ranks ORDER BY 1").fetchall()]


def _chosen_sets(store: Store, sets: list[str] | None) -> list[str]:
    """The chosen preference sets (default: all), each checked to exist."""
    known = preference_sets(store)
    if not known:
        raise UserError(f"the store at {store.root} has no preference sets: run `tia2 ingest-preferences` first")
    unknown = sorted(set(sets or []) - set(known))
    if unknown:
        raise UserError(f"unknown preference set(s) {', '.join(unknown)} (known: {', '.join(known)})")
    return list(sets or known)


def default_annotator(store: Store, sets: list[str] | None) -> str:
    """Whose rankings to use when nobody says: CONSENSUS for sets ingested with a combined ranking
    (a file's), MEAN_RANKS for sets of per-annotator rankings only (an annotation batch's)."""
    chosen = _chosen_sets(store, sets)
    with_consensus = {s for (s,) in store.connect("preference_ranks").execute(
        "SELECT DISTINCT set FROM preference_ranks WHERE annotator = ? AND set IN (SELECT unnest(?))",
        [CONSENSUS, chosen]).fetchall()}
    if with_consensus and len(with_consensus) < len(set(chosen)):
        raise UserError(f"set(s) {', '.join(sorted(with_consensus))} have a combined ranking and "
                        f"{', '.join(sorted(set(chosen) - with_consensus))} only per-annotator ones: "
                        f"say whose rankings to use (--annotator {CONSENSUS}, {MEAN_RANKS} or a name), "
                        f"or measure them apart")
    return CONSENSUS if with_consensus else MEAN_RANKS


def preference_frame(store: Store, sets: list[str] | None, annotator: str = CONSENSUS) -> pd.DataFrame:
    """One row per (item, image) of the chosen sets, grouped by item, images in file order: the
    annotator's ranks, or with MEAN_RANKS each image's mean over the annotators who ranked its
    item (an annotation batch's answers; a pair's majority where three chose a side)."""
    sets = _chosen_sets(store, sets)
    frame = store.connect().execute(
        """SELECT r.set, r.item, i.prompt_id, p.text AS caption, r.image_id, i.ordinal, r.rank
           FROM (SELECT set, item, image_id, avg(rank) AS rank FROM preference_ranks
                 WHERE CASE WHEN $annotator = $mean THEN annotator <> $consensus ELSE annotator = $annotator END
                 GROUP BY ALL) r
           JOIN images i USING (image_id) JOIN prompts p USING (prompt_id)
           WHERE r.set IN (SELECT unnest($sets))
           ORDER BY r.set, r.item, i.ordinal, r.image_id""",
        {"annotator": annotator, "mean": MEAN_RANKS, "consensus": CONSENSUS, "sets": sets}).df()
    if frame.empty:
        annotators = [r[0] for r in store.connect().execute(
            "SELECT DISTINCT annotator FROM preference_ranks WHERE set IN (SELECT unnest(?)) ORDER BY 1",
            [sets]).fetchall()]
        raise UserError(f"no rankings by annotator {annotator!r} in set(s) {', '.join(sets)} "
                        f"(annotators: {', '.join(annotators)})")
    frame.index.name = "row"
    return frame


@dataclass
class RewardAgreement:
    reward: str
    figures: dict[str, float]                   # every figure, on all items
    intervals: dict[str, tuple[float, float]]   # its bootstrap interval
    tie_calibration: TieCalibration | None      # where people tie some pairs
    per_item: pd.DataFrame
    buckets: tuple[np.ndarray, np.ndarray]      # mean share of the human best / worst per reward position
    samples: dict[str, np.ndarray]              # bootstrap samples, for paired comparisons


@dataclass
class PreferenceResult:
    sets: list[str]
    annotator: str
    items: int
    pairs: int
    rewards: list[RewardAgreement]
    comparisons: pd.DataFrame  # paired bootstrap of accuracy between every two rewards
    resamples: int


def compute_preference_metrics(store: Store, specs: list[Spec], sets: list[str] | None = None,
                               annotator: str | None = None, resamples: int = BOOTSTRAP) -> PreferenceResult:
    """The figures of every spec against people's rankings; `annotator` None: `default_annotator`."""
    from tasks.rewards import RewardEvaluator

    if not specs:
        raise UserError("give at least one --reward")
    if resamples < 1:
        raise UserError(f"--bootstrap must be at least 1 (got {resamples})")
    annotator = annotator or default_annotator(store, sets)
    frame = preference_frame(store, sets, annotator)
    evaluator = RewardEvaluator(store, frame)
    evaluator.check(specs)
    codes, first_rows = np.unique(frame["set"] + "\0" + frame["item"], return_index=True)
    item_index = np.searchsorted(codes, (frame["set"] + "\0" + frame["item"]).to_numpy())
    items = Items.from_item_index(item_index, frame["rank"].to_numpy(float))
    pairs = within_item_pairs(items)
    item_rows = frame.iloc[np.sort(first_rows)][["set", "item", "caption"]].reset_index(drop=True)
    weights = list(bootstrap_weights(items.count, resamples))
    agreements = [_agreement(str(spec), evaluator(spec), items, pairs, item_rows, weights, annotator)
                  for spec in specs]
    return PreferenceResult(sorted(set(frame["set"])), annotator, items.count, int((items.rank[pairs.a] !=
                            items.rank[pairs.b]).sum()), agreements, _comparisons(agreements), resamples)


def _agreement(reward: str, values: np.ndarray, items: Items, pairs, item_rows: pd.DataFrame,
               weights: list[np.ndarray], annotator: str) -> RewardAgreement:
    counts = item_counts(items, values, pairs)
    calibration, extra = None, {}
    if counts.human_ties.sum():  # the tie-calibrated figure, at the ε calibrated on all items
        calibration = tie_calibrated_accuracy(items, values, pairs)
        extra["tie_calibrated"] = (tie_agreements(items, values, calibration.epsilon, pairs), counts.all_pairs)
    point = figures(counts, extra=extra)
    chunks = [figures(counts, w, extra) for w in weights]
    samples = {name: np.concatenate([chunk[name] for chunk in chunks]) for name in point}
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(counts.pairs > 0, counts.correct / np.where(counts.pairs > 0, counts.pairs, 1), np.nan)
        ranking = 1 - counts.opposite / counts.all_pairs
    per_item = item_rows.rename(columns={"caption": "prompt"}).assign(
        reward=reward, annotator=annotator, images=items.sizes, pairs=counts.pairs.astype(int),
        correct=counts.correct.astype(int), model_ties=counts.model_ties.astype(int),
        human_ties=counts.human_ties.astype(int), accuracy=accuracy, ranking_accuracy=ranking,
        **{f"recall_at_{k}": counts.recall[k] for k in TOP_K}, **{f"filter_at_{k}": counts.filter[k] for k in TOP_K})
    usable = ~np.isnan(counts.recall[1])  # the items with one human-best and one human-worst image
    buckets = tuple(b[usable].mean(axis=0) if usable.any() else np.zeros(b.shape[1])
                    for b in (counts.best_bucket, counts.worst_bucket))
    return RewardAgreement(reward, point, {name: interval(s) for name, s in samples.items()}, calibration,
                           per_item, buckets, samples)


def _comparisons(agreements: list[RewardAgreement]) -> pd.DataFrame:
    """Paired bootstrap (the same resampled items) of the accuracy difference of every two rewards."""
    rows = []
    for first, second in itertools.combinations(agreements, 2):
        diff = first.samples["accuracy"] - second.samples["accuracy"]
        diff = diff[~np.isnan(diff)]
        low, high = interval(diff)
        p = min(1.0, 2 * min(np.mean(diff <= 0), np.mean(diff >= 0))) if len(diff) else np.nan
        rows.append(dict(reward_a=first.reward, reward_b=second.reward,
                         difference=first.figures["accuracy"] - second.figures["accuracy"],
                         low=low, high=high, p_value=p))
    return pd.DataFrame(rows, columns=["reward_a", "reward_b", "difference", "low", "high", "p_value"])


CSV_COLUMNS = ["set", "item", "prompt", "reward", "pairs", "correct", "model_ties", "accuracy", "human_ties",
               "images", "ranking_accuracy", *[f"recall_at_{k}" for k in TOP_K], *[f"filter_at_{k}" for k in TOP_K]]
SUMMARY_FIGURES = ["accuracy", "item_accuracy", "tie_half", "tie_calibrated", "ranking_accuracy", "pickapic",
                   *[f"recall@{k}" for k in TOP_K], *[f"filter@{k}" for k in TOP_K]]


def summary_frame(result: PreferenceResult) -> pd.DataFrame:
    """One row per reward: every figure with its interval."""
    rows = []
    for agreement in result.rewards:
        row = {"reward": agreement.reward}
        for name in SUMMARY_FIGURES:
            if name in agreement.figures:
                row[name] = agreement.figures[name]
                row[f"{name}_low"], row[f"{name}_high"] = agreement.intervals[name]
        if agreement.tie_calibration is not None:
            row["tie_epsilon"] = agreement.tie_calibration.epsilon
        rows.append(row)
    return pd.DataFrame(rows)


def format_table3(result: PreferenceResult) -> str:
    """ImageReward's Table 3 layout (percent), each figure with its 95 % bootstrap interval below."""
    def cell(agreement, name):
        value = agreement.figures.get(name, np.nan)
        return "-" if np.isnan(value) else f"{100 * value:.2f}"

    def span(agreement, name):
        low, high = agreement.intervals.get(name, (np.nan, np.nan))
        return "" if np.isnan(low) else f"{100 * low:.1f}-{100 * high:.1f}"

    names = ["accuracy", *[f"recall@{k}" for k in TOP_K], *[f"filter@{k}" for k in TOP_K]]
    width = max(len("Model"), *(len(a.reward) for a in result.rewards))
    head = f"{'':<{width}}  {'Preference':>11}  {'Recall':^32}  {'Filter':^32}"
    sub = f"{'Model':<{width}}  {'Acc.':>11}  " + "  ".join(f"{'@' + str(k):>10}" for k in TOP_K) + "  " + \
        "  ".join(f"{'@' + str(k):>10}" for k in TOP_K)
    lines = [head, sub]
    for agreement in result.rewards:
        lines.append(f"{agreement.reward:<{width}}  " + "  ".join(
            f"{cell(agreement, n):>{11 if i == 0 else 10}}" for i, n in enumerate(names)))
        lines.append(f"{'':<{width}}  " + "  ".join(
            f"{span(agreement, n):>{11 if i == 0 else 10}}" for i, n in enumerate(names)))
    lines.append(f"{result.items} items, {result.pairs} pairs people rank differently (set(s) "
                 f"{', '.join(result.sets)}, annotator {result.annotator}); below each figure its 95 % "
                 f"bootstrap interval over items ({result.resamples} resamples); Recall/Filter over items "
                 f"with one human-best and one human-worst image")
    return "\n".join(lines)


def format_details(result: PreferenceResult) -> str:
    """The other figures, and the paired comparisons."""
    lines = []
    for agreement in result.rewards:
        extra = [f"mean over items {100 * agreement.figures['item_accuracy']:.2f}",
                 f"ties half {100 * agreement.figures['tie_half']:.2f}",
                 f"HPDv2 ranking {100 * agreement.figures['ranking_accuracy']:.2f}",
                 f"Pick-a-Pic {100 * agreement.figures['pickapic']:.2f}"]
        if agreement.tie_calibration is not None:
            extra.append(f"tie-calibrated {100 * agreement.tie_calibration.accuracy:.2f} "
                         f"(epsilon {agreement.tie_calibration.epsilon:.4g})")
        lines.append(f"{agreement.reward}: " + ", ".join(extra))
    for row in result.comparisons.itertuples():
        lines.append(f"{row.reward_a} - {row.reward_b}: accuracy {100 * row.difference:+.2f} points "
                     f"(95 % {100 * row.low:+.2f} to {100 * row.high:+.2f}, paired bootstrap p = {row.p_value:.3g})")
    return "\n".join(lines)


def buckets_figure(result: PreferenceResult):
    """ImageReward's Figure 16: where the human-best and -worst images land in each reward's order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    width = 0.8 / max(len(result.rewards), 1)
    panels = (("human-best image", "position by the reward, 1 = its best"),
              ("human-worst image", "position by the reward from the bottom, 1 = its worst"))
    for panel, (ax, (title, xlabel)) in enumerate(zip(axes, panels)):
        for n, agreement in enumerate(result.rewards):
            shares = agreement.buckets[panel]
            ax.bar(np.arange(1, len(shares) + 1) + (n - (len(result.rewards) - 1) / 2) * width, 100 * shares,
                   width=width, label=agreement.reward)
        ax.set(title=f"Where the {title} lands", xlabel=xlabel, ylabel="share of items (%)" if panel == 0 else None)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def record_preference_metrics(store: Store, specs: list[Spec], sets: list[str] | None = None,
                              annotator: str | None = None, resamples: int = BOOTSTRAP, out_csv: str | None = None,
                              parent_run_id: str | None = None) -> PreferenceResult:
    """Compute, store (`preference_metrics`), write the CSV and log params, metrics, the CSV and
    the plot to MLflow."""
    import mlflow

    from tasks.metrics import check_output_file, write_text_atomic
    from tia2.tracking import log_figure, log_text_files, metric_key, stage_run

    if out_csv:
        check_output_file(out_csv)
    result = compute_preference_metrics(store, specs, sets, annotator, resamples)
    per_item = pd.concat([a.per_item for a in result.rewards], ignore_index=True)
    csv_text = per_item[CSV_COLUMNS].to_csv(index=False, float_format="%.10g")
    summary = summary_frame(result)
    params = {"rewards": [a.reward for a in result.rewards], "sets": result.sets, "annotator": result.annotator,
              "items": result.items, "pairs": result.pairs, "bootstrap": resamples, "store": str(store.root)}
    with stage_run("preference-metrics", params, parent_run_id) as run:
        store.upsert("preference_metrics", pa.Table.from_pandas(per_item.assign(run_id=run.info.run_id),
                                                                 preserve_index=False))
        mlflow.log_metrics({metric_key(row["reward"], name.replace("@", "_at_")): float(row[name])
                            for row in summary.to_dict("records") for name in summary.columns
                            if name != "reward" and np.isfinite(row[name])})
        log_text_files({"per_item.csv": csv_text, "summary.csv": summary.to_csv(index=False),
                        "comparisons.csv": result.comparisons.to_csv(index=False),
                        "table3.txt": format_table3(result) + "\n" + format_details(result) + "\n"})
        log_figure(buckets_figure(result), "buckets.png")
    if out_csv:
        write_text_atomic(out_csv, csv_text)
    return result
