"""Annotation batches to and from Label Studio's JSON, as pure functions, so that a team can label
in Label Studio instead of the annotation app (tasks/annotate.py reads and writes the store).

Out: `labeling_config` is the project's labeling config (XML), `export_tasks` the tasks to import
(Label Studio's import format: a list of {"data": {...}}, each `$name` of the config a key of
"data"). In: `parse_export` reads the project's JSON export (a list of tasks, each with its
"annotations": [{"completed_by", "result": [{"id", "from_name", "to_name", "type", "value",
"origin"}], "was_cancelled", "created_at", "updated_at", ...}]) back to answers in the form a
client sends them (tia2.annotation.parse_answer checks them against the item).

Every task's data keeps "tia2_batch", "tia2_item" and "tia2_image_ids" (the display order used,
for pairwise [A, B]), so an export comes back to its items whatever Label Studio's task ids are;
"text" is the prompt (a Text tag named "prompt").

Tags and result shapes, per task (result `type` is the control tag's name in lower case):
- rating: Image "image" ($image); Choices "label" (good / bad / skip) -> {"choices": ["good"]};
  with aspects, one Rating per aspect (alignment, fidelity, harmlessness; maxRating 7) ->
  {"rating": 5}. TIA2's "skip" is a choice: Label Studio's own Skip button cancels the annotation
  (was_cancelled), which is not an answer and is not imported.
- pairwise: Images "image_a" ($image_a) and "image_b" ($image_b) side by side; Choices "choice"
  (A / B / tie) -> {"choices": ["A"]}. Not Label Studio's Pairwise tag: its result is only
  {"selected": "left" | "right"}, with no tie.
- ranking: List "images" ($images: [{"id": image_id, "title", "html": "<img ...>"}]) with a
  Ranker "rank" holding one Bucket per rank, "rank_1" (best) to "rank_k" (k = images per item) ->
  {"ranker": {"rank_1": [ids], "rank_2": [ids], ..., "_": [ids not placed]}}. Images in one bucket
  tie. A plain Ranker (no buckets) gives only a strict order; per-image Rating or Number needs
  perItem, behind a feature flag. Every image must be placed: a non-empty "_" is an error.
- best-worst: the same List with a Ranker "pick" of two Buckets, "best" and "worst", one image
  each; the rest stay in the list ("_"). Choices over the images would need either a fixed count
  of images or dynamic choices (behind a feature flag); the Ranker works for any count.

A task's annotations: cancelled ones are skipped, and of one annotator's annotations of an item
(the same item imported twice included) the latest (updated_at, else created_at) is kept. The
annotator is completed_by's "email" (or "username") in exports that give the user as a dict, else
"label-studio-<id>". Results of controls this config does not have (a team's own comment box,
say) are ignored.
"""

from __future__ import annotations

import html
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from tia2.annotation import ASPECT_RANGE, ASPECTS, LABEL_VALUES, MAX_IMAGES, PAIRWISE_CHOICES, TASKS
from tia2.errors import UserError

UNPLACED = "_"  # the Ranker's column of the List's items not moved into a bucket
IMAGES_SHOWN = {"rating": 1, "pairwise": 2}
LIST_IMAGE_STYLE = ".htx-ranker-item img { max-width: 320px; max-height: 320px; }"


@dataclass(frozen=True)
class ImportedAnswer:
    batch: str
    item: str
    annotator: str
    answer: dict  # the client form (tia2.annotation.parse_answer's input)
    answered_at: datetime  # timezone-aware, UTC


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise UserError(f"unknown annotation task {task!r} (expected one of {', '.join(TASKS)})")


def _tag(parent: ET.Element, tag: str, **attributes: str) -> ET.Element:
    return ET.SubElement(parent, tag, attributes)


def _choices(parent: ET.Element, name: str, to_name: str, values, hotkeys) -> None:
    choices = _tag(parent, "Choices", name=name, toName=to_name, choice="single-radio",
                   required="true", showInline="true")
    for value, hotkey in zip(values, hotkeys):
        _tag(choices, "Choice", value=value, hotkey=hotkey)


