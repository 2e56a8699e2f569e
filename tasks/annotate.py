"""Annotation: annotators and their links, batches of items, queues, and answers written to the
store (tia2/annotation.py holds the rules; app/annotation_server.py serves them to people).

An answer is written with every row it means (labels, image_ratings or preference_ranks) and a
log row in one all-or-nothing store change, keyed on (batch, item, annotator): the same answer
again changes nothing, a changed one replaces the old and the log keeps both. `AnswerWriter`
commits the answers of concurrent requests together (group commit), so 20 annotators at once
cost one file rewrite per table per round, not one per answer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import queue
import re
import secrets
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa

from tia2.annotation import (
    FIRST_ANNOTATOR_ID, TASKS, AnswerError, Item, assign, batch_order, canonical_json, check_images_per_item,
    default_images_per_item, derived_keys, derived_rows, make_items, parse_answer, shown_order,
)
from tia2.errors import UserError
from tia2.store import TABLES, Store

ROLES = ("annotator", "admin")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
BATCH_TABLES = ("annotation_batches", "annotation_items", "annotation_assignments")


@dataclass(frozen=True)
class Annotator:
    annotator_id: int
    name: str
    role: str


@dataclass(frozen=True)
class Batch:
    batch: str
    task: str
    set: str
    per_item: int
    seed: int
    settings: dict
    items: int
    new_items: int = 0


def _now() -> datetime:
    return datetime.now(timezone.utc)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _rows(table: str, rows: list[dict]) -> pa.Table:
    schema = TABLES[table].schema
    return pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()


def _keys(table: str, rows: list[dict]) -> pa.Table:
    key_schema = pa.schema([TABLES[table].schema.field(k) for k in TABLES[table].key])
    return pa.Table.from_pylist(rows, schema=key_schema)


def _frame(store: Store, table: str) -> pd.DataFrame:
    """A small table as a frame, read again only when its file changed (the app asks per request).
    Callers must not modify it."""
    return _read_frame(store, table, store.fingerprint(table))


@functools.lru_cache(maxsize=64)
def _read_frame(store: Store, table: str, fingerprint: str) -> pd.DataFrame:
    return store.read(table).to_pandas()


# --- annotators ---------------------------------------------------------------------------------
def annotators(store: Store) -> list[Annotator]:
    return [Annotator(int(r.annotator_id), r.name, r.role) for r in _frame(store, "annotators").itertuples()]


def add_annotator(store: Store, name: str, role: str = "annotator", new_token: bool = False) -> tuple[Annotator, str]:
    """Register an annotator (or an admin) and return them with the secret token of their link;
    only its hash is stored. `new_token` issues a new link to an existing one (the old stops)."""
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)} (got {role!r})")
    if not NAME_PATTERN.fullmatch(name or ""):
        raise UserError(f"annotator name {name!r}: 1-64 letters, digits and . _ @ + - (starting with a letter or digit)")
    store.check_writable()
    known = {a.name: a for a in annotators(store)}
    if name in known and not new_token:
        raise UserError(f"annotator {name!r} exists; `--new-token` gives them a new link (the old one stops working)")
    if name in known and known[name].role != role:
        raise UserError(f"{name!r} is an {known[name].role}, not an {role}")
    token = secrets.token_urlsafe(24)
    ids = [a.annotator_id for a in known.values()]
    annotator = known.get(name) or Annotator(max(ids, default=FIRST_ANNOTATOR_ID - 1) + 1, name, role)
    store.upsert("annotators", _rows("annotators", [{
        "annotator_id": annotator.annotator_id, "name": name, "role": role, "token_sha256": token_hash(token),
        "created_at": _now()}]))
    if role == "annotator" and name not in known:
        assign_pending(store)
    return annotator, token


def authenticate(store: Store, token: str | None) -> Annotator | None:
    if not token:
        return None
    frame = _frame(store, "annotators")
    match = frame[frame["token_sha256"] == token_hash(token)]
    if match.empty:
        return None
    row = match.iloc[0]
    return Annotator(int(row.annotator_id), row["name"], row["role"])


# --- batches ------------------------------------------------------------------------------------
def _batch_settings(task: str, images_per_item: int, aspects: bool, source: str) -> dict:
    return {"images_per_item": images_per_item, "aspects": bool(aspects), "source": source}


def _set_images(store: Store, set_name: str) -> list[tuple[str, str]]:
    """(image_id, prompt_id) of a set's images that have a file, in prompt and ordinal order."""
    with store.connect("images") as con:
        rows = con.execute("SELECT image_id, prompt_id, path IS NOT NULL AS has_file FROM images WHERE set = ? "
                           "ORDER BY prompt_id, ordinal, image_id", [set_name]).fetchall()
    if not rows:
        raise UserError(f"set {set_name!r} has no images (see `tia2 sql \"SELECT set, count(*) FROM images GROUP BY set\"`)")
    with_file = [(image, prompt) for image, prompt, has_file in rows if has_file]
    if not with_file:
        raise UserError(f"none of the {len(rows)} images of set {set_name!r} has a file to show "
                        f"(generate them, or register them with `tia2 import-images`)")
    return with_file


