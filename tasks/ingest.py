"""Stage: ingest the TIA2 benchmark (TextNorm paper §3) into the store.

The release has, per set, `human_annotations/human_labels_<set>.json` (one entry per image:
file name, caption, three labels) and `prompts/prompt_set_<set>.json` (caption -> contrast
prompts). It becomes rows of prompts, contrast_prompts (method `dataset`), images (file names, no
pixels) and labels. Everything is read and checked before anything is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from tia2.errors import UserError
from tia2.store import Store, stable_id

SETS = ("comprehensive", "counting", "composition")
# The data release of the TextNorm paper; a user with internet needs no manual download.
DEFAULT_SOURCE = (
    "https://raw.githubusercontent.com/kykim0/TextNorm/5ed52025b1c4a62f31765165a14dff41d304b4a9"
)
TIA2_GENERATOR = "stable-diffusion-2-1 (TIA2 release)"
VALID_LABELS = {1, 0, -1}


def labels_file(set_name: str) -> str:
    return f"human_annotations/human_labels_{set_name}.json"


def prompts_file(set_name: str) -> str:
    return f"prompts/prompt_set_{set_name}.json"


def _read(source: str, relpath: str) -> bytes:
    if source.startswith(("http://", "https://")):
        url = f"{source.rstrip('/')}/{relpath}"
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            raise UserError(f"{url}: HTTP {exc.code} (missing file {relpath}?)") from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(
                f"cannot download {url} ({reason}); offline, pass the folder of the TIA2 release "
                f"(with human_annotations/ and prompts/) as SOURCE or set TIA2_SOURCE"
            ) from exc
    path = Path(source) / relpath
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise UserError(f"{path}: missing file (a TIA2 source has {relpath})") from exc
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from exc


def _load_json(source: str, relpath: str) -> dict:
    raw = _read(source, relpath)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"line {exc.lineno} column {exc.colno}: {exc.msg}" if hasattr(exc, "lineno") else str(exc)
        raise UserError(f"{relpath}: malformed JSON at {where}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{relpath}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def check_source(source: str, sets: tuple[str, ...] = SETS) -> None:
    """Fail early, in one line, when a source lacks a file or a URL cannot be reached."""
    if source.startswith(("http://", "https://")):
        url = f"{source.rstrip('/')}/{labels_file(sets[0])}"
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=20).close()
        except urllib.error.HTTPError as exc:
            raise UserError(f"{url}: HTTP {exc.code}; is {source} a TIA2 release?") from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise UserError(f"cannot reach {source} ({getattr(exc, 'reason', exc)}); offline, set "
                            f"TIA2_SOURCE to the folder of the TIA2 release (human_annotations/, prompts/)") from exc
        return
    for set_name in sets:
        for relpath in (labels_file(set_name), prompts_file(set_name)):
            if not (Path(source) / relpath).is_file():
                raise UserError(f"{Path(source) / relpath}: missing file; set TIA2_SOURCE (or "
                                f"tia2_source in the config) to the folder of the TIA2 release")


@dataclass
class TIA2Tables:
    prompts: pa.Table
    contrast_prompts: pa.Table
    images: pa.Table
    labels: pa.Table
    report: dict = field(default_factory=dict)


def parse_tia2(source: str, sets: tuple[str, ...] = SETS) -> TIA2Tables:
    """Read and check the release; raises UserError naming the file and entry of a problem."""
    prompts, contrasts, images, labels = [], [], [], []
    report = {"repeated_contrast_prompts_dropped": 0, "caption_in_own_contrast_set_dropped": 0}
    now = datetime.now(timezone.utc)
    for set_name in sets:
        lfile, pfile = labels_file(set_name), prompts_file(set_name)
        annotations = _load_json(source, lfile)
        contrast_sets = _load_json(source, pfile)
        ordinal_in_caption: dict[str, int] = {}
        for key, entry in annotations.items():
            if not isinstance(entry, dict) or not {"image", "caption", "human_labels"} <= entry.keys():
                raise UserError(f"{lfile}: entry {key!r} needs fields image, caption, human_labels")
            caption, votes = entry["caption"], entry["human_labels"]
            if not isinstance(caption, str) or not isinstance(entry["image"], str):
                raise UserError(f"{lfile}: entry {key!r}: image and caption must be strings")
            if not isinstance(votes, list) or not votes:
                raise UserError(f"{lfile}: entry {key!r}: human_labels must be a non-empty list")
            for vote in votes:
                if isinstance(vote, bool) or vote not in VALID_LABELS:
                    raise UserError(
                        f"{lfile}: entry {key!r}: label {vote!r} is not one of 1, 0, -1"
                    )
            if caption not in contrast_sets:
                raise UserError(
                    f"{lfile}: entry {key!r}: caption {caption!r} has no contrast set in {pfile}"
                )
            prompt_id = stable_id(set_name, caption)
            if prompt_id not in ordinal_in_caption:
                ordinal_in_caption[prompt_id] = 0
                prompts.append(dict(prompt_id=prompt_id, text=caption, set=set_name,
                                    category=set_name if set_name != "comprehensive" else None,
                                    subcategory=None, source="tia2"))
                contrasts.extend(_contrast_rows(pfile, caption, prompt_id, contrast_sets[caption],
                                                now, report))
            image_id = stable_id(set_name, entry["image"])
            images.append(dict(image_id=image_id, prompt_id=prompt_id, set=set_name,
                               file=entry["image"], ordinal=ordinal_in_caption[prompt_id],
                               seed=None, generator=TIA2_GENERATOR, lora=None, steps=None,
                               guidance=None, path=None, sha256=None, width=None, height=None))
            ordinal_in_caption[prompt_id] += 1
            labels.extend(dict(image_id=image_id, annotator=i, label=v) for i, v in enumerate(votes))
        report[set_name] = {"captions": len(ordinal_in_caption), "images": sum(ordinal_in_caption.values())}
    return TIA2Tables(
        prompts=pa.Table.from_pylist(prompts),
        contrast_prompts=pa.Table.from_pylist(contrasts),
        images=pa.Table.from_pylist(images),
        labels=pa.Table.from_pylist(labels),
        report=report,
    )


def _contrast_rows(pfile, caption, prompt_id, texts, now, report) -> list[dict]:
    """The caption's contrast set as distinct texts without the caption itself (DESIGN.md)."""
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise UserError(f"{pfile}: entry {caption!r}: expected a list of prompt strings")
    distinct = list(dict.fromkeys(texts))
    report["repeated_contrast_prompts_dropped"] += len(texts) - len(distinct)
    if caption in distinct:
        distinct.remove(caption)
        report["caption_in_own_contrast_set_dropped"] += 1
    if not distinct:
        raise UserError(f"{pfile}: entry {caption!r}: the contrast set is empty")
    return [dict(prompt_id=prompt_id, text=t, method="dataset", generator="tia2", created_at=now)
            for t in distinct]


