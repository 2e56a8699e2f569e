import math

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tasks.ingest import ingest_tia2
from tests.support.scores import synthetic_score_table
from cli.main import main
from tia2.store import Store


@pytest.fixture
def mini_store(tmp_path, mini_release):
    store = Store(tmp_path / "store")
    ingest_tia2(store, str(mini_release))
    return store


@pytest.fixture
def good_rows(mini_store):
    return synthetic_score_table(mini_store, {"clip": 1.0}, seed=0)


def _write(table, path):
    if path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


def _import(store, path, capsys, *options):
    code = main(["import-scores", str(path), *options, "--store", str(store.root)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_import_then_reimport_is_idempotent(tmp_path, mini_store, good_rows, capsys, suffix):
    path = _write(good_rows, tmp_path / f"scores{suffix}")
    code, out, _ = _import(mini_store, path, capsys)
    assert code == 0 and f"{good_rows.num_rows} added" in out
    stored = mini_store.read("scores")
    assert stored.num_rows == good_rows.num_rows == 24 * (1 + 3)
    assert set(stored.column("model_version").to_pylist()) == {"imported"}
    code, out, _ = _import(mini_store, path, capsys)
    assert code == 0 and "0 added" in out
    assert mini_store.read("scores").num_rows == good_rows.num_rows


def _replace(table, column, index, value):
    values = table.column(column).to_pylist()
    values[index] = value
    return table.set_column(table.schema.get_field_index(column), column, pa.array(values))


@pytest.mark.parametrize("edit, message", [
    (lambda t: _replace(t, "image", 2, "nope.jpg"), "1 rows refer to an unknown (set, image) (first: row 3: 'composition', 'nope.jpg')"),
    (lambda t: _replace(t, "set", 0, "other"), "1 rows refer to an unknown (set, image) (first: row 1: 'other'"),
    (lambda t: _replace(t, "prompt", 4, "a photo of a dog"), "1 rows have a prompt that is neither the image's caption nor one of its contrast prompts (first: row 5"),
    (lambda t: _replace(_replace(t, "score", 1, math.nan), "score", 7, math.inf), "2 rows have a non-finite score (first: row 2: nan; row 8: inf)"),
    (lambda t: pa.concat_tables([t, t.slice(3, 2)]), "2 rows repeat a key (set, image, prompt, reward_model, model_version) of an earlier row"),
    (lambda t: t.drop(["score"]), "missing column(s) score"),
])
def test_bad_rows_are_reported_and_nothing_is_written(tmp_path, mini_store, good_rows, capsys, edit, message):
    path = _write(edit(good_rows), tmp_path / "bad.parquet")
    code, _, err = _import(mini_store, path, capsys)
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err
    assert mini_store.read("scores").num_rows == 0


def test_all_problems_are_listed_at_once(tmp_path, mini_store, good_rows, capsys):
    bad = _replace(_replace(good_rows, "image", 0, "x.jpg"), "score", 5, None)
    code, _, err = _import(mini_store, _write(bad, tmp_path / "bad.parquet"), capsys)
    assert code == 2 and "2 problem(s)" in err and "unknown (set, image)" in err and "1 rows have no score" in err


def test_non_numeric_csv_score_is_rejected(tmp_path, mini_store, good_rows, capsys):
    bad = good_rows.set_column(4, "score", pa.array([str(v) for v in good_rows.column("score").to_pylist()]))
    bad = _replace(bad, "score", 0, "high")
    code, _, err = _import(mini_store, _write(bad, tmp_path / "bad.csv"), capsys)
    assert code == 2 and "1 rows have a score that is not a number (first: row 1: 'high')" in err


def test_changed_score_for_a_stored_key_is_a_conflict(tmp_path, mini_store, good_rows, capsys):
    assert _import(mini_store, _write(good_rows, tmp_path / "a.parquet"), capsys)[0] == 0
    changed = _replace(good_rows, "score", 0, 99.0)
    code, _, err = _import(mini_store, _write(changed, tmp_path / "b.parquet"), capsys)
    assert code == 2 and "1 rows have another score than the one stored" in err and "file 99.0" in err
    assert "--replace replaces the stored scores, a new model_version keeps both" in err
    assert mini_store.read("scores").num_rows == good_rows.num_rows
    # The same scores under a new model_version are a new version, not a conflict.
    versioned = changed.append_column("model_version", pa.array(["v2"] * changed.num_rows))
    assert _import(mini_store, _write(versioned, tmp_path / "c.parquet"), capsys)[0] == 0
    assert mini_store.read("scores").num_rows == 2 * good_rows.num_rows


def test_unknown_file_type_and_missing_file(tmp_path, mini_store, capsys):
    (tmp_path / "s.txt").write_text("x")
    assert _import(mini_store, tmp_path / "s.txt", capsys)[2].count("unknown file type") == 1
    assert "no such file" in _import(mini_store, tmp_path / "none.csv", capsys)[2]



def test_replace_gives_stored_keys_the_files_scores_all_or_none(tmp_path, mini_store, good_rows, capsys, monkeypatch):
    half = good_rows.num_rows // 2
    assert _import(mini_store, _write(good_rows.slice(0, half), tmp_path / "a.parquet"), capsys)[0] == 0
    assert _import(mini_store, _write(good_rows.slice(half), tmp_path / "b.parquet"), capsys)[0] == 0
    changed = _replace(_replace(good_rows, "score", 0, 99.0), "score", good_rows.num_rows - 1, -99.0)
    path = _write(changed, tmp_path / "c.parquet")  # a row of each stored part changes
    scores_dir = mini_store.root / "scores"
    parts = sorted(p.read_bytes() for p in scores_dir.glob("*.parquet"))

    stage, staged = Store._stage_file, []

    def stage_then_fail(path, table):
        staged.append(path)
        if len(staged) == 2:  # the first new file is on disk already
            raise OSError(28, "No space left on device")
        return stage(path, table)

    monkeypatch.setattr(Store, "_stage_file", staticmethod(stage_then_fail))
    with pytest.raises(OSError):
        _import(mini_store, path, capsys, "--replace")
    assert sorted(p.read_bytes() for p in scores_dir.glob("*.parquet")) == parts
    assert not list(scores_dir.glob(".*.tmp"))
    monkeypatch.undo()

    code, out, _ = _import(mini_store, path, capsys, "--replace")
    assert code == 0 and "0 added, 2 replaced" in out
    scores = mini_store.read("scores").column("score").to_pylist()
    assert len(scores) == good_rows.num_rows and {99.0, -99.0} <= set(scores)
    assert "0 replaced" in _import(mini_store, path, capsys, "--replace")[1]
