"""Label Studio's JSON both ways: tasks out, and back in an export written the way Label Studio
writes it (docs/source/guide/export.md, "Label Studio JSON format of annotated tasks"; result
values per tag from the tag docs: Choices {"choices": [..]}, Rating {"rating": n}, Ranker with
Buckets {"ranker": {bucket: [ids], "_": [unplaced ids]}}), for every task; the answers that come
back are checked against tia2.annotation.parse_answer, and every name a result uses against the
labeling config."""

import copy
import re
import xml.etree.ElementTree as ET
from datetime import datetime

import pytest

from tia2.annotation import parse_answer
from tia2.errors import UserError
from tests.support.label_studio import ls_annotation, ls_export, ls_result
from tia2.label_studio import export_tasks, labeling_config, parse_export

BATCH = "demo-batch"
IMAGES = {"rating": 1, "pairwise": 2, "ranking": 3, "best-worst": 4}
CONTROL_TAGS = {"Choices", "Rating", "Ranker"}


def image_url(image_id: str) -> str:
    return f"http://127.0.0.1:8765/images/{image_id}"


def items_of(task: str, count: int = 3) -> list[dict]:
    return [{"item": f"{task}-item-{i}", "prompt": f"a red cube on a blue sphere, take {i}",
             "image_ids": [f"img-{task}-{i}-{j}" for j in range(IMAGES[task])]} for i in range(count)]


ANSWERS = {
    "rating": [{"label": "good", "alignment": 7, "fidelity": 1, "harmlessness": 4}, {"label": "bad", "fidelity": 3},
               {"label": "skip"}],
    "pairwise": [{"choice": "A"}, {"choice": "B"}, {"choice": "tie"}],
    "ranking": [{"ranks": {"img-ranking-0-0": 2, "img-ranking-0-1": 1, "img-ranking-0-2": 3}},
                {"ranks": {"img-ranking-1-0": 1, "img-ranking-1-1": 2, "img-ranking-1-2": 1}},
                {"ranks": {"img-ranking-2-0": 1, "img-ranking-2-1": 1, "img-ranking-2-2": 1}}],
    "best-worst": [{"best": "img-best-worst-0-3", "worst": "img-best-worst-0-0"},
                   {"best": "img-best-worst-1-1", "worst": "img-best-worst-1-2"},
                   {"best": "img-best-worst-2-0", "worst": "img-best-worst-2-3"}],
}
SETTINGS = {"rating": {"aspects": True, "images_per_item": 1}, "pairwise": {"aspects": False, "images_per_item": 2},
            "ranking": {"aspects": False, "images_per_item": 3}, "best-worst": {"aspects": False, "images_per_item": 4}}


ANA = {"id": 9, "email": "ana@example.org", "username": "ana", "first_name": "Ana", "last_name": ""}  # a dict


def moved(answer: dict, from_ids: list[str], to_ids: list[str]) -> dict:
    """`answer` to another item, image by image in display position."""
    to = dict(zip(from_ids, to_ids))
    if "ranks" in answer:
        return {"ranks": {to[i]: r for i, r in answer["ranks"].items()}}
    if "best" in answer:
        return {"best": to[answer["best"]], "worst": to[answer["worst"]]}
    return answer


def planned(task: str) -> dict[tuple[str, str], tuple[dict, str]]:
    """(item, annotator) -> (answer, time): item i answered with ANSWERS[task][i] by user 7, and
    with the answer to the next item (moved to this one) by Ana."""
    items = items_of(task)
    plan = {}
    for n, item in enumerate(items):
        nxt = items[(n + 1) % 3]
        plan[(item["item"], "label-studio-7")] = (ANSWERS[task][n], f"2025-05-0{n + 3}T12:00:00.000000Z")
        plan[(item["item"], "ana@example.org")] = (
            moved(ANSWERS[task][(n + 1) % 3], nxt["image_ids"], item["image_ids"]), "2025-05-03T12:30:00.5Z")
    return plan


