"""Annotation batches, assignment and answers in the store (tasks/annotate.py, tia2/annotation.py)."""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from pathlib import Path

import pytest

from tasks import annotate
from tests.support.annotation import SET, annotation_store, people
from tia2.annotation import AnswerError, parse_answer
from tia2.errors import UserError
from tia2.store import TABLES, Store


def table_bytes(store: Store) -> dict[str, bytes]:
    return {name: (store.root / f"{name}.parquet").read_bytes() for name, spec in TABLES.items() if not spec.append_only}


def test_each_item_goes_to_n_distinct_annotators_balanced_and_seeded(tmp_path):
    def build(root: Path, seed: int):
        store = annotation_store(root, prompts=4, images_per_prompt=5)
        people(store, "ann", "bob", "cy", "dee", "eve")
        annotate.create_batch(store, "rating", SET, per_item=3, seed=seed)
        return store.read("annotation_assignments").to_pandas()

    first = build(tmp_path / "a", seed=7)
    per_item = first.groupby("item")["annotator_id"].agg(list)
    assert len(per_item) == 20 and all(len(set(a)) == len(a) == 3 for a in per_item)
    load = first.groupby("annotator_id").size()
    assert load.max() - load.min() <= 1 and load.sum() == 60
    again = build(tmp_path / "b", seed=7)
    assert first.sort_values(["item", "annotator_id"]).reset_index(drop=True).equals(
        again.sort_values(["item", "annotator_id"]).reset_index(drop=True))
    other = build(tmp_path / "c", seed=8)
    assert set(map(tuple, first[["item", "annotator_id"]].to_numpy())) != \
        set(map(tuple, other[["item", "annotator_id"]].to_numpy()))


def test_annotators_who_join_later_get_the_items_short_of_annotators(tmp_path):
    store = annotation_store(tmp_path / "s")
    ann, bob = people(store, "ann", "bob")
    annotate.create_batch(store, "rating", SET, per_item=3)
    before = store.read("annotation_assignments").to_pandas()
    assert (before.groupby("item").size() == 2).all()
    (cy,) = people(store, "cy")
    after = store.read("annotation_assignments").to_pandas()
    assert (after.groupby("item").size() == 3).all()
    assert set(after[after["annotator_id"] == cy.annotator_id]["item"]) == set(before["item"])
    assert annotate.assign_pending(store) == 0  # nothing left to assign


def test_queue_follows_the_batch_order_and_pairwise_sides_are_drawn_per_annotator(tmp_path):
    store = annotation_store(tmp_path / "s", prompts=2, images_per_prompt=4)
    team = people(store, "ann", "bob", "cy")
    batch = annotate.create_batch(store, "pairwise", SET, per_item=3)
    assert batch.items == 2 * 6  # every pair of a prompt's four images
    items = store.read("annotation_items").to_pandas().sort_values("position")
    views = annotate.next_items(store, batch.batch, team[0].annotator_id, count=100)
    assert [v.item for v in views] == list(items["item"])  # per_item = team size: everyone sees all, in order
    firsts = Counter(annotate.next_items(store, batch.batch, a.annotator_id, count=100)[k].image_ids[0]
                     == list(items["image_ids"].iloc[k])[0] for a in team for k in range(12))
    assert firsts[True] and firsts[False]  # both sides occur
    view = views[0]
    assert parse_answer("pairwise", {}, view.image_ids, {"choice": "A"})["winner"] == view.image_ids[0]
    assert parse_answer("pairwise", {}, view.image_ids, {"choice": "B"})["winner"] == view.image_ids[1]


