"""Label Studio's JSON export written the way Label Studio writes it (docs/source/guide/export.md,
"Label Studio JSON format of annotated tasks"; result values per tag from the tag docs: Choices
{"choices": [..]}, Rating {"rating": n}, Ranker with Buckets {"ranker": {bucket: [ids], "_": [unplaced
ids]}}), for the tests of tia2/label_studio.py and of the import into a store."""

import hashlib
import json


def result_id(*parts) -> str:
    """A result id like Label Studio's (10 characters), fixed for the test."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:10]


def ls_result(task: str, answer: dict, image_ids: list[str]) -> list[dict]:
    """The `result` Label Studio saves for `answer` (the client form) under tia2's config."""
    def entry(from_name, to_name, kind, value):
        return {"id": result_id(from_name, value), "from_name": from_name, "to_name": to_name,
                "type": kind, "value": value, "origin": "manual"}

    if task == "rating":
        return [entry("label", "image", "choices", {"choices": [answer["label"]]})] + [
            entry(aspect, "image", "rating", {"rating": answer[aspect]})
            for aspect in ("alignment", "fidelity", "harmlessness") if aspect in answer]
    if task == "pairwise":
        return [entry("choice", "prompt", "choices", {"choices": [answer["choice"]]})]
    if task == "ranking":
        buckets: dict[str, list[str]] = {"_": []}
        for image in image_ids:
            buckets.setdefault(f"rank_{answer['ranks'][image]}", []).append(image)
        return [entry("rank", "images", "ranker", {"ranker": buckets})]
    rest = [i for i in image_ids if i not in (answer["best"], answer["worst"])]
    picked = {"_": rest, "best": [answer["best"]], "worst": [answer["worst"]]}
    return [entry("pick", "images", "ranker", {"ranker": picked})]


def ls_annotation(number: int, task_id: int, user, result: list, at: str, cancelled: bool = False) -> dict:
    return {"id": number, "completed_by": user, "result": result, "was_cancelled": cancelled,
            "ground_truth": False, "created_at": at, "updated_at": at, "draft_created_at": None,
            "lead_time": 4.288, "prediction": {}, "result_count": 0, "unique_id": result_id("annotation", number),
            "import_id": None, "last_action": None, "task": task_id, "project": 3, "updated_by": user,
            "parent_prediction": None, "parent_annotation": None, "last_created_by": None}


def ls_export(tasks: list[dict], annotations: list[list[dict]]) -> list:
    """A project's JSON export: the imported tasks with ids, timestamps and their annotations."""
    exported = [{"id": 40 + n, "annotations": annotations[n], "file_upload": None, "drafts": [], "predictions": [],
                 "data": task["data"], "meta": {}, "created_at": "2025-05-01T09:00:00.000000Z",
                 "updated_at": "2025-05-02T10:00:00.000000Z", "inner_id": n + 1,
                 "total_annotations": len(annotations[n]),
                 "cancelled_annotations": 0, "total_predictions": 0, "comment_count": 0, "unresolved_comment_count": 0,
                 "last_comment_updated_at": None, "project": 3, "updated_by": 1, "comment_authors": []}
                for n, task in enumerate(tasks)]
    return json.loads(json.dumps(exported))
