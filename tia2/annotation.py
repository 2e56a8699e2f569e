"""People's judgements, as pure functions: the four annotation tasks, how a batch's images become
items, who sees which item in which order, what a valid answer is, and the rows an answer means in
the tables the metrics read (tasks/annotate.py applies them to the store).

Tasks:
- `rating`: one image; TIA2's instruction (does the image match the text? good / bad / skip, as
  `labels` 1 / 0 / -1), with ImageReward's optional 1-7 ratings of alignment, fidelity and
  harmlessness (`image_ratings`).
- `ranking`: k images of one prompt ranked best to worst, ties allowed (`preference_ranks`).
- `pairwise`: two images of one prompt, A, B or tie; the sides are drawn per annotator and kept.
- `best-worst`: the best and the worst of 3-8 images of one prompt (ImageReward Appendix C.2);
  stored as ranks 1 (best), 3 (worst) and 2 (the rest, unordered).

Every draw (item order, who gets an item, the order its images are shown) is a hash of the batch's
seed and names, so one seed gives one assignment whatever the order of requests.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass

from tia2.errors import UserError

TASKS = ("rating", "ranking", "pairwise", "best-worst")
ASPECTS = ("alignment", "fidelity", "harmlessness")
ASPECT_RANGE = (1, 7)
LABEL_VALUES = {"good": 1, "bad": 0, "skip": -1}  # the labels table's coding (TIA2's)
FIRST_ANNOTATOR_ID = 1000  # labels.annotator below this is TIA2's own annotators (0-2)
MAX_IMAGES = 8  # per item: ImageReward's best-worst shows up to 8
MIN_IMAGES = {"rating": 1, "ranking": 2, "pairwise": 2, "best-worst": 3}
PAIRWISE_CHOICES = ("A", "B", "tie")


class AnswerError(ValueError):
    """An answer that does not fit its item (the app answers 422)."""


@dataclass(frozen=True)
class Item:
    item: str
    prompt_id: str
    image_ids: tuple[str, ...]


def draw(seed: int, *parts: str) -> int:
    """A seeded, order-free pseudo-random number for a tuple of names."""
    digest = hashlib.sha256("\x1f".join((str(seed), *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def item_id(task: str, image_ids: tuple[str, ...]) -> str:
    return hashlib.sha256("\x1f".join((task, *image_ids)).encode()).hexdigest()[:16]


def default_images_per_item(task: str) -> int:
    return {"rating": 1, "pairwise": 2}.get(task, MAX_IMAGES)


def check_images_per_item(task: str, images_per_item: int) -> None:
    low, high = MIN_IMAGES[task], (1 if task == "rating" else 2 if task == "pairwise" else MAX_IMAGES)
    if not low <= images_per_item <= high:
        raise UserError(f"a {task} item shows {low}" + (f"-{high}" if high > low else "")
                         + f" images (got {images_per_item})")


def make_items(task: str, images: list[tuple[str, str]], images_per_item: int) -> list[Item]:
    """The items of (image_id, prompt_id) rows, in the rows' order: each image for rating; every
    pair of one prompt's images for pairwise; for ranking and best-worst one prompt's images split
    into the fewest near-equal groups of at most `images_per_item` (a prompt with too few images
    for the task gives none)."""
    by_prompt: dict[str, list[str]] = {}
    for image, prompt in images:
        by_prompt.setdefault(prompt, []).append(image)
    items = []
    for prompt, ids in by_prompt.items():
        if task == "rating":
            groups = [(i,) for i in ids]
        elif task == "pairwise":
            groups = list(itertools.combinations(ids, 2))
        else:
            count = -(-len(ids) // images_per_item)
            groups = [tuple(ids[g::count]) for g in range(count)] if len(ids) >= MIN_IMAGES[task] else []
            groups = [g for g in groups if len(g) >= MIN_IMAGES[task]]
        items += [Item(item_id(task, g), prompt, g) for g in groups]
    return items


def batch_order(items: list[Item], seed: int, batch: str) -> list[Item]:
    """The batch's items in their seeded order: every annotator's queue follows it, so the first
    items are complete (all their annotators) first and agreement can be read early."""
    return sorted(items, key=lambda it: (draw(seed, batch, it.item), it.item))


def assign(items: list[str], assigned: dict[str, set[int]], annotators: list[int], per_item: int,
           seed: int, batch: str) -> list[tuple[str, int]]:
    """New (item, annotator) assignments: each item short of `per_item` annotators (by `assigned`)
    goes to the annotators with the fewest items of the batch so far, ties broken by a seeded
    draw. Items already assigned keep their annotators. With fewer annotators than `per_item`
    an item gets all of them and the rest when more join."""
    load = {a: 0 for a in annotators}
    for holders in assigned.values():
        for a in holders:
            if a in load:
                load[a] += 1
    new = []
    for item in items:
        holders = assigned.get(item, set())
        candidates = [a for a in annotators if a not in holders]
        candidates.sort(key=lambda a: (load[a], draw(seed, batch, item, str(a))))
        for a in candidates[:max(per_item - len(holders), 0)]:
            load[a] += 1
            new.append((item, a))
    return new


def shown_order(seed: int, batch: str, item: str, annotator_id: int, image_ids: tuple[str, ...]) -> list[str]:
    """The order an annotator sees an item's images in (the pairwise sides): a seeded draw per
    annotator, so position and side effects average out over annotators."""
    return sorted(image_ids, key=lambda i: (draw(seed, batch, item, str(annotator_id), i), i))


def canonical_json(answer: dict) -> str:
    return json.dumps(answer, sort_keys=True, separators=(",", ":"))


def parse_answer(task: str, settings: dict, shown: list[str], payload) -> dict:
    """The canonical answer (over image ids) of a client's answer to an item shown as `shown`,
    or AnswerError saying what is wrong."""
    if not isinstance(payload, dict):
        raise AnswerError("the answer must be a JSON object")
    parse = {"rating": _rating, "ranking": _ranking, "pairwise": _pairwise, "best-worst": _best_worst}[task]
    return parse(settings, shown, payload)


def _only(payload: dict, allowed: set[str]) -> None:
    extra = sorted(set(payload) - allowed)
    if extra:
        raise AnswerError(f"unexpected field(s) {', '.join(extra)} (expected {', '.join(sorted(allowed))})")


def _rating(settings: dict, shown: list[str], payload: dict) -> dict:
    aspects = ASPECTS if settings.get("aspects") else ()
    _only(payload, {"label", *aspects})
    label = payload.get("label")
    if label not in LABEL_VALUES:
        raise AnswerError(f"label must be one of {', '.join(LABEL_VALUES)} (got {label!r})")
    answer = {"label": label}
    for aspect in aspects:
        value = payload.get(aspect)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not ASPECT_RANGE[0] <= value <= ASPECT_RANGE[1]:
            raise AnswerError(f"{aspect} must be an integer from {ASPECT_RANGE[0]} to {ASPECT_RANGE[1]} (got {value!r})")
        answer[aspect] = value
    return answer


def _ranking(settings: dict, shown: list[str], payload: dict) -> dict:
    _only(payload, {"ranks"})
    ranks = payload.get("ranks")
    if not isinstance(ranks, dict) or set(ranks) != set(shown):
        raise AnswerError(f"ranks must give a rank to each of the item's {len(shown)} images, by image id")
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks.values()):
        raise AnswerError("ranks must be integers from 1 (best); equal ranks are ties")
    dense = {r: i + 1 for i, r in enumerate(sorted(set(ranks.values())))}
    return {"ranks": {image: dense[r] for image, r in sorted(ranks.items())}}


def _pairwise(settings: dict, shown: list[str], payload: dict) -> dict:
    _only(payload, {"choice"})
    choice = payload.get("choice")
    if choice not in PAIRWISE_CHOICES:
        raise AnswerError(f"choice must be A, B or tie (got {choice!r})")
    return {"choice": choice, "winner": None if choice == "tie" else shown["AB".index(choice)]}


def _best_worst(settings: dict, shown: list[str], payload: dict) -> dict:
    _only(payload, {"best", "worst"})
    best, worst = payload.get("best"), payload.get("worst")
    if best not in shown or worst not in shown:
        raise AnswerError("best and worst must be image ids of the item")
    if best == worst:
        raise AnswerError("the best and the worst must be different images")
    return {"best": best, "worst": worst}


def ranks_of(task: str, image_ids: tuple[str, ...] | list[str], answer: dict) -> dict[str, float]:
    """An answer to a ranking, pairwise or best-worst item as ranks (1 best, equal ranks tie)."""
    if task == "ranking":
        return {i: float(answer["ranks"][i]) for i in image_ids}
    if task == "pairwise":
        return {i: 1.0 if answer["winner"] in (None, i) else 2.0 for i in image_ids}
    if task == "best-worst":
        return {i: 1.0 if i == answer["best"] else 3.0 if i == answer["worst"] else 2.0 for i in image_ids}
    raise ValueError(f"{task} answers are labels, not ranks")


def derived_rows(task: str, batch: str, item: str, image_ids, annotator_id: int, annotator: str,
                 answer: dict) -> dict[str, list[dict]]:
    """The rows an answer means in the tables the metrics read, by table."""
    if task == "rating":
        (image,) = image_ids
        return {
            "labels": [{"image_id": image, "annotator": annotator_id, "label": LABEL_VALUES[answer["label"]]}],
            "image_ratings": [{"image_id": image, "annotator": annotator_id, "aspect": aspect, "value": answer[aspect]}
                              for aspect in ASPECTS if aspect in answer],
        }
    return {"preference_ranks": [{"set": batch, "item": item, "image_id": image, "annotator": annotator, "rank": rank}
                                 for image, rank in ranks_of(task, image_ids, answer).items()]}


def derived_keys(task: str, batch: str, item: str, image_ids, annotator_id: int, annotator: str) -> dict[str, list[dict]]:
    """The keys of every row an answer to this item may have written, by table (to remove them)."""
    if task == "rating":
        (image,) = image_ids
        return {"labels": [{"image_id": image, "annotator": annotator_id}],
                "image_ratings": [{"image_id": image, "annotator": annotator_id, "aspect": a} for a in ASPECTS]}
    return {"preference_ranks": [{"set": batch, "item": item, "image_id": image, "annotator": annotator}
                                 for image in image_ids]}