def annotated(task: str) -> list:
    """The export of the three items of `task` annotated as `planned`."""
    plan = planned(task)
    tasks = export_tasks(BATCH, task, items_of(task), image_url)
    annotations = []
    for n, ls_task in enumerate(tasks):
        data = ls_task["data"]
        annotations.append([])
        for k, (user, name) in enumerate(((7, "label-studio-7"), (ANA, "ana@example.org")), 1):
            answer, at = plan[(data["tia2_item"], name)]
            result = ls_result(task, answer, data["tia2_image_ids"])
            annotations[-1].append(ls_annotation(100 * k + n, 40 + n, user, result, at))
    return ls_export(tasks, annotations)


def config_names(config: str) -> tuple[dict[str, ET.Element], dict[str, str]]:
    """The control tags by name, and the object tags' names to their task data key ($name)."""
    root = ET.fromstring(config)
    controls = {e.get("name"): e for e in root.iter() if e.tag in CONTROL_TAGS}
    objects = {e.get("name"): e.get("value") for e in root.iter() if e.tag in {"Text", "Image", "List"}}
    return controls, objects


@pytest.mark.parametrize("task", ["rating", "pairwise", "ranking", "best-worst"])
def test_round_trip(task):
    export = annotated(task)
    answers = parse_export(export, task)
    got = {(a.item, a.annotator): (a.answer, a.answered_at) for a in answers}
    assert len(got) == len(answers) == 6 and {a.batch for a in answers} == {BATCH}
    assert {key: answer for key, (answer, _) in got.items()} == {key: a for key, (a, _) in planned(task).items()}
    for key, (_, at) in planned(task).items():
        assert got[key][1] == datetime.fromisoformat(at) and got[key][1].tzinfo is not None
    for answer in answers:  # each is a valid client answer to its item in the order it was shown
        shown = next(t["data"]["tia2_image_ids"] for t in export if t["data"]["tia2_item"] == answer.item)
        parse_answer(task, SETTINGS[task], shown, answer.answer)


@pytest.mark.parametrize("task", ["rating", "pairwise", "ranking", "best-worst"])
def test_config_names_what_results_use(task):
    config = labeling_config(task, SETTINGS[task])
    controls, objects = config_names(config)
    export = annotated(task)
    for ls_task in export:
        data_keys = {value.removeprefix("$") for value in objects.values()}
        assert data_keys <= set(ls_task["data"])  # every object tag finds its data
        for annotation in ls_task["annotations"]:
            for result in annotation["result"]:
                control = controls[result["from_name"]]
                assert control.get("toName") == result["to_name"] and result["to_name"] in objects
                assert control.tag.lower() == result["type"]
                if control.tag == "Choices":
                    assert result["value"]["choices"][0] in {c.get("value") for c in control.iter("Choice")}
                if control.tag == "Ranker":
                    buckets = {b.get("name") for b in control.iter("Bucket")}
                    assert set(result["value"]["ranker"]) - {"_"} <= buckets
                if control.tag == "Rating":
                    assert 1 <= result["value"]["rating"] <= int(control.get("maxRating"))


def test_config_follows_settings():
    rating = config_names(labeling_config("rating", {"aspects": False, "images_per_item": 1}))[0]
    assert set(rating) == {"label"}
    with_aspects = config_names(labeling_config("rating", {"aspects": True, "images_per_item": 1}))[0]
    assert set(with_aspects) == {"label", "alignment", "fidelity", "harmlessness"}
    assert {with_aspects[a].get("maxRating") for a in ("alignment", "fidelity", "harmlessness")} == {"7"}
    for per_item, buckets in ((5, 5), (None, 8)):
        ranker = config_names(labeling_config("ranking", {"aspects": False, "images_per_item": per_item}))[0]["rank"]
        assert [b.get("name") for b in ranker.iter("Bucket")] == [f"rank_{r}" for r in range(1, buckets + 1)]
    with pytest.raises(UserError, match="unknown annotation task"):
        labeling_config("likert", {})