def ingest_tia2(store: Store, source: str, sets: tuple[str, ...] = SETS) -> dict:
    """Parse the release and write it to the store; re-running with the same files is a no-op."""
    tables = parse_tia2(source, sets)
    written = store.upsert_together({"prompts": tables.prompts, "contrast_prompts": tables.contrast_prompts,
                                     "images": tables.images, "labels": tables.labels},
                                    keep_stored=("contrast_prompts",))
    return {"source": source, "new_rows": written, **tables.report}


# --- image files ---------------------------------------------------------------------------------
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def _image_files(paths) -> list[Path]:
    return [p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()]


def image_facts(path: Path) -> dict:
    """path, sha256, width and height of an image file; ValueError saying why it is not a
    readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror})") from exc
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # all of it: a truncated file fails here, not when it is scored
            width, height = image.size
    except UnidentifiedImageError as exc:
        raise ValueError(f"{path}: not an image file") from exc
    except Exception as exc:  # PIL raises many kinds for damaged files
        raise ValueError(f"{path}: does not decode ({exc})") from exc
    return {"path": str(path.resolve()), "sha256": hashlib.sha256(data).hexdigest(), "width": width, "height": height}


def _all_image_facts(paths: list[Path]) -> list[dict]:
    """The facts of every file, or one UserError naming the files that are not readable images."""
    facts, problems = [], []
    for path in paths:
        try:
            facts.append(image_facts(path))
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise UserError(f"nothing registered: {len(problems)} of {len(paths)} files are not readable images "
                        f"(first: {'; '.join(problems[:3])})")
    return facts


def import_images(store: Store, set_name: str, folder: str | Path) -> dict:
    """Register image files with their sha256, after checking that every one decodes.

    If the set is already in the store (e.g. a TIA2 set), files are matched to its images by file
    name (the TIA2 JPEGs a user downloaded). Otherwise, or when the set was made by an earlier
    import, the folder is laid out by caption (`DIR/<caption>/<image files>`) and becomes (or
    updates) a set of prompts and images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    con = store.connect()
    params = {"set": set_name}
    known = con.sql("SELECT * FROM images WHERE set = $set ORDER BY prompt_id, ordinal", params=params).to_arrow_table()
    imported = con.execute("SELECT count(*) FROM prompts WHERE set = $set AND source = 'import'", params).fetchall()[0][0]
    if known.num_rows and not imported:
        return _register_by_file_name(store, set_name, folder, known.to_pylist())
    return _register_by_caption(store, set_name, folder, known.num_rows)