def test_the_same_answer_twice_changes_nothing_a_changed_one_is_logged_and_undo_brings_the_item_back(tmp_path):
    store = annotation_store(tmp_path / "s")
    ann, _, _ = people(store, "ann", "bob", "cy")
    batch = annotate.create_batch(store, "rating", SET, aspects=True).batch
    writer = annotate.AnswerWriter(store)
    try:
        first = annotate.next_items(store, batch, ann.annotator_id)[0]
        assert writer.submit(ann, batch, first.item, {"label": "good", "fidelity": 6}).changed
        files = table_bytes(store)
        assert not writer.submit(ann, batch, first.item, {"fidelity": 6, "label": "good"}).changed
        assert table_bytes(store) == files
        assert writer.submit(ann, batch, first.item, {"label": "bad", "alignment": 2}).changed
        (image,) = first.image_ids
        labels = store.read("labels").to_pylist()
        assert labels == [{"image_id": image, "annotator": ann.annotator_id, "label": 0}]
        assert store.read("image_ratings").to_pylist() == [
            {"image_id": image, "annotator": ann.annotator_id, "aspect": "alignment", "value": 2}]
        assert annotate.next_items(store, batch, ann.annotator_id)[0].item != first.item
        assert writer.undo(ann, batch) == first.item
        assert annotate.next_items(store, batch, ann.annotator_id)[0].item == first.item
        assert store.read("labels").num_rows == store.read("image_ratings").num_rows == 0
        assert store.read("annotations").num_rows == 0
        assert writer.undo(ann, batch) is None
    finally:
        writer.close()
    log = store.read("annotation_log").to_pandas().sort_values("at")
    assert list(log["action"]) == ["answer", "change", "undo"]
    assert json.loads(log["previous"].iloc[1]) == {"fidelity": 6, "label": "good"}
    assert json.loads(log["previous"].iloc[2]) == {"alignment": 2, "label": "bad"}


@pytest.mark.parametrize("task, answer_of, expected", [
    ("ranking", lambda ids: {"ranks": {ids[0]: 3, ids[1]: 3, ids[2]: 7, ids[3]: 1}}, lambda ids: [2, 2, 3, 1]),
    ("best-worst", lambda ids: {"best": ids[2], "worst": ids[0]}, lambda ids: [3, 2, 1, 2]),
    ("pairwise", lambda ids: {"choice": "tie"}, lambda ids: [1, 1]),
    ("pairwise", lambda ids: {"choice": "B"}, lambda ids: [2, 1]),
])
def test_rankings_pairs_and_best_worst_become_ranks_of_the_batch_set(tmp_path, task, answer_of, expected):
    store = annotation_store(tmp_path / "s", prompts=1)
    (ann,) = people(store, "ann")
    batch = annotate.create_batch(store, task, SET, per_item=1).batch
    writer = annotate.AnswerWriter(store)
    try:
        view = annotate.next_items(store, batch, ann.annotator_id)[0]
        writer.submit(ann, batch, view.item, answer_of(view.image_ids))
    finally:
        writer.close()
    ranks = store.read("preference_ranks").to_pandas().set_index("image_id")
    assert set(ranks["set"]) == {batch} and set(ranks["annotator"]) == {"ann"} and set(ranks["item"]) == {view.item}
    assert [ranks.at[i, "rank"] for i in view.image_ids] == expected(view.image_ids)


def test_concurrent_answers_are_all_stored_once(tmp_path):
    store = annotation_store(tmp_path / "s", prompts=4, images_per_prompt=4)
    team = people(store, "ann", "bob", "cy", "dee")
    batch = annotate.create_batch(store, "rating", SET, per_item=2).batch
    writer = annotate.AnswerWriter(store)
    sent: list[tuple[int, str, str]] = []
    lock = threading.Lock()

    def label_all(annotator):
        for view in annotate.next_items(store, batch, annotator.annotator_id, count=100):
            label = "good" if hash(view.item) % 2 else "bad"
            writer.submit(annotator, batch, view.item, {"label": label})
            writer.submit(annotator, batch, view.item, {"label": label})  # a double click
            with lock:
                sent.append((annotator.annotator_id, view.image_ids[0], label))

    threads = [threading.Thread(target=label_all, args=(a,)) for a in team]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        writer.close()
    assert len(sent) == 32
    stored = {(r["annotator"], r["image_id"], r["label"]) for r in store.read("labels").to_pylist()}
    assert stored == {(a, i, {"good": 1, "bad": 0}[label]) for a, i, label in sent}
    assert store.read("annotations").num_rows == 32 and store.read("annotation_log").num_rows == 32
    assert all(p["done"] == p["total"] == 8 for p in annotate.progress(store).to_dict("records"))


