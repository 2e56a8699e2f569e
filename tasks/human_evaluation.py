"""People's pairwise answers as evaluation results, and the annotation batches that ask for them
(tasks/annotate.py makes, assigns and stores them).

- Fine-tuned adapters against their base model (`tia2 evaluate --gold human`; TextNorm paper
  §5.4, Figure 6): one pairwise item per held-out prompt, seed and adapter, the base model's
  image against the adapter's image of the same prompt and seed (`evaluation_batch`). A pair's
  verdict is its annotators' majority choice (the adapter's image, the base's, or tie); equal
  votes, or a majority of tie choices, are a tie; a pair nobody answered has none
  (`pair_verdicts`).
- Generators against each other (ImageReward §2.3, Table 1's human evaluation): one pairwise
  item per prompt, image position and two generators (`generator_pairs_batch`); each
  generator's share of the comparisons it was in that it won, a tie one half, over every answer,
  since ImageReward aggregates all annotators' answers (`generator_win_shares`), for
  `tia2 rank-generators --human batch:NAME`.
- The benchmark flow's batches for its new images (`benchmark_batches`), and the sets people
  labelled (`people_labelled_sets`), which the flows' metrics cover.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass

import pandas as pd

from tasks.annotate import Batch, batch_info, create_batch
from tasks.generator_ranking import GeneratorChoice, generator_frame
from tia2.annotation import FIRST_ANNOTATOR_ID, Item, default_images_per_item, item_id, make_items
from tia2.errors import UserError
from tia2.store import Store, stable_id

ANNOTATORS_PER_PAIR = 3  # TIA2's three annotators per image; TextNorm §5.4's three per comparison
HUMAN_BATCH = "batch:"  # `rank-generators --human batch:NAME`: people's answers of an annotation batch
FIRST, SECOND, TIE = 1.0, 0.0, 0.5  # a pair's verdict from its first image's side


# --- reading answers ------------------------------------------------------------------------------
def pairwise_answers(store: Store, batch: str) -> pd.DataFrame:
    """One row per answer of a pairwise batch: item, prompt_id, first, second (the item's images),
    annotator_id and winner (an image id; None for a tie)."""
    info = batch_info(store, batch)
    if info["task"] != "pairwise":
        raise UserError(f"batch {batch!r} is a {info['task']} batch; people's wins come from a pairwise batch")
    with store.connect("annotation_items", "annotations") as con:
        rows = con.execute(
            """SELECT i.item, i.prompt_id, i.image_ids[1] AS first, i.image_ids[2] AS second, a.annotator_id,
                      a.answer
               FROM annotation_items i JOIN annotations a ON a.batch = i.batch AND a.item = i.item
               WHERE i.batch = ? ORDER BY i.position, a.annotator_id""", [batch]).df()
    rows["winner"] = [json.loads(answer)["winner"] for answer in rows.pop("answer")]
    return rows


def verdict(first_votes: int, second_votes: int, tie_votes: int) -> float:
    """A pair's verdict from its first image's side: the choice most annotators made (FIRST,
    SECOND or TIE); equal votes for the top choice are a tie."""
    top = max(first_votes, second_votes, tie_votes)
    leaders = [v for v, n in ((FIRST, first_votes), (SECOND, second_votes), (TIE, tie_votes)) if n == top]
    return leaders[0] if len(leaders) == 1 else TIE


def pair_verdicts(store: Store, batch: str) -> pd.DataFrame:
    """One row per answered item of a pairwise batch: first, second, answers and verdict (from
    the first image's side)."""
    rows = []
    for (first, second), votes in pairwise_answers(store, batch).groupby(["first", "second"], sort=False):
        winners = Counter(votes["winner"].fillna(""))
        rows.append(dict(first=first, second=second, answers=len(votes),
                         verdict=verdict(winners[first], winners[second], winners[""])))
    return pd.DataFrame(rows, columns=["first", "second", "answers", "verdict"])


# --- fine-tuned adapters against their base model -------------------------------------------------
@dataclass(frozen=True)
class HumanEvaluation:
    """Where an evaluation's pairwise batch stands."""
    batch: str
    pairs: int        # items: (base image, adapter image) of one prompt and seed
    answered: int     # pairs with at least one answer (those the verdicts count)
    answers: int      # answers given
    assigned: int     # answers asked of the current annotators (per pair up to `per_item`)
    per_item: int

    @property
    def waiting(self) -> int:
        """Pairs nobody has answered yet: left out of the counts."""
        return self.pairs - self.answered


def evaluation_batch_name(evaluation: str) -> str:
    return f"eval-{evaluation[:8]}"


def evaluation_verdicts(store: Store, evaluation: str, pairs: list[tuple[str, str, str]], sets: list[str],
                        seed: int, per_item: int = ANNOTATORS_PER_PAIR) -> tuple[dict[str, float], HumanEvaluation]:
    """The pairwise batch of a fine-tuning evaluation, an item per (prompt_id, base image, adapter
    image) with the base image first (created or grown once: the same evaluation gives the same
    batch), and per adapter image of an answered pair people's verdict from the adapter's side
    (1 won, 0.5 tie, 0 lost), with where these pairs stand."""
    items = [Item(item_id("pairwise", (base, adapter)), prompt_id, (base, adapter)) for prompt_id, base, adapter in pairs]
    batch = create_batch(store, "pairwise", "+".join(sorted(set(sets))), per_item=per_item, seed=seed,
                         name=evaluation_batch_name(evaluation), items=items, source=f"finetune-evaluation:{evaluation}")
    adapter_images = {adapter for _, _, adapter in pairs}
    verdicts = pair_verdicts(store, batch.batch)
    verdicts = verdicts[verdicts["second"].isin(adapter_images)]
    with store.connect("annotation_assignments") as con:
        (assigned,), = con.execute("SELECT count(*) FROM annotation_assignments WHERE batch = ? AND item IN "
                                   "(SELECT unnest(?))", [batch.batch, [it.item for it in items]]).fetchall()
    status = HumanEvaluation(batch.batch, len(items), len(verdicts), int(verdicts["answers"].sum()), int(assigned),
                             batch.per_item)
    return {row.second: 1.0 - row.verdict for row in verdicts.itertuples()}, status


def describe(status: HumanEvaluation) -> str:
    """What people have done of an evaluation's batch, and how to serve the rest."""
    text = (f"people: batch {status.batch!r}, {status.pairs} pairs (base vs adapter image, same prompt and seed), "
            f"{status.answered} answered ({status.answers} answers), {status.waiting} waiting and left out of "
            f"the human counts")
    if status.answers < status.pairs * status.per_item:
        if not status.assigned:
            text += ("; no annotators yet: `tia2 annotate add-annotator NAME` prints a personal link, "
                     "`tia2 annotate serve` serves the batch")
        else:
            text += (f"; {status.assigned - status.answers} assigned answers to go: `tia2 annotate serve` "
                     f"serves them, then run this evaluation again")
    return text


# --- generators against each other -------------------------------------------------------------
def generator_pairs_batch(store: Store, choices: list[GeneratorChoice], sets: list[str] | None = None, *,
                          images_per_prompt: int | None = None, per_item: int = ANNOTATORS_PER_PAIR, seed: int = 0,
                          name: str | None = None) -> Batch:
    """A pairwise batch over the generators' images of the prompts they all have (matched by
    text): for each such prompt and position k (a generator's k-th image with a file, by ordinal:
    the same seed for generated images) an item per two generators. At most `images_per_prompt`
    positions per prompt (default: as many as every generator has)."""
    if images_per_prompt is not None and images_per_prompt < 1:
        raise UserError(f"--images-per-prompt must be at least 1 (got {images_per_prompt})")
    frame = generator_frame(store, choices, sets)
    with store.connect("images") as con:
        paths = dict(con.execute("SELECT image_id, path FROM images WHERE image_id IN (SELECT unnest(?))",
                                 [frame["image_id"].tolist()]).fetchall())
    frame = frame[frame["image_id"].map(paths).notna()]
    labels = [c.label for c in choices]
    items = []
    for caption, images in frame.groupby("caption", sort=True):
        by_generator = {g: part.sort_values(["ordinal", "image_id"]) for g, part in images.groupby("generator_label")}
        if set(by_generator) != set(labels):
            continue
        positions = min(len(part) for part in by_generator.values())
        for k in range(min(positions, images_per_prompt or positions)):
            for a, b in itertools.combinations(labels, 2):
                first, second = by_generator[a].iloc[k], by_generator[b].iloc[k]
                pair = (first["image_id"], second["image_id"])
                items.append(Item(item_id("pairwise", pair), first["prompt_id"], pair))
    if not items:
        raise UserError("the generators have no prompt in common where each has an image with a file to show "
                        "(generate them, or register them with `tia2 import-images`)")
    name = name or "generators-" + stable_id(*labels, "|", *(sets or []))[:8]
    return create_batch(store, "pairwise", "+".join(sorted(set(frame["set"]))), per_item=per_item, seed=seed,
                        name=name, items=items, source="generator-pairs:" + ",".join(labels))


def generator_win_shares(store: Store, batch: str, choices: list[GeneratorChoice],
                         sets: list[str] | None = None) -> pd.Series:
    """Per generator, the share of the batch's answers comparing it with another of the chosen
    generators that it won, a tie counting one half (a higher share is better). Answers whose
    two images are not of two different chosen generators are left out (counted in
    `.attrs["left_out"]`)."""
    frame = generator_frame(store, choices, sets)
    generator_of = dict(zip(frame["image_id"], frame["generator_label"]))
    answers = pairwise_answers(store, batch)
    if answers.empty:
        raise UserError(f"batch {batch!r} has no answers yet (`tia2 annotate serve` serves it)")
    won, compared, used = Counter(), Counter(), 0
    for row in answers.itertuples():
        a, b = generator_of.get(row.first), generator_of.get(row.second)
        if a is None or b is None or a == b:
            continue
        used += 1
        compared.update((a, b))
        if pd.isna(row.winner):  # a tie
            won.update({a: 0.5, b: 0.5})
        else:
            won[generator_of[row.winner]] += 1
    if not used:
        raise UserError(f"none of the {len(answers)} answers of batch {batch!r} compares images of two of the "
                        f"generators {', '.join(c.label for c in choices)}")
    shares = pd.Series({c.label: won[c.label] / compared[c.label] for c in choices if compared[c.label]},
                       dtype=float)
    shares.attrs.update(batch=batch, answers=used, left_out=len(answers) - used)
    return shares


# --- the benchmark flow's batches ----------------------------------------------------------------
def benchmark_batches(store: Store, tasks: list[str], sets: list[str], *, per_item: int = ANNOTATORS_PER_PAIR,
                      seed: int = 0, aspects: bool = False) -> list[dict]:
    """For each set and task, the batch `benchmark-SET-TASK` over the set's images that have a file
    and no labels of TIA2's annotators (the images a run made or registered that people have not
    judged), created or grown by the images not yet in it; a set without such images is skipped.
    Idempotent: the same images give the same batches."""
    with store.connect("images", "labels") as con:
        rows = con.execute(
            """SELECT set, image_id, prompt_id FROM images i
               WHERE set IN (SELECT unnest($sets)) AND path IS NOT NULL AND NOT EXISTS (
                   SELECT 1 FROM labels l WHERE l.image_id = i.image_id AND l.annotator < $first)
               ORDER BY set, prompt_id, ordinal, image_id""", {"sets": list(sets), "first": FIRST_ANNOTATOR_ID}).fetchall()
    made = []
    for set_name in sets:
        images = [(image, prompt) for s, image, prompt in rows if s == set_name]
        for task in tasks:
            items = make_items(task, images, default_images_per_item(task))
            if not items:
                continue
            batch = create_batch(store, task, set_name, per_item=per_item, seed=seed, aspects=aspects and task == "rating",
                                 name=f"benchmark-{set_name}-{task}", items=items, source="benchmark")
            made.append(dict(batch=batch.batch, task=task, set=set_name, items=batch.items, new_items=batch.new_items))
    return made


def people_labelled_sets(store: Store) -> list[str]:
    """The sets with images labelled by people through the annotation app (annotator ids from
    FIRST_ANNOTATOR_ID up), for the metrics of the TIA2 protocol."""
    with store.connect("images", "labels") as con:
        return [s for (s,) in con.execute(
            "SELECT DISTINCT i.set FROM images i JOIN labels l USING (image_id) WHERE l.annotator >= ? ORDER BY 1",
            [FIRST_ANNOTATOR_ID]).fetchall()]