def labeling_config(task: str, settings: dict) -> str:
    """The labeling config (XML) of a Label Studio project for a batch of `task` with `settings`
    ("aspects": bool, "images_per_item": int)."""
    _check_task(task)
    view = ET.Element("View")
    if task in ("ranking", "best-worst"):
        _tag(view, "Style").text = LIST_IMAGE_STYLE
    _tag(view, "Header", value="Prompt")
    _tag(view, "Text", name="prompt", value="$text")
    if task == "rating":
        _tag(view, "Image", name="image", value="$image")
        _tag(view, "Header", value="Does the image match the text?")
        _choices(view, "label", "image", LABEL_VALUES, ("1", "2", "3"))
        if settings.get("aspects"):
            for aspect in ASPECTS:
                _tag(view, "Header", value=f"{aspect.capitalize()} ({ASPECT_RANGE[0]}-{ASPECT_RANGE[1]})")
                _tag(view, "Rating", name=aspect, toName="image", maxRating=str(ASPECT_RANGE[1]))
    elif task == "pairwise":
        sides = _tag(view, "View", style="display: flex; gap: 1em;")
        for side in "ab":
            column = _tag(sides, "View")
            _tag(column, "Header", value=side.upper())
            _tag(column, "Image", name=f"image_{side}", value=f"$image_{side}")
        _tag(view, "Header", value="Which image matches the text better?")
        _choices(view, "choice", "prompt", PAIRWISE_CHOICES, ("a", "b", "t"))
    else:
        _tag(view, "List", name="images", value="$images", title="Images")
        if task == "ranking":
            _tag(view, "Header", value="Rank the images: drag each into a rank; equal ranks tie")
            ranker = _tag(view, "Ranker", name="rank", toName="images")
            for rank in range(1, (settings.get("images_per_item") or MAX_IMAGES) + 1):
                _tag(ranker, "Bucket", name=f"rank_{rank}", title=f"{rank} (best)" if rank == 1 else str(rank))
        else:
            _tag(view, "Header", value="Drag the best image and the worst image into their columns")
            ranker = _tag(view, "Ranker", name="pick", toName="images")
            _tag(ranker, "Bucket", name="best", title="Best")
            _tag(ranker, "Bucket", name="worst", title="Worst")
    ET.indent(view)
    return ET.tostring(view, encoding="unicode")


def export_tasks(batch: str, task: str, items: list[dict], image_url: Callable[[str], str]) -> list[dict]:
    """Label Studio tasks (its import format) for `items` ({"item", "prompt", "image_ids"} with the
    image ids in the display order to use); `image_url(image_id)` is where annotators' browsers
    fetch an image."""
    _check_task(task)
    tasks = []
    for item in items:
        ids = list(item["image_ids"])
        if len(ids) != IMAGES_SHOWN.get(task, len(ids)):
            raise ValueError(f"a {task} item shows {IMAGES_SHOWN[task]} image(s), item {item['item']} has {len(ids)}")
        data = {"text": item["prompt"], "tia2_batch": batch, "tia2_item": item["item"], "tia2_image_ids": ids}
        if task == "rating":
            data["image"] = image_url(ids[0])
        elif task == "pairwise":
            data["image_a"], data["image_b"] = image_url(ids[0]), image_url(ids[1])
        else:
            data["images"] = [{"id": image, "title": f"Image {n}",
                               "html": f'<img src="{html.escape(image_url(image))}" alt="image {n}"/>'}
                              for n, image in enumerate(ids, 1)]
        tasks.append({"data": data})
    return tasks


class _Malformed(Exception):
    """What is wrong with one task of an export (parse_export names the task)."""


def parse_export(tasks, task: str) -> list[ImportedAnswer]:
    """The answers in a Label Studio JSON export of a `task` project made from `export_tasks`:
    the latest non-cancelled annotation per (item, annotator), in the order first met."""
    _check_task(task)
    if not isinstance(tasks, list):
        raise UserError(f"a Label Studio JSON export is a list of tasks (got {type(tasks).__name__})")
    latest: dict[tuple[str, str, str], ImportedAnswer] = {}
    for index, ls_task in enumerate(tasks):
        try:
            answers = _task_answers(ls_task, task)
        except _Malformed as error:
            known = f" (Label Studio id {ls_task['id']})" if isinstance(ls_task, dict) and "id" in ls_task else ""
            raise UserError(f"Label Studio export, task {index}{known}: {error}") from None
        for answer in answers:
            key = (answer.batch, answer.item, answer.annotator)
            if key not in latest or answer.answered_at >= latest[key].answered_at:
                latest[key] = answer
    return list(latest.values())


def _task_answers(ls_task, task: str) -> list[ImportedAnswer]:
    if not isinstance(ls_task, dict):
        raise _Malformed(f"a task is a JSON object (got {type(ls_task).__name__})")
    data = ls_task.get("data")
    if not isinstance(data, dict):
        raise _Malformed('no "data" object')
    for field in ("tia2_batch", "tia2_item"):
        if not isinstance(data.get(field), str):
            raise _Malformed(f"data has no {field} (not a task exported by tia2?)")
    image_ids = data.get("tia2_image_ids")
    if not isinstance(image_ids, list) or not image_ids or not all(isinstance(i, str) for i in image_ids):
        raise _Malformed("data.tia2_image_ids is not a list of image ids")
    annotations = ls_task.get("annotations", [])
    if not isinstance(annotations, list):
        raise _Malformed('"annotations" is not a list')
    answers = []
    for number, annotation in enumerate(annotations):
        if not isinstance(annotation, dict):
            raise _Malformed(f"annotation {number} is not a JSON object")
        if annotation.get("was_cancelled"):
            continue
        try:
            answers.append(ImportedAnswer(
                batch=data["tia2_batch"], item=data["tia2_item"], annotator=_annotator(annotation),
                answer=_answer(annotation.get("result"), task, image_ids),
                answered_at=_answered_at(annotation)))
        except _Malformed as error:
            raise _Malformed(f"annotation {number}: {error}") from None
    return answers


