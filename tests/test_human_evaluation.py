"""People's answers feeding the measurements (tasks/human_evaluation.py and the stages it joins):
ratings into `tia2 metrics`, rankings and pairs into `tia2 preference-metrics`, pairwise wins of
generators into `tia2 rank-generators --human batch:NAME`, base-vs-adapter pairs into
`tia2 evaluate --gold human`, and the flows' annotate step and re-scoring. Every answer is
written through tasks.annotate.AnswerWriter; every expected number is recomputed here from the
answers the test gave, by its own loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image
from scipy.stats import kendalltau, spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score

from cli.main import main
from tasks import annotate
from tasks.generate import image_id, save_png
from tasks.generator_ranking import GeneratorChoice
from tasks.human_evaluation import benchmark_batches, generator_pairs_batch, verdict
from tasks.preferences import ingest_preferences
from tasks.score import import_scores
from tests.support.annotation import answer, draw, people
from tests.support.project import PROJECT
from tia2.config import merged_config
from tia2.errors import UserError
from tia2.store import TABLES, Store, stable_id

TEXTS = ["a photo of two cats", "three red apples on a table", "a blue car next to a tree", "four dogs on the grass"]
GRADED = {1: 1.0, 0: 0.0, -1: 0.5}  # the TIA2 protocol's graded value of good, bad, skip


@pytest.fixture(scope="module")
def module_tracking(tmp_path_factory):
    """One MLflow store for this module's tests: a new one costs seconds of migrations per test."""
    import mlflow

    root = tmp_path_factory.mktemp("mlruns")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        patch.delenv("TIA2_STORE", raising=False)
        patch.delenv("TIA2_SOURCE", raising=False)
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        yield root