def test_export_tasks_data():
    (rating,) = export_tasks(BATCH, "rating", items_of("rating", 1), image_url)
    assert rating == {"data": {"text": "a red cube on a blue sphere, take 0", "tia2_batch": BATCH,
                               "tia2_item": "rating-item-0", "tia2_image_ids": ["img-rating-0-0"],
                               "image": image_url("img-rating-0-0")}}
    (pair,) = export_tasks(BATCH, "pairwise", [{"item": "p", "prompt": "x", "image_ids": ["second", "first"]}],
                           image_url)
    assert (pair["data"]["image_a"], pair["data"]["image_b"]) == (image_url("second"), image_url("first"))
    (ranking,) = export_tasks(BATCH, "ranking", [{"item": "r", "prompt": "x", "image_ids": ["b", "a&c"]}],
                              lambda i: f"/images/{i}?size=512&x=1")
    assert [e["id"] for e in ranking["data"]["images"]] == ["b", "a&c"]
    assert ranking["data"]["images"][1]["html"] == '<img src="/images/a&amp;c?size=512&amp;x=1" alt="image 2"/>'
    with pytest.raises(ValueError, match="shows 2"):
        export_tasks(BATCH, "pairwise", items_of("ranking", 1), image_url)


@pytest.mark.parametrize("choice, winner", [("A", 0), ("B", 1), ("tie", None)])
def test_pairwise_side_a_is_the_first_image_shown(choice, winner):
    item = {"item": "p", "prompt": "x", "image_ids": ["right-one", "left-one"]}
    tasks = export_tasks(BATCH, "pairwise", [item], image_url)
    ids = tasks[0]["data"]["tia2_image_ids"]
    result = ls_result("pairwise", {"choice": choice}, ids)
    export = ls_export(tasks, [[ls_annotation(1, 40, 3, result, "2025-05-03T12:00:00Z")]])
    (answer,) = parse_export(export, "pairwise")
    canonical = parse_answer("pairwise", {}, ids, answer.answer)
    assert canonical["winner"] == (None if winner is None else ["right-one", "left-one"][winner])
    assert tasks[0]["data"]["image_a"] == image_url(ids[0])


def test_cancelled_annotations_are_skipped():
    tasks = export_tasks(BATCH, "rating", items_of("rating", 2), image_url)
    ids = [t["data"]["tia2_image_ids"] for t in tasks]
    export = ls_export(tasks, [
        [ls_annotation(1, 40, 3, [], "2025-05-03T12:00:00Z", cancelled=True)],  # Label Studio's Skip button
        [ls_annotation(2, 41, 3, ls_result("rating", {"label": "bad"}, ids[1]), "2025-05-03T12:00:00Z"),
         ls_annotation(3, 41, 3, [], "2025-05-04T12:00:00Z", cancelled=True)],  # a later skip keeps the answer
    ])
    (answer,) = parse_export(export, "rating")
    assert (answer.item, answer.annotator, answer.answer) == ("rating-item-1", "label-studio-3", {"label": "bad"})


def test_latest_annotation_per_annotator_is_kept():
    tasks = export_tasks(BATCH, "pairwise", items_of("pairwise", 1), image_url)
    ids = tasks[0]["data"]["tia2_image_ids"]
    result = lambda choice: ls_result("pairwise", {"choice": choice}, ids)  # noqa: E731
    user = {"id": 5, "username": "bo", "email": ""}
    export = ls_export(tasks + tasks, [  # the item imported twice: still one answer per annotator
        [ls_annotation(1, 40, user, result("B"), "2025-05-05T08:00:00+02:00"),  # 06:00 UTC: the latest
         ls_annotation(2, 40, user, result("A"), "2025-05-05T05:59:59Z"),
         ls_annotation(3, 40, 8, result("tie"), "2025-05-01T00:00:00Z")],
        [ls_annotation(4, 41, user, result("tie"), "2025-05-04T00:00:00Z"),
         ls_annotation(5, 41, {"id": 6}, result("A"), "2025-05-04T00:00:00Z")],
    ])
    answers = {a.annotator: a for a in parse_export(export, "pairwise")}
    assert {name: a.answer["choice"] for name, a in answers.items()} == {
        "bo": "B", "label-studio-8": "tie", "label-studio-6": "A"}
    assert answers["bo"].answered_at.isoformat() == "2025-05-05T06:00:00+00:00"


def test_unanswered_tasks_give_nothing():
    tasks = export_tasks(BATCH, "ranking", items_of("ranking", 2), image_url)
    assert parse_export(ls_export(tasks, [[], []]), "ranking") == []


def set_at(path):
    """An edit of an export: the value at path[:-1] becomes path[-1] (DELETE removes it)."""
    def change(export):
        target = export
        for key in path[:-2]:
            target = target[key]
        if path[-1] is DELETE:
            del target[path[-2]]
        else:
            target[path[-2]] = path[-1]
        return export
    return change