def _annotator(annotation: dict) -> str:
    user = annotation.get("completed_by")
    if isinstance(user, dict):
        for field in ("email", "username"):
            if isinstance(user.get(field), str) and user[field]:
                return user[field]
        user = user.get("id")
    if isinstance(user, bool) or not isinstance(user, int):
        raise _Malformed(f"completed_by is not a user id or a user ({user!r})")
    return f"label-studio-{user}"


def _answered_at(annotation: dict) -> datetime:
    stamp = annotation.get("updated_at") or annotation.get("created_at")
    try:
        moment = datetime.fromisoformat(stamp)
    except (TypeError, ValueError):
        raise _Malformed(f"updated_at / created_at is not an ISO time ({stamp!r})") from None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _values(result, expected: dict[str, str]) -> dict[str, dict]:
    """The `value` of each result whose from_name is in `expected` (from_name -> result type)."""
    if not isinstance(result, list):
        raise _Malformed('"result" is missing or not a list')
    values: dict[str, dict] = {}
    for entry in result:
        if not isinstance(entry, dict):
            raise _Malformed("a result is not a JSON object")
        name = entry.get("from_name")
        if name not in expected:
            continue
        if entry.get("type") != expected[name] or not isinstance(entry.get("value"), dict):
            raise _Malformed(f'result {name} is not a {expected[name]} result (type {entry.get("type")!r})')
        if name in values:
            raise _Malformed(f"two results for {name}")
        values[name] = entry["value"]
    return values


def _choice(values: dict[str, dict], name: str, allowed) -> str:
    if name not in values:
        raise _Malformed(f"no {name} result")
    chosen = values[name].get("choices")
    if not isinstance(chosen, list) or len(chosen) != 1 or not isinstance(chosen[0], str) or chosen[0] not in allowed:
        raise _Malformed(f"{name} must be one of {', '.join(allowed)} (got {chosen!r})")
    return chosen[0]


def _rank(bucket: str) -> int | None:
    """The rank of a ranking bucket ("rank_3" -> 3)."""
    number = bucket.removeprefix("rank_")
    return int(number) if number != bucket and number.isdigit() and int(number) >= 1 else None


def _buckets(values: dict[str, dict], name: str, known: Callable[[str], bool],
             image_ids: list[str]) -> dict[str, list[str]]:
    """A Ranker's buckets (without the unplaced column), each image of the item in at most one."""
    if name not in values:
        raise _Malformed(f"no {name} result")
    columns = values[name].get("ranker")
    if not isinstance(columns, dict):
        raise _Malformed(f'{name} has no "ranker" columns')
    unknown = sorted(bucket for bucket in columns if bucket != UNPLACED and not known(bucket))
    if unknown:
        raise _Malformed(f"{name} has unknown bucket(s) {', '.join(unknown)}")
    placed: list[str] = []
    for bucket, ids in columns.items():
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise _Malformed(f"{name} bucket {bucket} is not a list of image ids")
        placed += ids
    strangers = sorted(set(placed) - set(image_ids))
    if strangers:
        raise _Malformed(f"{name} has image(s) not of the item: {', '.join(strangers)}")
    if len(placed) != len(set(placed)):
        raise _Malformed(f"{name} has an image in two buckets")
    return {bucket: ids for bucket, ids in columns.items() if bucket != UNPLACED}


def _answer(result, task: str, image_ids: list[str]) -> dict:
    if task == "rating":
        values = _values(result, {"label": "choices", **{aspect: "rating" for aspect in ASPECTS}})
        answer = {"label": _choice(values, "label", LABEL_VALUES)}
        for aspect in ASPECTS:
            if aspect in values:
                rating, (low, high) = values[aspect].get("rating"), ASPECT_RANGE
                if isinstance(rating, bool) or not isinstance(rating, int) or not low <= rating <= high:
                    raise _Malformed(f"{aspect} must be a rating from {low} to {high} (got {rating!r})")
                answer[aspect] = rating
        return answer
    if task == "pairwise":
        return {"choice": _choice(_values(result, {"choice": "choices"}), "choice", PAIRWISE_CHOICES)}
    if task == "ranking":
        buckets = _buckets(_values(result, {"rank": "ranker"}), "rank", lambda b: _rank(b) is not None, image_ids)
        ranks = {image: _rank(bucket) for bucket, ids in buckets.items() for image in ids}
        missing = [image for image in image_ids if image not in ranks]
        if missing:
            raise _Malformed(f"the ranking omits image(s) {', '.join(missing)}")
        return {"ranks": ranks}
    buckets = _buckets(_values(result, {"pick": "ranker"}), "pick", {"best", "worst"}.__contains__, image_ids)
    picked = {}
    for bucket in ("best", "worst"):
        ids = buckets.get(bucket, [])
        if len(ids) != 1:
            raise _Malformed(f"the {bucket} bucket holds {len(ids)} images (must be one)")
        picked[bucket] = ids[0]
    return picked