def create_batch(store: Store, task: str, set_name: str, *, per_item: int = 3, seed: int = 0,
                 images_per_item: int | None = None, aspects: bool = False, name: str | None = None,
                 items: list[Item] | None = None, source: str = "cli") -> Batch:
    """Create a batch of `task` items over the images of `set_name` (or the `items` given), or add
    the images not yet in it to the batch of that name with the same settings, and assign its
    items to the current annotators. Idempotent: the same call again changes nothing."""
    if task not in TASKS:
        raise UserError(f"task must be one of {', '.join(TASKS)} (got {task!r})")
    if per_item < 1:
        raise UserError(f"each item needs at least 1 annotator (got {per_item})")
    if aspects and task != "rating":
        raise UserError("the 1-7 aspect ratings belong to the rating task")
    images_per_item = images_per_item or default_images_per_item(task)
    check_images_per_item(task, images_per_item)
    name = name or f"{set_name}-{task}"
    if not NAME_PATTERN.fullmatch(name):
        raise UserError(f"batch name {name!r}: 1-64 letters, digits and . _ @ + -")
    store.check_writable()
    settings = _batch_settings(task, images_per_item, aspects, source)
    batches = _frame(store, "annotation_batches")
    stored = batches[batches["batch"] == name]
    if not stored.empty:
        row = stored.iloc[0]
        old = (row["task"], row["set"], int(row["per_item"]), int(row["seed"]), json.loads(row["settings"]))
        if old != (task, set_name, per_item, seed, settings):
            raise UserError(f"batch {name!r} exists with other settings (task {old[0]}, set {old[1]}, {old[2]} per item, "
                            f"seed {old[3]}, {old[4]}): give another --name")
    given = items is not None
    if not given:
        items = make_items(task, _set_images(store, set_name), images_per_item)
    if not items:
        raise UserError(f"set {set_name!r} has no prompt with enough images for a {task} item "
                        f"(at least {images_per_item if task != 'best-worst' else 3})")
    stored_items = _frame(store, "annotation_items")
    stored_items = stored_items[stored_items["batch"] == name]
    # A set's images already in the batch are not grouped again; items given (the pairs of an
    # evaluation, say) are new unless stored.
    taken = set() if given else {i for ids in stored_items["image_ids"] for i in ids}
    new = [it for it in batch_order(items, seed, name) if it.item not in set(stored_items["item"])
           and not taken & set(it.image_ids)]
    start = len(stored_items)
    tables = {"annotation_items": _rows("annotation_items", [
        {"batch": name, "item": it.item, "position": start + n, "prompt_id": it.prompt_id, "image_ids": list(it.image_ids)}
        for n, it in enumerate(new)])}
    if stored.empty:
        tables["annotation_batches"] = _rows("annotation_batches", [{
            "batch": name, "task": task, "set": set_name, "per_item": per_item, "seed": seed,
            "settings": canonical_json(settings), "created_at": _now()}])
    if new or stored.empty:
        store.upsert_together(tables)
        assign_pending(store)
    return Batch(name, task, set_name, per_item, seed, settings, start + len(new), len(new))