def test_a_failed_commit_writes_nothing_and_tells_the_waiter(tmp_path, monkeypatch):
    store = annotation_store(tmp_path / "s")
    (ann,) = people(store, "ann")
    batch = annotate.create_batch(store, "rating", SET, per_item=1).batch
    view = annotate.next_items(store, batch, ann.annotator_id)[0]
    files = table_bytes(store)
    staged = []

    def fail_on_second(path, table):
        staged.append(path)
        if len(staged) == 2:
            raise OSError(28, "No space left on device")
        return original(path, table)

    original = Store._stage_file
    monkeypatch.setattr(Store, "_stage_file", staticmethod(fail_on_second))
    writer = annotate.AnswerWriter(store)
    try:
        with pytest.raises(OSError, match="No space"):
            writer.submit(ann, batch, view.item, {"label": "good"})
    finally:
        writer.close()
    assert table_bytes(store) == files
    assert not list(store.root.glob(".*.tmp"))


def test_answers_that_do_not_fit_are_refused(tmp_path):
    store = annotation_store(tmp_path / "s", prompts=1)
    ann, bob = people(store, "ann", "bob")
    batch = annotate.create_batch(store, "ranking", SET, per_item=1).batch
    view = annotate.next_items(store, batch, ann.annotator_id)[0]
    ids = view.image_ids
    writer = annotate.AnswerWriter(store)
    try:
        for bad in ({"ranks": {ids[0]: 1}}, {"ranks": {i: 0 for i in ids}}, {"ranks": {i: True for i in ids}},
                    {"ranks": {i: 1 for i in ids}, "extra": 1}, "rank them", None):
            with pytest.raises(AnswerError):
                writer.submit(ann, batch, view.item, bad)
        with pytest.raises(PermissionError):
            writer.submit(bob, batch, view.item, {"ranks": {i: 1 for i in ids}})
        with pytest.raises(UserError, match="no annotation batch"):
            writer.submit(ann, "nosuch", view.item, {"ranks": {i: 1 for i in ids}})
    finally:
        writer.close()
    assert store.read("annotations").num_rows == 0
    for task, payload in [("rating", {"label": "good", "fidelity": 8}), ("rating", {"label": "fine"}),
                          ("best-worst", {"best": "x", "worst": "y"}), ("pairwise", {"choice": "C"})]:
        with pytest.raises(AnswerError):
            parse_answer(task, {"aspects": True}, ["a", "b", "c"], payload)
    with pytest.raises(AnswerError, match="different"):
        parse_answer("best-worst", {}, ["a", "b", "c"], {"best": "a", "worst": "a"})


def test_batches_are_checked_and_grow_with_new_images(tmp_path):
    store = annotation_store(tmp_path / "s", prompts=2, images_per_prompt=3)
    people(store, "ann")
    for kwargs, message in [({"task": "judge"}, "task must be one of"), ({"per_item": 0}, "at least 1"),
                            ({"set_name": "nosuch"}, "has no images"), ({"task": "pairwise", "images_per_item": 3}, "shows 2"),
                            ({"task": "best-worst", "images_per_item": 9}, "shows 3-8"),
                            ({"task": "ranking", "aspects": True}, "aspect")]:
        with pytest.raises(UserError, match=message):
            annotate.create_batch(store, **{"task": "rating", "set_name": SET, **kwargs})
    first = annotate.create_batch(store, "rating", SET, per_item=1)
    assert (first.items, first.new_items) == (6, 6)
    with pytest.raises(UserError, match="other settings"):
        annotate.create_batch(store, "rating", SET, per_item=2)
    files = table_bytes(store)
    assert annotate.create_batch(store, "rating", SET, per_item=1).new_items == 0
    assert table_bytes(store) == files
    grown = annotation_store(tmp_path / "s", prompts=3, images_per_prompt=3)  # a third prompt's images arrive
    batch = annotate.create_batch(grown, "rating", SET, per_item=1)
    assert (batch.items, batch.new_items) == (9, 3)
    assert sorted(store.read("annotation_items").to_pandas()["position"]) == list(range(9))