def _register_by_file_name(store: Store, set_name: str, folder: Path, known: list[dict]) -> dict:
    places: dict[str, list[Path]] = {}
    for path in _image_files(folder.rglob("*")):
        places.setdefault(path.name, []).append(path)
    wanted = {row["file"] for row in known}
    repeated = sorted(name for name in wanted if len(places.get(name, ())) > 1)
    if repeated:
        raise UserError(f"{folder}: {len(repeated)} file names of set {set_name!r} are in several places, so which "
                        f"file is the image is unclear (first: {repeated[0]!r} in "
                        f"{', '.join(str(p.parent) for p in places[repeated[0]])})")
    matched = sorted(name for name in wanted if name in places)
    if not matched:
        raise UserError(f"{folder}: none of its {sum(map(len, places.values()))} image files is an image of set "
                        f"{set_name!r} (matched by file name)")
    facts = dict(zip(matched, _all_image_facts([places[name][0] for name in matched])))
    rows = [dict(row, **facts[row["file"]]) for row in known if row["file"] in facts]
    store.upsert("images", pa.Table.from_pylist(rows))
    return {"set": set_name, "registered": len(matched),
            "new_images": sum(row["path"] is None for row in known if row["file"] in facts),
            "unmatched_files": sum(len(paths) for name, paths in places.items() if name not in wanted),
            "set_images": len(known)}


def _register_by_caption(store: Store, set_name: str, folder: Path, known_images: int) -> dict:
    captions = sorted(d for d in folder.iterdir() if d.is_dir())
    if not captions:
        why = "was made by importing a folder laid out by caption" if known_images else "is not in the store"
        raise UserError(f"{folder}: set {set_name!r} {why} and the folder has no caption subfolders "
                        f"(DIR/<caption>/<images>)")
    prompts, images, files = [], [], []
    for caption_dir in captions:
        caption = caption_dir.name
        prompt_id = stable_id(set_name, caption)
        prompts.append(dict(prompt_id=prompt_id, text=caption, set=set_name, category=None,
                            subcategory=None, source="import"))
        for ordinal, path in enumerate(sorted(_image_files(caption_dir.iterdir()))):
            images.append(dict(image_id=stable_id(set_name, caption, path.name), prompt_id=prompt_id,
                               set=set_name, file=path.name, ordinal=ordinal, seed=None, generator=None,
                               lora=None, steps=None, guidance=None))
            files.append(path)
    if not images:
        raise UserError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in its caption folders")
    for row, facts in zip(images, _all_image_facts(files)):
        row.update(facts)
    added = store.upsert_together({"prompts": pa.Table.from_pylist(prompts),
                                   "images": pa.Table.from_pylist(images)})["images"]
    return {"set": set_name, "registered": len(images), "new_images": added, "unmatched_files": 0,
            "set_images": known_images + added}