def assign_pending(store: Store) -> int:
    """Give every item short of its batch's annotators to the least-loaded current annotators
    (tia2.annotation.assign); returns how many assignments were added."""
    people = sorted(a.annotator_id for a in annotators(store) if a.role == "annotator")
    if not people:
        return 0
    items = _frame(store, "annotation_items").sort_values(["batch", "position"])
    assigned = _frame(store, "annotation_assignments")
    rows = []
    for batch in _frame(store, "annotation_batches").itertuples():
        these = items[items["batch"] == batch.batch]
        held = assigned[assigned["batch"] == batch.batch]
        holders = held.groupby("item")["annotator_id"].agg(set).to_dict()
        positions = dict(zip(these["item"], these["position"]))
        images = dict(zip(these["item"], these["image_ids"]))
        for item, annotator_id in assign(list(these["item"]), holders, people, int(batch.per_item), int(batch.seed),
                                         batch.batch):
            rows.append({"batch": batch.batch, "item": item, "annotator_id": annotator_id,
                         "queue_position": int(positions[item]),
                         "shown": shown_order(int(batch.seed), batch.batch, item, annotator_id, tuple(images[item]))})
    if rows:
        store.upsert("annotation_assignments", _rows("annotation_assignments", rows))
    return len(rows)


def batch_info(store: Store, batch: str) -> dict:
    frame = _frame(store, "annotation_batches")
    row = frame[frame["batch"] == batch]
    if row.empty:
        known = ", ".join(frame["batch"]) or "none yet: create one with `tia2 annotate create-batch`"
        raise UserError(f"no annotation batch {batch!r} (batches: {known})")
    info = row.iloc[0].to_dict()
    info["settings"] = json.loads(info["settings"])
    return info


# --- queues ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ItemView:
    batch: str
    item: str
    task: str
    prompt: str
    image_ids: list[str]  # in the order shown
    settings: dict
    answer: dict | None   # the annotator's stored answer, if any


def annotator_batches(store: Store, annotator_id: int) -> list[dict]:
    """Each batch with items for this annotator: batch, task, set, done, total (from the cached
    tables: the app asks at every answer)."""
    mine = _frame(store, "annotation_assignments")
    mine = mine[mine["annotator_id"] == annotator_id]
    answers = _frame(store, "annotations")
    answers = answers[answers["annotator_id"] == annotator_id]
    done = answers.groupby("batch").size()
    total = mine.groupby("batch").size()
    batches = _frame(store, "annotation_batches").set_index("batch")
    return [{"batch": b, "task": batches.at[b, "task"], "set": batches.at[b, "set"], "done": int(done.get(b, 0)),
             "total": int(n)} for b, n in sorted(total.items())]


def may_see_image(store: Store, annotator_id: int, image_id: str) -> bool:
    """Whether the image is shown in one of the annotator's items."""
    return image_id in _visible_images(store, annotator_id, store.fingerprint("annotation_assignments"))


@functools.lru_cache(maxsize=256)
def _visible_images(store: Store, annotator_id: int, fingerprint: str) -> frozenset[str]:
    mine = _frame(store, "annotation_assignments")
    return frozenset(i for shown in mine[mine["annotator_id"] == annotator_id]["shown"] for i in shown)


def next_items(store: Store, batch: str, annotator_id: int, count: int = 2) -> list[ItemView]:
    """The annotator's next unanswered items of the batch, in queue order (the current one, then
    the ones to preload); [] when all are answered."""
    return _items(store, batch, annotator_id, True, count)


def answered_item(store: Store, batch: str, annotator_id: int, item: str) -> ItemView | None:
    found = _items(store, batch, annotator_id, False, 1, item)
    return found[0] if found else None


def _items(store: Store, batch: str, annotator_id: int, unanswered: bool, count: int,
           item: str | None = None) -> list[ItemView]:
    info = batch_info(store, batch)
    mine = _frame(store, "annotation_assignments")
    mine = mine[(mine["batch"] == batch) & (mine["annotator_id"] == annotator_id)]
    if item is not None:
        mine = mine[mine["item"] == item]
    answers = _frame(store, "annotations")
    answers = answers[(answers["batch"] == batch) & (answers["annotator_id"] == annotator_id)]
    answer_of = dict(zip(answers["item"], answers["answer"]))
    if unanswered:
        mine = mine[~mine["item"].isin(list(answer_of))]
    mine = mine.sort_values(["queue_position", "item"]).head(count)
    items = _frame(store, "annotation_items")
    items = items[items["batch"] == batch].set_index("item")
    prompts = _frame(store, "prompts").set_index("prompt_id")["text"]
    return [ItemView(batch, row.item, info["task"], str(prompts.get(items.at[row.item, "prompt_id"], "")),
                     list(row.shown), info["settings"], json.loads(answer_of[row.item]) if row.item in answer_of else None)
            for row in mine.itertuples()]