def test_links_authenticate_their_annotator_only(tmp_path):
    store = annotation_store(tmp_path / "s")
    ann, token = annotate.add_annotator(store, "ann")
    admin, admin_token = annotate.add_annotator(store, "boss", "admin")
    assert annotate.authenticate(store, token) == ann and annotate.authenticate(store, admin_token) == admin
    assert admin.role == "admin" and ann.annotator_id >= 1000
    assert annotate.authenticate(store, token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert annotate.authenticate(store, "") is None
    assert token not in (store.root / "annotators.parquet").read_bytes().decode("latin-1")
    with pytest.raises(UserError, match="exists"):
        annotate.add_annotator(store, "ann")
    again, new_token = annotate.add_annotator(store, "ann", new_token=True)
    assert again == ann and annotate.authenticate(store, new_token) == ann and annotate.authenticate(store, token) is None
    for bad in ("", "two words", "x" * 65, "../up"):
        with pytest.raises(UserError, match="annotator name"):
            annotate.add_annotator(store, bad)
    assert sorted(store.read("annotators").column("name").to_pylist()) == ["ann", "boss"]


@pytest.mark.parametrize("task", ["rating", "pairwise", "ranking", "best-worst"])
def test_label_studio_round_trip_through_the_store(tmp_path, task):
    from tests.support.label_studio import ls_annotation, ls_export, ls_result

    store = annotation_store(tmp_path / "s", prompts=2)
    (ann,) = people(store, "ann")
    batch = annotate.create_batch(store, task, SET, per_item=1, aspects=task == "rating").batch
    tasks, config = annotate.export_label_studio(store, batch, lambda image_id, path: f"/data/local-files/?d={path}")
    assert "<View>" in config and len(tasks) == store.read("annotation_items").num_rows

    def answer_for(n: int, ids: list[str]) -> dict:
        return {"rating": {"label": ["good", "bad", "skip"][n % 3], "fidelity": 1 + n % 7},
                "pairwise": {"choice": ["A", "B", "tie"][n % 3]},
                "ranking": {"ranks": {i: 1 + (k + n) % 3 for k, i in enumerate(ids)}},
                "best-worst": {"best": ids[n % len(ids)], "worst": ids[(n + 1) % len(ids)]}}[task]

    sent = [answer_for(n, t["data"]["tia2_image_ids"]) for n, t in enumerate(tasks)]
    users = [{"id": 3, "email": "ann"}, 12]  # a registered annotator, and one Label Studio knows by id only
    exported = ls_export(tasks, [[ls_annotation(2 * n + u, 40 + n, user, ls_result(task, sent[n], t["data"]["tia2_image_ids"]),
                                                f"2025-05-03T12:{n:02d}:00.000000Z") for u, user in enumerate(users)]
                                 for n, t in enumerate(tasks)])
    path = tmp_path / "export.json"
    path.write_text(json.dumps(exported))
    files = table_bytes(store)
    with pytest.raises(UserError, match="label-studio-12"):
        annotate.import_label_studio(store, path)
    assert table_bytes(store) == files
    report = annotate.import_label_studio(store, path, create_annotators=True)
    assert report == {"answers": 2 * len(tasks), "changed": 2 * len(tasks), "annotators_added": ["label-studio-12"],
                      "batches": [batch]}
    stored = store.read("annotations").to_pandas()
    assert set(stored["source"]) == {"label-studio"} and len(stored) == 2 * len(tasks)
    by_item = {t["data"]["tia2_item"]: (t["data"]["tia2_image_ids"], a) for t, a in zip(tasks, sent)}
    for row in stored.itertuples():
        ids, answer = by_item[row.item]
        assert json.loads(row.answer) == parse_answer(task, {"aspects": True}, ids, answer)
    if task == "rating":
        assert store.read("labels").num_rows == 2 * len(tasks)
    else:
        assert store.read("preference_ranks").num_rows == 2 * sum(len(ids) for ids, _ in by_item.values())
    files = table_bytes(store)
    assert annotate.import_label_studio(store, path)["changed"] == 0
    assert {k: v for k, v in table_bytes(store).items() if k != "annotators"} == \
        {k: v for k, v in files.items() if k != "annotators"}


def test_label_studio_files_that_are_not_exports_are_refused(tmp_path):
    store = annotation_store(tmp_path / "s", prompts=1)
    people(store, "ann")
    annotate.create_batch(store, "pairwise", SET, per_item=1)
    for text, message in [("{not json", "cannot read it as JSON"), ("[]", "non-empty JSON list"),
                          ('[{"data": {"text": "x"}}]', "names no tia2_batch"),
                          ('[{"data": {"tia2_batch": "nosuch", "tia2_item": "x"}}]', "no annotation batch")]:
        path = tmp_path / "bad.json"
        path.write_text(text)
        files = table_bytes(store)
        with pytest.raises(UserError, match=message):
            annotate.import_label_studio(store, path)
        assert table_bytes(store) == files


def test_agreement_of_a_batch_is_stored_and_logged(tmp_path):
    import mlflow

    from tasks.agreement import record_agreement

    store = annotation_store(tmp_path / "s", prompts=3)
    team = people(store, "ann", "bob", "cy")
    batch = annotate.create_batch(store, "rating", SET).batch
    labels = {}
    for a, annotator in enumerate(team):
        for k, view in enumerate(annotate.next_items(store, batch, annotator.annotator_id, count=100)):
            labels[(annotator.name, view.image_ids[0])] = "good" if (k + (a == 2)) % 2 else "bad"
    writer = annotate.AnswerWriter(store)
    try:
        for (name, image), label in labels.items():
            annotator = next(t for t in team if t.name == name)
            item = next(v.item for v in annotate.next_items(store, batch, annotator.annotator_id, count=100)
                        if v.image_ids == [image])
            writer.submit(annotator, batch, item, {"label": label})
    finally:
        writer.close()
    result = record_agreement(store, batch, resamples=50)
    images = {image for _, image in labels}
    same = sum(labels[(x, i)] == labels[(y, i)] for i in images for x, y in (("ann", "bob"), ("ann", "cy"), ("bob", "cy")))
    table = result.table.set_index(["measure", "subject", "other"])
    assert table.at[("pairwise", "all", ""), "value"] == pytest.approx(same / (3 * len(images)))
    assert table.at[("pairwise", "ann", "bob"), "value"] == 1.0
    stored = store.read("annotation_agreement").to_pandas()
    assert len(stored) == len(result.table) and set(stored["scope"]) == {batch}
    run = mlflow.get_run(stored["run_id"].iloc[0])
    assert run.data.metrics["pairwise/ann/bob"] == 1.0
    record_agreement(store, batch, resamples=50)  # again: the batch's rows are replaced, not added
    assert store.read("annotation_agreement").num_rows == len(result.table)


def test_agreement_on_a_labelled_set_names_people_and_tia2s_label_positions(tmp_path):
    """A set labelled by TIA2 (three labels per image, annotators 0-2) and by a person of the app:
    the person by name, TIA2's labels as tia2#1-3, each pair's share of images labelled alike."""
    import pyarrow as pa

    from tasks.agreement import compute_agreement, format_agreement

    store = annotation_store(tmp_path / "s", prompts=2)
    images = store.read("images").column("image_id").to_pylist()
    tia2 = {(image, k): (n * (k + 2)) % 3 % 2 for n, image in enumerate(images) for k in range(3)}
    store.upsert("labels", pa.Table.from_pylist([dict(image_id=i, annotator=k, label=v) for (i, k), v in tia2.items()]))
    ann = people(store, "ann")[0]
    batch = annotate.create_batch(store, "rating", SET, per_item=1).batch
    mine = {}
    writer = annotate.AnswerWriter(store)
    try:
        for n, view in enumerate(annotate.next_items(store, batch, ann.annotator_id, count=100)):
            mine[view.image_ids[0]] = n % 2
            writer.submit(ann, batch, view.item, {"label": ["bad", "good"][n % 2]})
    finally:
        writer.close()
    result = compute_agreement(store, SET, resamples=20)
    table = result.table.set_index(["measure", "subject", "other"])["value"]
    assert result.annotators == 4 and len(mine) == len(images)
    for k, j in ((0, 1), (0, 2), (1, 2)):
        alike = sum(tia2[(i, k)] == tia2[(i, j)] for i in images) / len(images)
        assert table[("pairwise", f"tia2#{k + 1}", f"tia2#{j + 1}")] == pytest.approx(alike)
    assert table[("pairwise", "ann", "tia2#2")] == pytest.approx(
        sum(mine[i] == tia2[(i, 1)] for i in images) / len(images))
    assert "tia2#1-3 are the positions of TIA2's three labels" in format_agreement(result)


def test_the_annotate_commands(tmp_path, capsys):
    from cli.main import main

    store = annotation_store(tmp_path / "s", prompts=2)
    at = ["--store", str(store.root)]
    assert main(["annotate", "add-annotator", "ann", *at, "--url", "http://127.0.0.1:9000"]) == 0
    link = capsys.readouterr().out.split()[-1]
    assert link.startswith("http://127.0.0.1:9000/a/")
    assert annotate.authenticate(store, link.rsplit("/", 1)[1]).name == "ann"
    assert main(["annotate", "create-batch", "--task", "best-worst", "--set", SET, "--per-item", "1", *at]) == 0
    assert "batch 'demo-best-worst': 2 best-worst items of set 'demo' (2 new), 1 annotators each" in capsys.readouterr().out
    assert main(["annotate", "progress", *at]) == 0
    assert capsys.readouterr().out.split("\n")[1].split() == ["demo-best-worst", "demo", "best-worst", "ann", "0", "2"]
    out = tmp_path / "tasks.json"
    assert main(["annotate", "export", "--batch", "demo-best-worst", "--out", str(out), *at]) == 0
    assert len(json.loads(out.read_text())) == 2
    files = table_bytes(store)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))  # a port another program holds
    for argv, message in [(["create-batch", "--task", "rating"], "required: --set"),
                          (["serve", "--task", "rating"], "give --task and --set together"),
                          (["serve", "--port", "99999"], "must be a whole number of at least 1 and at most 65535 (got '99999')"),
                          (["add-annotator", "dee", "--url", "ftp://x"], "must be the app's http:// or https://"),
                          (["export", "--batch", "demo-best-worst", "--out", str(tmp_path)],
                           f"is a folder: give a file name, e.g. {tmp_path / 'tasks.json'}"),
                          (["serve", "--task", "rating", "--set", SET, "--port", str(taken.getsockname()[1])],
                           f"cannot serve on 127.0.0.1:{taken.getsockname()[1]}: Address already in use"),
                          (["serve", "--host", "no.such.host.invalid"], "cannot serve on no.such.host.invalid:8765"),
                          (["agreement", "demo-best-worst"], "has no answers yet"),
                          (["agreement", "nosuch"], "neither an annotation batch"),
                          (["export", "--batch", "nosuch", "--out", str(tmp_path / "x.json")], "no annotation batch"),
                          (["import", str(tmp_path / "missing.json")], "cannot read it")]:
        assert main(["annotate", *argv, *at]) == 2, argv
        assert message in capsys.readouterr().err, argv
    taken.close()
    assert table_bytes(store) == files and not (tmp_path / "x.json").exists()  # no batch, no admin made