@pytest.fixture(autouse=True)
def isolated_tracking(module_tracking):
    """conftest's fixture of this name, on the module's MLflow store."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{module_tracking}/mlflow.db")  # another module's test may have moved it
    return module_tracking


def generated_store(root: Path, generators: list[str], images_per_prompt: int, set_name: str = "gen",
                    texts: list[str] = TEXTS) -> Store:
    """Images as `tia2 generate` registers them (content-addressed PNGs, seeded ordinals), of
    `generators` (name@identity) for the prompts of `set_name`, and scores of a model "m"."""
    store = Store(root / "store")
    prompts = [dict(prompt_id=stable_id(set_name, t), text=t, set=set_name, category=None, subcategory=None,
                    source="test") for t in texts]
    store.upsert("prompts", pa.Table.from_pylist(prompts))
    rng = np.random.default_rng(0)
    rows = []
    for generator in generators:
        for prompt in prompts:
            for i in range(images_per_prompt):
                path, digest = save_png(store, Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)))
                rows.append(dict(image_id=image_id(prompt["prompt_id"], generator, None, i, 0, 2, 1.0),
                                 prompt_id=prompt["prompt_id"], set=set_name, file=path.name, ordinal=i, seed=i,
                                 generator=generator, lora=None, steps=2, guidance=1.0, path=str(path),
                                 sha256=digest, width=16, height=16))
    store.upsert("images", pa.Table.from_pylist(rows))
    texts_of = {p["prompt_id"]: p["text"] for p in prompts}
    pd.DataFrame([dict(set=set_name, image=r["file"], prompt=texts_of[r["prompt_id"]], reward_model="m",
                       score=float(rng.normal())) for r in rows]).to_csv(root / "m.csv", index=False)
    import_scores(store, root / "m.csv")
    return store


def table_files(store: Store, *tables: str) -> dict[str, bytes]:
    return {t: (store.root / f"{t}.parquet").read_bytes() for t in tables}


def expected_verdict(votes: list[str]) -> str:
    """The pair's outcome as the issue defines it, written out: the choice most annotators
    made; equal votes for the top choice, or a majority of ties, are a tie."""
    counts = Counter(votes)
    top = max(counts.values())
    leaders = [c for c, n in counts.items() if n == top]
    return leaders[0] if len(leaders) == 1 else "tie"


def test_the_pair_verdict_rule():
    sides = {"first": 1.0, "second": 0.0, "tie": 0.5}
    for votes in [["first"], ["second", "second", "first"], ["first", "tie", "tie"], ["first", "second"],
                  ["first", "second", "tie"], ["tie"], ["first", "first", "tie"], ["second", "tie"]]:
        counts = Counter(votes)
        assert verdict(counts["first"], counts["second"], counts["tie"]) == sides[expected_verdict(votes)], votes


# --- ratings -> tia2 metrics -------------------------------------------------------------------------
def test_ratings_of_generated_images_go_through_the_tia2_protocol(tmp_path, capsys):
    store = generated_store(tmp_path, ["gen-a@1"], images_per_prompt=4)
    annotators = people(store, "ann", "bob", "cy")
    batch = annotate.create_batch(store, "rating", "gen")
    assert batch.items == 16

    def rate(a, view):
        return {"label": ("good", "bad", "skip", "good")[draw(a.name, view.image_ids[0]) % 4]}

    given = answer(store, batch.batch, annotators, rate)
    assert len(given) == 48  # three annotators per image
    labels = store.read("labels").to_pandas()
    assert (labels["annotator"] >= 1000).all() and (labels.groupby("image_id").size() == 3).all()

    assert main(["--store", str(store.root), "metrics", "--reward", "m", "--set", "gen"]) == 0
    assert "gen (" in capsys.readouterr().out
    stored = store.connect().execute("SELECT * FROM prompt_metrics WHERE set = 'gen'").df().set_index("prompt_id")

    votes = {}
    for a, view, payload in given:
        votes.setdefault(view.image_ids[0], []).append({"good": 1, "bad": 0, "skip": -1}[payload["label"]])
    images = store.connect().execute(
        "SELECT i.image_id, i.prompt_id, s.score FROM images i JOIN scores s USING (image_id) "
        "ORDER BY i.prompt_id, i.ordinal").df()
    included = 0
    for prompt_id, part in images.groupby("prompt_id"):
        z = np.array([sum(v == 1 for v in votes[i]) >= 2 for i in part["image_id"]], dtype=int)  # majority of three
        graded = np.array([np.mean([GRADED[v] for v in votes[i]]) for i in part["image_id"]])
        if z.min() == z.max():
            assert prompt_id not in stored.index  # the protocol leaves out captions whose labels all agree
            continue
        included += 1
        row, r = stored.loc[prompt_id], part["score"].to_numpy()
        assert row["human"] == pytest.approx(z.mean())
        assert row["auroc"] == pytest.approx(roc_auc_score(z, r))
        assert row["auprc"] == pytest.approx(average_precision_score(z, r))
        assert row["spearman"] == pytest.approx(spearmanr(r, graded).statistic)
        assert row["kendall"] == pytest.approx(kendalltau(r, graded).statistic)
    assert included == len(stored) >= 2


# --- rankings and pairs -> tia2 preference-metrics ---------------------------------------------------
def test_rankings_and_pairs_go_through_preference_metrics(tmp_path, capsys):
    store = generated_store(tmp_path, ["gen-a@1"], images_per_prompt=4)
    annotators = people(store, "ann", "bob", "cy")
    pairs = annotate.create_batch(store, "pairwise", "gen")
    ranking = annotate.create_batch(store, "ranking", "gen")
    assert (pairs.items, ranking.items) == (24, 4)
    pair_answers = answer(store, pairs.batch, annotators,
                          lambda a, view: {"choice": ("A", "B", "tie", "A")[draw(a.name, view.item) % 4]})
    rank_answers = answer(store, ranking.batch, annotators,
                          lambda a, view: {"ranks": {i: 1 + draw(a.name, i) % 3 for i in view.image_ids}})
    scores = dict(store.connect().execute("SELECT image_id, score FROM scores").fetchall())

    def expected_counts(ranks_by_item: dict) -> dict:
        """Per item: pairs people rank differently and how many the scores order the same way."""
        counts = {}
        for item, ranks in ranks_by_item.items():
            pairs_, correct = 0, 0
            for a in ranks:
                for b in ranks:
                    if a < b and ranks[a] != ranks[b]:
                        pairs_ += 1
                        correct += np.sign(scores[a] - scores[b]) == np.sign(ranks[b] - ranks[a])
            counts[item] = (pairs_, int(correct))
        return counts

    def stored_counts(batch: str, annotator: str) -> dict:
        rows = store.connect().execute("SELECT item, pairs, correct FROM preference_metrics WHERE set = ? AND "
                                       "annotator = ?", [batch, annotator]).fetchall()
        return {item: (n, c) for item, n, c in rows}

    # the pairs: each image's mean rank over the item's three annotators (winner 1, loser 2, tie both 1)
    ranks: dict = {}
    for a, view, payload in pair_answers:
        first, second = view.image_ids  # as shown: A, B
        given = {"A": (1, 2), "B": (2, 1), "tie": (1, 1)}[payload["choice"]]
        for image, rank in zip((first, second), given):
            ranks.setdefault(view.item, {}).setdefault(image, []).append(rank)
    mean = {item: {i: np.mean(r) for i, r in images.items()} for item, images in ranks.items()}
    assert main(["--store", str(store.root), "preference-metrics", "--reward", "m", "--set", pairs.batch,
                 "--annotator", "mean", "--bootstrap", "20"]) == 0
    assert stored_counts(pairs.batch, "mean") == expected_counts(mean)
    # one annotator's own rankings
    bob = {view.item: payload["ranks"] for a, view, payload in rank_answers if a.name == "bob"}
    assert main(["--store", str(store.root), "preference-metrics", "--reward", "m", "--set", ranking.batch,
                 "--annotator", "bob", "--bootstrap", "20"]) == 0
    assert stored_counts(ranking.batch, "bob") == expected_counts(bob)
    out = capsys.readouterr().out
    assert "annotator mean" in out and "annotator bob" in out
    # by default a batch is measured against the mean ranks (it has no file's combined ranking)
    rank_lists: dict = {}
    for a, view, payload in rank_answers:
        for image, rank in payload["ranks"].items():
            rank_lists.setdefault(view.item, {}).setdefault(image, []).append(rank)
    assert main(["--store", str(store.root), "preference-metrics", "--reward", "m", "--set", ranking.batch,
                 "--bootstrap", "20"]) == 0
    assert "annotator mean" in capsys.readouterr().out
    assert stored_counts(ranking.batch, "mean") == expected_counts(
        {item: {i: np.mean(r) for i, r in images.items()} for item, images in rank_lists.items()})
    assert main(["--store", str(store.root), "preference-metrics", "--reward", "m", "--set", ranking.batch,
                 "--annotator", "consensus"]) == 2
    assert "no rankings by annotator 'consensus'" in capsys.readouterr().err
    # beside a set with a combined ranking, the default is ambiguous: say so, measure nothing
    (tmp_path / "file.json").write_text(json.dumps(
        [{"id": "a", "prompt": "p", "generations": ["x.png", "y.png"], "ranking": [1, 2]}]))
    ingest_preferences(store, tmp_path / "file.json", "imagereward", "from-file")
    before = stored_counts(pairs.batch, "mean")
    assert main(["--store", str(store.root), "preference-metrics", "--reward", "m", "--set", pairs.batch,
                 "--set", "from-file"]) == 2
    assert ("set(s) from-file have a combined ranking and " + pairs.batch) in capsys.readouterr().err
    assert stored_counts(pairs.batch, "mean") == before


# --- pairwise wins of generators -> tia2 rank-generators --human batch:NAME ------------------------
def test_generator_pairs_and_people_wins_give_the_human_ranking(tmp_path, capsys):
    generators = ["gen-a@1", "gen-b@2", "gen-c@3"]
    store = generated_store(tmp_path, generators, images_per_prompt=2, texts=TEXTS[:3])
    annotators = people(store, "ann", "bob", "cy")
    flags = [arg for g in ("gen-a", "gen-b", "gen-c") for arg in ("--generator", g)]
    assert main(["--store", str(store.root), "generator-pairs", *flags, "--name", "arena"]) == 0
    assert "batch 'arena': 18 pairs" in capsys.readouterr().out  # 3 prompts x 2 seeds x 3 pairs of generators
    items = store.read("annotation_items").to_pandas()
    generator_of = dict(store.connect().execute("SELECT image_id, split_part(generator, '@', 1) FROM images").fetchall())
    seed_of = dict(store.connect().execute("SELECT image_id, seed FROM images").fetchall())
    assert all(len({generator_of[i] for i in ids}) == 2 and len({seed_of[i] for i in ids}) == 1
               for ids in items["image_ids"])  # two generators, the same seed
    again = generator_pairs_batch(store, [GeneratorChoice.parse(g) for g in ("gen-a", "gen-b", "gen-c")], name="arena")
    assert (again.items, again.new_items) == (18, 0)

    strength = {"gen-a": 1, "gen-b": 2, "gen-c": 0}  # people prefer gen-b, then gen-a, with noise and ties

    def choose(a, view):
        first, second = (generator_of[i] for i in view.image_ids)
        roll = draw(a.name, view.item) % 6
        if roll == 0:
            return {"choice": "tie"}
        better = "A" if strength[first] > strength[second] else "B"
        return {"choice": better if roll > 1 else "AB".replace(better, "")}

    given = answer(store, "arena", annotators, choose)
    won, compared = Counter(), Counter()
    for a, view, payload in given:
        pair = [generator_of[i] for i in view.image_ids]
        compared.update(pair)
        if payload["choice"] == "tie":
            won.update({g: 0.5 for g in pair})
        else:
            won[pair["AB".index(payload["choice"])]] += 1
    shares = {g: won[g] / compared[g] for g in compared}
    assert main(["--store", str(store.root), "rank-generators", *flags, "--reward", "m", "--human", "batch:arena"]) == 0
    out = capsys.readouterr().out
    assert f"people (batch arena, {len(given)} answers; 0 left out" in out
    assert all(f"{g} {shares[g]:.3f}" in out for g in shares)
    table = store.connect().execute("SELECT generator, mean_reward FROM generator_rankings ORDER BY generator").df()
    rho = spearmanr(table["mean_reward"], [shares[g] for g in table["generator"]]).statistic
    assert f"m: Spearman's rho with the human ranking {rho:+.3f}" in out

    for args, message in [(["--human", "batch:nosuch"], "no annotation batch 'nosuch'"),
                          (["--human", "batch:" + annotate.create_batch(store, "rating", "gen").batch],
                           "is a rating batch")]:
        assert main(["--store", str(store.root), "rank-generators", *flags, "--reward", "m", *args]) == 2
        assert message in capsys.readouterr().err
    fresh = annotate.create_batch(store, "pairwise", "gen", name="unanswered")
    assert main(["--store", str(store.root), "rank-generators", *flags, "--reward", "m", "--human",
                 f"batch:{fresh.batch}"]) == 2
    assert "has no answers yet" in capsys.readouterr().err


# --- the flow's annotate step ----------------------------------------------------------------------
def test_benchmark_batches_cover_the_unjudged_images_once(image_store, tmp_path):
    """TIA2's images (labelled by its annotators) are left out; the same images give the same
    batches and no new rows; a new image joins its set's batch."""
    people(image_store, "ann", "bob")
    folder = tmp_path / "people"
    for p in range(2):
        (folder / f"a photo of {p + 2} cubes").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * p, 30 * i, 9)).save(folder / f"a photo of {p + 2} cubes" / f"{i}.png")
    from tasks.ingest import import_images

    import_images(image_store, "people", folder)
    made = benchmark_batches(image_store, ["rating", "best-worst"], ["counting", "people"], per_item=2)
    assert [(m["batch"], m["items"]) for m in made] == [("benchmark-people-rating", 6), ("benchmark-people-best-worst", 2)]
    unjudged = image_store.connect().execute(
        "SELECT image_id FROM images WHERE set IN ('counting', 'people') AND path IS NOT NULL "
        "AND image_id NOT IN (SELECT image_id FROM labels)").fetchall()
    rated = image_store.connect().execute("SELECT unnest(image_ids) FROM annotation_items WHERE batch = "
                                          "'benchmark-people-rating'").fetchall()
    assert sorted(rated) == sorted(unjudged) and len(unjudged) == 6
    tables = ("annotation_batches", "annotation_items", "annotation_assignments")
    before = table_files(image_store, *tables)
    assert [m["new_items"] for m in benchmark_batches(image_store, ["rating", "best-worst"], ["counting", "people"],
                                                       per_item=2)] == [0, 0]
    assert table_files(image_store, *tables) == before
    # a generated image of a TIA2 caption has no TIA2 labels: it is new
    row = image_store.connect().execute("SELECT * FROM images WHERE set = 'people' LIMIT 1").df().iloc[0].to_dict()
    extra = dict(row, image_id="generated-1", set="counting", prompt_id=image_store.connect().execute(
        "SELECT prompt_id FROM prompts WHERE set = 'counting' LIMIT 1").fetchall()[0][0])
    image_store.upsert("images", pa.Table.from_pylist([extra], schema=TABLES["images"].schema))
    made = benchmark_batches(image_store, ["rating"], ["counting", "people"], per_item=2)
    assert [(m["batch"], m["new_items"]) for m in made] == [("benchmark-counting-rating", 1), ("benchmark-people-rating", 0)]