def progress(store: Store) -> pd.DataFrame:
    """Answers per batch and annotator: batch, set, task, annotator, done, total."""
    with store.connect("annotation_assignments", "annotation_batches", "annotators", "annotations") as con:
        return con.execute("""
            SELECT b.batch, b.set, b.task, p.name AS annotator, count(n.item)::INTEGER AS done,
                   count(*)::INTEGER AS total
            FROM annotation_assignments a JOIN annotation_batches b USING (batch)
            JOIN annotators p USING (annotator_id)
            LEFT JOIN annotations n ON n.batch = a.batch AND n.item = a.item AND n.annotator_id = a.annotator_id
            GROUP BY ALL ORDER BY b.batch, p.name""").df()


def image_file(store: Store, image_id: str) -> Path:
    """The file of a registered image (only the images table names files: a URL never does)."""
    path = _image_paths(store, store.fingerprint("images")).get(image_id)
    if path is None or not Path(path).is_file():
        raise UserError(f"no image file for {image_id!r}")
    return Path(path)


@functools.lru_cache(maxsize=4)
def _image_paths(store: Store, fingerprint: str) -> dict[str, str]:
    images = _frame(store, "images")
    images = images[images["path"].notna()]
    return dict(zip(images["image_id"], images["path"]))


# --- writing answers -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Saved:
    item: str
    changed: bool  # False when the same answer was stored already


@dataclass(frozen=True)
class _Change:
    annotator: Annotator
    batch: str
    item: str | None  # None: undo the annotator's last answer of the batch
    answer: dict | None
    source: str
    at: datetime
    shown: list[str] | None = None  # the order another tool showed the images in (imports)


def _item_images(store: Store, batch: str, item: str) -> list[str]:
    items = _frame(store, "annotation_items")
    found = items[(items["batch"] == batch) & (items["item"] == item)]["image_ids"]
    if found.empty:
        raise UserError(f"batch {batch!r} has no item {item!r}")
    return list(found.iloc[0])


def _assignment(store: Store, batch: str, item: str, annotator_id: int) -> dict:
    assigned = _frame(store, "annotation_assignments")
    row = assigned[(assigned["batch"] == batch) & (assigned["item"] == item) & (assigned["annotator_id"] == annotator_id)]
    if row.empty:
        raise PermissionError(f"item {item!r} of batch {batch!r} is not in this annotator's queue")
    return {"shown": list(row["shown"].iloc[0]), "image_ids": _item_images(store, batch, item)}


def prepare_answer(store: Store, annotator: Annotator, batch: str, item: str, payload) -> dict:
    """The canonical answer of `payload` to an item of the annotator's queue: AnswerError for a
    malformed answer, PermissionError for an item not theirs, UserError for no such batch."""
    info = batch_info(store, batch)
    assignment = _assignment(store, batch, item, annotator.annotator_id)
    return parse_answer(info["task"], info["settings"], assignment["shown"], payload)


