import multiprocessing
import os

import pyarrow as pa
import pytest

from tia2.store import TABLES, Store


def _labels(n, offset=0, label=1):
    return pa.table({"image_id": [f"i{offset + k}" for k in range(n)], "annotator": [0] * n,
                     "label": [label] * n})


def test_upsert_is_idempotent_and_replaces_by_key(tmp_path):
    store = Store(tmp_path)
    assert store.upsert("labels", _labels(3)) == 3
    assert store.upsert("labels", _labels(3)) == 0
    assert store.upsert("labels", _labels(2, offset=2, label=0)) == 1
    table = store.read("labels").to_pydict()
    assert dict(zip(table["image_id"], table["label"])) == {"i0": 1, "i1": 1, "i2": 0, "i3": 0}


def test_schema_is_checked_on_write(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(ValueError, match="missing \\['label'\\]"):
        store.upsert("labels", _labels(2).drop(["label"]))
    with pytest.raises(ValueError, match="wrong types"):
        store.upsert("labels", _labels(2).set_column(2, "label", pa.array(["good", "bad"])))
    with pytest.raises(ValueError, match="null values"):
        store.upsert("labels", _labels(2).set_column(0, "image_id", pa.array(["a", None])))
    with pytest.raises(ValueError, match="repeat a key"):
        store.upsert("labels", pa.concat_tables([_labels(2), _labels(1)]))
    assert store.read("labels").num_rows == 0


def test_upsert_together_writes_every_table_or_none(tmp_path):
    store = Store(tmp_path)
    prompts = pa.table({"prompt_id": ["p0"], "text": ["a cat"], "set": ["s"], "category": pa.nulls(1, pa.string()),
                        "subcategory": pa.nulls(1, pa.string()), "source": ["test"]})
    before = {t: (tmp_path / f"{t}.parquet").read_bytes() for t in ("prompts", "labels")}
    with pytest.raises(ValueError, match="repeat a key"):  # the second table fails after the first was merged
        store.upsert_together({"prompts": prompts, "labels": pa.concat_tables([_labels(2), _labels(1)])})
    assert {t: (tmp_path / f"{t}.parquet").read_bytes() for t in before} == before
    assert not list(tmp_path.glob(".*.tmp"))
    assert store.upsert_together({"prompts": prompts, "labels": _labels(2)}) == {"prompts": 1, "labels": 2}
    changed = prompts.set_column(1, "text", pa.array(["a dog"]))
    assert store.upsert_together({"prompts": changed, "labels": _labels(3)}, keep_stored=("prompts",)) == \
        {"prompts": 0, "labels": 1}
    assert store.read("prompts").column("text").to_pylist() == ["a cat"]


def _scores(n, score=0.5):
    return pa.table({"image_id": [f"i{k}" for k in range(n)], "text": ["t"] * n, "reward_model": ["m"] * n,
                     "model_version": ["v"] * n, "score": [score] * n, "run_id": [None] * n,
                     "scored_at": pa.array([0] * n, pa.timestamp("us", tz="UTC"))})


def test_append_missing_adds_only_new_keys_and_refuses_conflicts(tmp_path):
    store = Store(tmp_path)
    assert store.append_missing("scores", _scores(3), compare="score").added == 3
    again = store.append_missing("scores", _scores(5), compare="score")
    assert (again.added, again.already_present) == (2, 3)
    with pytest.raises(ValueError, match="5 rows have a key already stored"):
        store.append_missing("scores", _scores(6, score=0.7), compare="score")
    assert store.read("scores").num_rows == 5
    assert not list(tmp_path.rglob("*.tmp"))


def test_every_table_has_a_view_even_when_empty(tmp_path):
    con = Store(tmp_path).connect()
    for name, spec in TABLES.items():
        assert con.execute(f"SELECT * FROM {name}").fetchall() == []
        assert [d[0] for d in con.execute(f"SELECT * FROM {name}").description] == spec.schema.names


def _writer(root, rounds):
    store = Store(root)
    for r in range(rounds):
        store.upsert("labels", _labels(200, offset=r * 200))


@pytest.mark.slow
def test_readers_never_see_a_torn_file_while_a_writer_writes(tmp_path):
    store = Store(tmp_path)
    store.upsert("labels", _labels(10))
    writer = multiprocessing.get_context("spawn").Process(target=_writer, args=(str(tmp_path), 40))
    writer.start()
    counts = []
    try:
        while writer.is_alive():
            counts.append(store.query_readonly("SELECT count(*) FROM labels")[1][0][0])
    finally:
        writer.join()
    assert writer.exitcode == 0
    assert counts == sorted(counts) and len(counts) > 3
    assert store.read("labels").num_rows == 8000
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_a_store_whose_tables_were_deleted_starts_a_new_life(tmp_path):
    first = Store(tmp_path).store_id
    assert Store(tmp_path).store_id == first
    for table in tmp_path.glob("*.parquet"):
        table.unlink()
    assert Store(tmp_path).store_id != first


def test_the_root_may_be_a_file_url_and_other_file_systems_are_refused_in_one_line(tmp_path, capsys):
    from cli.main import main

    by_url = Store(f"file://{tmp_path}/shared/../store")
    by_url.upsert("prompts", pa.Table.from_pylist([dict(prompt_id="p", text="t", set="s", category=None,
                                                         subcategory=None, source="x")]))
    assert by_url.root == tmp_path / "store"
    assert Store(tmp_path / "store").read("prompts").column("text").to_pylist() == ["t"]
    assert main(["sql", "SELECT count(*) AS n FROM prompts", "--csv", "--store", f"file://{tmp_path}/store"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "1"]
    assert main(["sql", "SELECT 1", "--store", "s3://bucket/tia2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mount s3:// storage as a file system" in err