def test_the_annotate_section_is_checked_before_any_work():
    good = merged_config("tiny", {"annotate": {"tasks": ["rating", "pairwise"], "per_item": 2}})
    assert good["annotate"]["per_item"] == 2
    for section, message in [({"tasks": ["rate"]}, "annotate.tasks: unknown task(s) 'rate'"),
                             ({"tasks": []}, "annotate.tasks: must name at least one task"),
                             ({"per_item": 0}, "annotate.per_item: must be a whole number of at least 1"),
                             ({"aspects": "yes"}, "annotate.aspects: must be true or false"),
                             ({"tasks": ["ranking"], "aspects": True}, "belong to the rating task"),
                             ({"colour": 1}, "annotate: unknown setting(s) colour")]:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            merged_config("tiny", {"annotate": section})
    with pytest.raises(UserError, match="the run makes no images to annotate"):
        merged_config("tiny", {"generator": None, "annotate": {}})


# --- base vs adapters -> tia2 evaluate --gold human (tiny-sd) ---------------------------------------
EVALUATE = ["evaluate", "--model", "tiny-sd", "--set", "test", "--images-per-prompt", "2", "--steps", "2",
            "--guidance", "1", "--proxy", "tiny-clip", "--gold", "human"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two LoRA checkpoints of tiny-sd (folders step-000001, step-000002) that change its images,
    and a store of three held-out prompts."""
    import torch

    from tia2.models.diffusion import create_pipeline, save_adapter
    from tia2.models.diffusion_training import add_lora

    root = tmp_path_factory.mktemp("adapters")
    generator = create_pipeline("tiny-sd")
    add_lora(generator.pipeline.unet, rank=4, alpha=4.0, seed=0)
    folders = []
    torch.manual_seed(0)
    for step in (1, 2):
        with torch.no_grad():
            for name, weight in generator.pipeline.unet.named_parameters():
                if "lora_B" in name:
                    weight.add_(0.5 * torch.randn_like(weight))
        folders.append(save_adapter(generator.pipeline.unet, root / "run" / f"step-{step:06d}").parent)
    return folders


@pytest.mark.slow
def test_evaluate_gold_human_makes_pairs_then_counts_peoples_verdicts(tmp_path, adapters, capsys):
    from tests.support.stores import store_with_prompts

    store = store_with_prompts(tmp_path / "store", TEXTS[:3])
    cli = ["--store", str(store.root), *EVALUATE, *(arg for a in adapters for arg in ("--adapter", str(a)))]
    assert main(cli) == 0
    out = capsys.readouterr().out
    [batch] = store.read("annotation_batches").to_pylist()
    assert f"people: batch {batch['batch']!r}, 12 pairs" in out and "no annotators yet" in out
    assert batch["task"] == "pairwise" and batch["batch"].startswith("eval-")
    images = store.connect().execute("SELECT image_id, coalesce(lora, '') AS lora, prompt_id, seed "
                                     "FROM images").df().set_index("image_id")
    items = store.read("annotation_items").to_pandas()
    base_of = {}
    for ids in items["image_ids"]:
        base, adapter = images.loc[list(ids)].itertuples(index=False)
        assert base.lora == "" and adapter.lora != ""  # the base image against an adapter's
        assert (base.prompt_id, base.seed) == (adapter.prompt_id, adapter.seed)  # of the same prompt and seed
        base_of[ids[1]] = ids[0]
    assert len(base_of) == 12 and not store.connect().execute(
        "SELECT count(*) FROM finetune_evaluation WHERE reward = 'human'").fetchall()[0][0]

    annotators = people(store, "ann", "bob", "cy")

    def choose(a, view):  # some pairs nobody answers, some one or two annotators
        roll = draw(a.name, view.item)
        skip = draw(view.item) % 5 == 0 or roll % 4 == 0
        return None if skip else {"choice": ("A", "B", "tie", "A", "B")[roll % 5]}

    given = answer(store, batch["batch"], annotators, choose)
    answers_per_pair = Counter(Counter(view.item for _, view, _ in given).values())
    assert answers_per_pair[3] and answers_per_pair[1] + answers_per_pair[2]

    before = store.connect().execute("SELECT count(*) FROM images").fetchall()
    assert main(cli) == 0
    out = capsys.readouterr().out
    assert "(0 images made, 0 score rows added)" in out and store.connect().execute(
        "SELECT count(*) FROM images").fetchall() == before
    votes: dict = {}
    for a, view, payload in given:
        adapter = next(i for i in view.image_ids if i in base_of)
        side = "tie" if payload["choice"] == "tie" else (
            "adapter" if view.image_ids["AB".index(payload["choice"])] == adapter else "base")
        votes.setdefault(adapter, []).append(side)
    expected = {}
    for adapter_image, sides in votes.items():
        lora = images.loc[adapter_image, "lora"]
        expected.setdefault(lora, Counter())[expected_verdict(sides)] += 1
    rows = store.connect().execute(
        "SELECT lora, step, wins, ties, losses, n, mean_reward, base_mean_reward FROM finetune_evaluation "
        "WHERE reward = 'human' ORDER BY step").fetchall()
    assert len(rows) == 2
    answered = 0
    for lora, step, wins, ties, losses, n, mean, base_mean in rows:
        counts = expected[lora]
        assert (wins, ties, losses) == (counts["adapter"], counts["tie"], counts["base"])
        assert n == wins + ties + losses and mean == pytest.approx((wins + ties / 2) / n)
        assert base_mean == pytest.approx(1 - mean)
        answered += n
    assert answered == len(votes) == sum(answers_per_pair.values()) < 12
    assert f"{answered} answered ({len(given)} answers), {12 - answered} waiting" in out
    shares = {step: mean for _, step, *_, mean, _ in rows}
    steps = out.split("means over fine-tuning steps (step 0: the base model)\n", 1)[1].splitlines()
    assert steps[1].split()[-1] == "0.5000"  # the base against itself
    assert [float(line.split()[-1]) for line in steps[2:4]] == pytest.approx([shares[1], shares[2]], abs=1e-4)
    assert out.split("\nhuman", 1)[1].split()[:2] == [f"{w}/{t}/{lo}" for _, _, w, t, lo, *_ in rows]


# --- the DAG: the benchmark flow's annotate step, and re-scoring when labels arrive ------------------
FLOW_RUNS = """
import json, sys
from tasks import annotate
from tests.support.annotation import answer, draw, people
from tia2.annotation import item_id
from tia2.store import Store

from flows.rescore import tia2_rescore
from flows.tia2_benchmark import tia2_benchmark

config, store = sys.argv[1], Store(sys.argv[2])
tables = ("annotation_batches", "annotation_items", "annotation_assignments")


def metrics():
    return store.connect().execute("SELECT prompt_id, auroc, spearman, kendall FROM prompt_metrics "
                                   "WHERE set = 'people' ORDER BY prompt_id").fetchall()


def state(table):
    return (store.root / f"{table}.parquet").read_bytes().hex()


people(store, "ann", "bob", "cy")
for run in (1, 2):
    print(f"== benchmark {run}", file=sys.stderr, flush=True)
    summary = tia2_benchmark(config=config)
    print(json.dumps({"annotation": summary["annotation"], "tables": [state(t) for t in tables]}), flush=True)
batch = summary["annotation"][0]["batch"]
answer(store, batch, annotate.annotators(store),
       lambda a, view: {"label": ("good", "bad", "good")[draw(a.name, view.image_ids[0]) % 3]})
print("== rescore 1", file=sys.stderr, flush=True)
tia2_rescore(config=config)
print(json.dumps(metrics()), flush=True)
# one changed answer that turns an image's majority, its caption keeping both labels
votes = store.connect().execute(
    "SELECT i.prompt_id, i.image_id, l.annotator, l.label FROM images i JOIN labels l USING (image_id) "
    "WHERE i.prompt_id IN (SELECT prompt_id FROM prompt_metrics WHERE set = 'people') ORDER BY ALL").fetchall()
goods = {}
for prompt_id, image, annotator_id, label in votes:
    goods.setdefault(prompt_id, {}).setdefault(image, []).append((annotator_id, label))
for prompt_id, images in goods.items():
    majority = {i: sum(label == 1 for _, label in v) >= 2 for i, v in images.items()}
    turned = [(i, a) for i, v in images.items() for a, label in v
              if sum(x == 1 for _, x in v) in (1, 2) and (label == 1) == majority[i]
              and len(set({**majority, i: not majority[i]}.values())) == 2]
    if turned:
        image, annotator_id = turned[0]
        break
person = next(a for a in annotate.annotators(store) if a.annotator_id == annotator_id)
view = annotate.answered_item(store, batch, annotator_id, item_id("rating", (image,)))
writer = annotate.AnswerWriter(store)
writer.submit(person, batch, view.item, {"label": "bad" if view.answer["label"] == "good" else "good"})
writer.close()
print("== rescore 2", file=sys.stderr, flush=True)
tia2_rescore(config=config)
print(json.dumps(metrics()), flush=True)
"""


@pytest.mark.slow
@pytest.mark.prefect_server
def test_the_flow_annotates_new_images_once_and_rescoring_follows_the_labels(tmp_path, mini_release, prefect_api,
                                                                              module_tracking):
    import json

    from tests.support.stores import write_images

    jpegs = write_images(mini_release, tmp_path / "jpegs", sets=("counting",))
    rng = np.random.default_rng(1)
    for p in range(2):
        caption = tmp_path / "people" / f"a photo of {p + 2} blue cubes"
        caption.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(caption / f"{i}.png")
    config = tmp_path / "run.yaml"
    config.write_text(f"store: {tmp_path / 'store'}\nsets: [counting]\n"
                      f"image_folders: {{counting: {jpegs / 'counting'}, people: {tmp_path / 'people'}}}\n"
                      "reward_models: [tiny-clip]\nweights: random\nrewards: [tiny-clip]\n"
                      "annotate: {tasks: [rating], per_item: 3}\n")
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), TIA2_SOURCE=str(mini_release),
               MLFLOW_TRACKING_URI=f"sqlite:///{module_tracking}/mlflow.db", PREFECT_API_URL=prefect_api,
               PREFECT_LOGGING_LEVEL="INFO", PYTHONPATH=str(PROJECT), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", FLOW_RUNS, str(config), str(tmp_path / "store")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    first, second, before, after = (json.loads(line) for line in run.stdout.splitlines() if line[:1] in "[{")
    # the people set's 8 images (TIA2's own are labelled): one rating batch; again the same, cached
    assert first["annotation"] == [dict(batch="benchmark-people-rating", task="rating", set="people", items=8,
                                        new_items=8)]
    assert second == first
    logs = run.stderr.split("== ")
    annotate_lines = [line for line in logs[2].splitlines() if "Task run 'annotate" in line and "Finished" in line]
    assert len(annotate_lines) == 1 and "Cached" in annotate_lines[0]
    # rescoring covers the set people labelled, and a changed label changes what it writes
    store = Store(tmp_path / "store")
    assert len(before) >= 1 and after != before
    votes = store.connect().execute(
        "SELECT i.prompt_id, i.image_id, list(l.label ORDER BY l.annotator), s.score, i.ordinal FROM images i "
        "JOIN labels l USING (image_id) JOIN prompts p USING (prompt_id) "
        "JOIN scores s ON s.image_id = i.image_id AND s.text = p.text WHERE i.set = 'people' GROUP BY ALL "
        "ORDER BY i.prompt_id, i.ordinal").fetchall()
    expected = []
    for prompt_id in dict.fromkeys(v[0] for v in votes):
        mine = [v for v in votes if v[0] == prompt_id]
        assert all(len(v[2]) == 3 for v in mine)
        z = np.array([sum(x == 1 for x in v[2]) >= 2 for v in mine], dtype=int)
        graded = np.array([np.mean([GRADED[x] for x in v[2]]) for v in mine])
        r = np.array([v[3] for v in mine])
        if 0 < z.mean() < 1:
            expected.append([prompt_id, roc_auc_score(z, r), spearmanr(r, graded).statistic,
                             kendalltau(r, graded).statistic])
    assert np.array([row[1:] for row in after]) == pytest.approx(np.array([row[1:] for row in expected]))
    assert [row[0] for row in after] == [row[0] for row in expected]