def apply_changes(store: Store, changes: list[_Change], assignments: list[dict] = ()) -> list[Saved | None]:
    """Apply answers and undos in order as one store change (all or nothing), with `assignments`
    (rows of annotation_assignments: the items of imported answers); returns per change what it did
    (None for an undo with nothing to undo)."""
    infos = {b: batch_info(store, b) for b in {c.batch for c in changes}}
    stored = _frame(store, "annotations")
    stored = stored[stored["batch"].isin(list(infos))]
    current: dict[tuple, dict | None] = {(r["batch"], r["item"], int(r["annotator_id"])): r
                                         for r in stored.to_dict("records")}
    original = dict(current)
    touched: dict[tuple, Annotator] = {}
    logs, results = [], []
    for change in changes:
        aid = change.annotator.annotator_id
        if change.item is None:
            mine = [(row["answered_at"], key) for key, row in current.items()
                    if row is not None and key[0] == change.batch and key[2] == aid]
            if not mine:
                results.append(None)
                continue
            key = max(mine)[1]
            logs.append(_log(key, "undo", None, current[key]["answer"], change.at))
            current[key] = None
            touched[key] = change.annotator
            results.append(Saved(key[1], True))
            continue
        key = (change.batch, change.item, aid)
        answer = canonical_json(change.answer)
        before = current.get(key)
        if before is not None and before["answer"] == answer:
            results.append(Saved(change.item, False))
            continue
        assignment = _assignment(store, change.batch, change.item, aid) if change.shown is None else \
            {"shown": change.shown, "image_ids": _item_images(store, change.batch, change.item)}
        info = infos[change.batch]
        current[key] = {"batch": change.batch, "item": change.item, "annotator_id": aid, "task": info["task"],
                        "shown": assignment["shown"], "answer": answer, "settings": canonical_json(info["settings"]),
                        "source": change.source, "answered_at": change.at, "image_ids": assignment["image_ids"]}
        logs.append(_log(key, "answer" if before is None else "change", answer,
                         None if before is None else before["answer"], change.at))
        touched[key] = change.annotator
        results.append(Saved(change.item, True))
    if logs:
        upserts, removals = _store_change(store, infos, original, current, touched, logs)
        if assignments:
            upserts["annotation_assignments"] = _rows("annotation_assignments", list(assignments))
        store.upsert_together(upserts, remove=removals)
    return results


def _log(key: tuple, action: str, answer: str | None, previous: str | None, at: datetime) -> dict:
    return {"change_id": uuid.uuid4().hex, "batch": key[0], "item": key[1], "annotator_id": key[2], "action": action,
            "answer": answer, "previous": previous, "at": at}


def _store_change(store: Store, infos: dict, original: dict, current: dict, touched: dict, logs: list[dict]):
    """The upserts and removals of changed answers: each touched key's old derived rows go, its
    new answer (if any) and the rows it means come, with the log rows."""
    items = _frame(store, "annotation_items")
    images = {(r.batch, r.item): list(r.image_ids) for r in items.itertuples()}
    upserts = {"annotations": [], "annotation_log": logs}
    removals = {"annotations": []}
    for key, annotator in touched.items():
        batch, item, aid = key
        task = infos[batch]["task"]
        for table, keys in derived_keys(task, batch, item, images[(batch, item)], aid, annotator.name).items():
            removals.setdefault(table, []).extend(keys)
            upserts.setdefault(table, [])
        if original.get(key) is not None:
            removals["annotations"].append({"batch": batch, "item": item, "annotator_id": aid})
        row = current[key]
        if row is not None:
            upserts["annotations"].append({k: v for k, v in row.items() if k != "image_ids"})
            for table, rows in derived_rows(task, batch, item, images[(batch, item)], aid, annotator.name,
                                            json.loads(row["answer"])).items():
                upserts[table].extend(rows)
    return ({table: _rows(table, rows) for table, rows in upserts.items()},
            {table: _keys(table, keys) for table, keys in removals.items() if keys})


class AnswerWriter:
    """Writes answers from many threads: each `submit` or `undo` waits until its change is on
    disk; changes that arrive while a commit runs are committed together in the next one."""

    def __init__(self, store: Store):
        self.store = store
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="tia2-answer-writer", daemon=True)
        self._thread.start()

    def submit(self, annotator: Annotator, batch: str, item: str, payload, source: str = "app") -> Saved:
        answer = prepare_answer(self.store, annotator, batch, item, payload)
        return self._wait(_Change(annotator, batch, item, answer, source, _now()))

    def undo(self, annotator: Annotator, batch: str) -> str | None:
        batch_info(self.store, batch)
        saved = self._wait(_Change(annotator, batch, None, None, "app", _now()))
        return saved.item if saved else None

    def _wait(self, change: _Change):
        done: Future = Future()
        self._queue.put((change, done))
        return done.result()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                group.append(more)
            try:
                results = apply_changes(self.store, [change for change, _ in group])
            except BaseException as exc:  # the whole group failed and wrote nothing: each waiter hears why
                for _, done in group:
                    done.set_exception(exc)
                continue
            for (_, done), result in zip(group, results):
                done.set_result(result)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