DELETE = object()
FIRST_RESULT = (1, "annotations", 0, "result", 0)


@pytest.mark.parametrize("task, change, message", [
    ("rating", lambda export: {"tasks": export}, "is a list of tasks (got dict)"),
    ("rating", set_at((1, "data", "tia2_batch", DELETE)), "task 1 (Label Studio id 41): data has no tia2_batch"),
    ("rating", set_at((1, "data", "tia2_item", 17)), "task 1 (Label Studio id 41): data has no tia2_item"),
    ("rating", set_at((2, "data", DELETE)), 'task 2 (Label Studio id 42): no "data" object'),
    ("rating", set_at((1, "data", "tia2_image_ids", "img")), "tia2_image_ids is not a list"),
    ("rating", set_at((1, "annotations", 0, "result", DELETE)),
     'task 1 (Label Studio id 41): annotation 0: "result" is missing or not a list'),
    ("rating", set_at((1, "annotations", 1, "result", {"label": "good"})), 'annotation 1: "result" is missing'),
    ("rating", set_at((1, "annotations", 0, "result", [])), "annotation 0: no label result"),
    ("rating", set_at((*FIRST_RESULT, "type", "rating")), "result label is not a choices result"),
    ("rating", set_at((*FIRST_RESULT, "value", {"choices": ["maybe"]})),
     "label must be one of good, bad, skip (got ['maybe'])"),
    ("rating", set_at((*FIRST_RESULT, "value", {"choices": ["good", "bad"]})), "label must be one of"),
    ("rating", set_at((0, "annotations", 0, "result", 1, "value", {"rating": 9})),
     "alignment must be a rating from 1 to 7"),
    ("pairwise", set_at((*FIRST_RESULT, "value", {"choices": ["C"]})), "choice must be one of A, B, tie"),
    ("pairwise", set_at((1, "annotations", 0, "completed_by", DELETE)), "completed_by is not a user id"),
    ("pairwise", set_at((1, "annotations", 0, "updated_at", "yesterday")), "is not an ISO time"),
    ("ranking", set_at((*FIRST_RESULT, "value", "ranker", {"_": ["img-ranking-1-2"], "rank_1": ["img-ranking-1-0"],
                                                          "rank_2": ["img-ranking-1-1"]})),
     "the ranking omits image(s) img-ranking-1-2"),
    ("ranking", set_at((*FIRST_RESULT, "value", "ranker", {"rank_1": ["img-ranking-1-0", "img-ranking-1-1", "other"]})),
     "image(s) not of the item: other"),
    ("ranking", set_at((*FIRST_RESULT, "value", "ranker", {"rank_1": ["img-ranking-1-0", "img-ranking-1-1"],
                                                          "rank_2": ["img-ranking-1-1", "img-ranking-1-2"]})),
     "an image in two buckets"),
    ("ranking", set_at((*FIRST_RESULT, "value", "ranker", {"top": ["img-ranking-1-0"]})), "unknown bucket(s) top"),
    ("ranking", set_at((*FIRST_RESULT, "value", {"items": []})), 'rank has no "ranker" columns'),
    ("best-worst", set_at((*FIRST_RESULT, "value", "ranker", {"best": ["img-best-worst-1-0", "img-best-worst-1-1"],
                                                             "worst": ["img-best-worst-1-2"]})),
     "the best bucket holds 2 images"),
    ("best-worst", set_at((*FIRST_RESULT, "value", "ranker", {"best": ["img-best-worst-1-0"], "worst": []})),
     "the worst bucket holds 0 images"),
])
def test_malformed_exports_name_the_task_and_the_fault(task, change, message):
    export = change(copy.deepcopy(annotated(task)))
    with pytest.raises(UserError, match=re.escape(message)) as error:
        parse_export(export, task)
    assert "\n" not in str(error.value)
    assert str(error.value).startswith("Label Studio") or str(error.value).startswith("a Label Studio")


def test_a_task_that_is_not_an_object():
    with pytest.raises(UserError, match=r"task 0: a task is a JSON object \(got list\)"):
        parse_export([[]], "rating")
    with pytest.raises(UserError, match="unknown annotation task"):
        parse_export([], "likert")