# --- Label Studio ---------------------------------------------------------------------------------
def export_label_studio(store: Store, batch: str, image_url) -> tuple[list[dict], str]:
    """A batch's items as Label Studio tasks (images in the item's stored order, which an import
    takes as the order shown) and the project's labeling config; image_url(image_id, path) -> URL."""
    from tia2.label_studio import export_tasks, labeling_config

    info = batch_info(store, batch)
    items = _frame(store, "annotation_items")
    items = items[items["batch"] == batch].sort_values("position")
    prompts = _frame(store, "prompts").set_index("prompt_id")["text"]
    paths = dict(zip(*(_frame(store, "images")[c] for c in ("image_id", "path"))))
    rows = [{"item": r.item, "prompt": str(prompts.get(r.prompt_id, "")), "image_ids": list(r.image_ids)}
            for r in items.itertuples()]
    tasks = export_tasks(batch, info["task"], rows, lambda image_id: image_url(image_id, paths.get(image_id)))
    return tasks, labeling_config(info["task"], info["settings"])


def import_label_studio(store: Store, path: str | Path, create_annotators: bool = False) -> dict:
    """Read a Label Studio JSON export of tasks made by `export_label_studio` into the store, as
    answers (source label-studio) of the annotators named by Label Studio; every answer is checked
    before anything is written, and all are written as one change."""
    from tia2.label_studio import parse_export

    path = Path(path)
    try:
        exported = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read it as JSON: {exc}") from exc
    if not isinstance(exported, list) or not exported:
        raise UserError(f"{path}: a Label Studio export is a non-empty JSON list of tasks")
    by_batch: dict[str, list] = {}
    for n, ls_task in enumerate(exported):
        batch = ls_task.get("data", {}).get("tia2_batch") if isinstance(ls_task, dict) and \
            isinstance(ls_task.get("data"), dict) else None
        if not isinstance(batch, str):
            raise UserError(f"{path}: task {n} names no tia2_batch in its data (export tasks with `tia2 annotate export`)")
        by_batch.setdefault(batch, []).append(ls_task)
    answers = [a for batch, tasks in sorted(by_batch.items()) for a in parse_export(tasks, batch_info(store, batch)["task"])]
    if not answers:
        raise UserError(f"{path}: no answers in it (cancelled or empty annotations are not imported)")
    known = {a.name: a for a in annotators(store)}
    missing = sorted({a.annotator for a in answers} - set(known))
    if missing and not create_annotators:
        raise UserError(f"{path}: annotators not registered here: {', '.join(missing)} "
                        f"(add them with `tia2 annotate add-annotator`, or give --create-annotators)")
    for name in missing:
        if not NAME_PATTERN.fullmatch(name):
            raise UserError(f"{path}: Label Studio's annotator {name!r} is not a valid annotator name here")
    store.check_writable()
    for name in missing:
        known[name] = add_annotator(store, name)[0]
    assigned = _frame(store, "annotation_assignments")
    held = set(zip(assigned["batch"], assigned["item"], assigned["annotator_id"]))
    changes, new_assignments = [], []
    for a in answers:
        annotator = known[a.annotator]
        info = batch_info(store, a.batch)
        shown = _item_images(store, a.batch, a.item)
        try:
            answer = parse_answer(info["task"], info["settings"], shown, a.answer)
        except AnswerError as exc:
            raise UserError(f"{path}: {a.annotator}'s answer to item {a.item} of {a.batch}: {exc}") from exc
        if (a.batch, a.item, annotator.annotator_id) not in held:
            held.add((a.batch, a.item, annotator.annotator_id))
            position = int(_frame(store, "annotation_items").set_index(["batch", "item"]).at[(a.batch, a.item), "position"])
            new_assignments.append({"batch": a.batch, "item": a.item, "annotator_id": annotator.annotator_id,
                                    "queue_position": position, "shown": shown})
        changes.append(_Change(annotator, a.batch, a.item, answer, "label-studio", a.answered_at, shown))
    results = apply_changes(store, changes, new_assignments)
    return {"answers": len(answers), "changed": sum(r.changed for r in results if r),
            "annotators_added": missing, "batches": sorted({a.batch for a in answers})}
