import contextlib
import json
import os
import subprocess
import sys
import tracemalloc

import pytest

from cli.main import main
from cli.sql import TABLE_VIEW_ROWS
from tia2.store import TABLES, Store


def test_select_prints_a_table_csv_and_json(real_store, capsys):
    query = "SELECT set, count(*) AS n FROM images GROUP BY set ORDER BY set"
    assert main(["sql", query, "--store", str(real_store.root)]) == 0
    out = capsys.readouterr().out
    assert "composition" in out and "15000" in out and "(3 rows)" in out
    assert main(["sql", query, "--csv", "--store", str(real_store.root)]) == 0
    assert capsys.readouterr().out.splitlines() == ["set,n", "composition,15000", "comprehensive,5000", "counting,7500"]
    assert main(["sql", query, "--json", "--store", str(real_store.root)]) == 0
    assert json.loads(capsys.readouterr().out)[2] == {"set": "counting", "n": 7500}


@pytest.mark.parametrize("query, message", [
    ("DELETE FROM scores", "only read-only queries"),
    ("CREATE TABLE x AS SELECT 1", "only read-only queries"),
    ("COPY prompts TO 'out.csv'", "only read-only queries"),
    ("ATTACH 'other.db'", "only read-only queries"),
    ("INSTALL httpfs", "only read-only queries (SELECT, EXPLAIN) are allowed, not INSTALL:"),
    ("LOAD httpfs", "only read-only queries (SELECT, EXPLAIN) are allowed, not LOAD:"),
    ("SET enable_external_access = true", "only read-only queries"),
    ("SELECT * FROM read_csv('/etc/passwd')", "not allowed"),
    ("SELECT * FROM read_parquet('/tmp/../etc/x.parquet')", "not allowed"),
    ("SELECT 1; SELECT 2", "exactly one SQL statement"),
    ("SELEC 1", "SQL error"),
    ("SELECT * FROM no_such_table", "SQL error"),
])
def test_writes_and_outside_access_fail_clearly(real_store, capsys, query, message):
    assert main(["sql", query, "--store", str(real_store.root)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_catalog_works_from_any_directory(real_store, tmp_path):
    """The tia2.duckdb file itself, opened by plain DuckDB from another folder, sees the tables."""
    code = ("import duckdb; con = duckdb.connect(%r, read_only=True); "
            "print(con.execute('SELECT count(*) FROM labels').fetchall()[0][0])") % str(real_store.catalog_path)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "82500"


def test_no_store_is_a_clear_error(tmp_path, capsys):
    assert main(["sql", "SELECT 1", "--store", str(tmp_path / "none")]) == 2
    assert "no store at" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_store_from_environment(real_store, capsys, monkeypatch):
    monkeypatch.setenv("TIA2_STORE", str(real_store.root))
    monkeypatch.chdir(os.path.dirname(real_store.root))
    assert main(["sql", "SELECT count(*) AS n FROM prompts", "--csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "550"


@pytest.fixture
def empty_store(tmp_path):
    return Store(tmp_path / "store")


def test_the_table_view_shows_the_first_rows_and_says_how_to_get_all(empty_store, capsys):
    query = "SELECT range AS i FROM range(250)"
    assert main(["sql", query, "--store", str(empty_store.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.strip() for line in lines[1:-1]] == [str(i) for i in range(TABLE_VIEW_ROWS)]
    assert lines[-1] == f"(the first {TABLE_VIEW_ROWS} rows; more with --limit N, all with --limit 0 or --csv/--json)"
    assert main(["sql", query, "--limit", "0", "--store", str(empty_store.root)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "(250 rows)"
    assert main(["sql", query, "--limit", "250", "--store", str(empty_store.root)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "(250 rows)"  # all of them: no note
    assert main(["sql", query, "--limit", "-1", "--store", str(empty_store.root)]) == 2
    assert "--limit: must be a whole number of at least 0 (got '-1')" in capsys.readouterr().err


def test_csv_and_json_stream_every_row_in_bounded_memory(empty_store, capsys, tmp_path):
    out = tmp_path / "out.csv"
    main(["sql", "SELECT 1", "--csv", "--store", str(empty_store.root)])  # first imports: not the rows
    capsys.readouterr()
    with out.open("w") as fh, contextlib.redirect_stdout(fh):
        tracemalloc.start()
        try:
            assert main(["sql", "SELECT range AS i FROM range(200000)", "--csv", "--store", str(empty_store.root)]) == 0
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert out.read_text().splitlines() == ["i", *map(str, range(200000))]
    assert peak < 5e6  # all 200,000 rows at once, as Python tuples: about 18 MB
    with empty_store.stream_readonly("SELECT * FROM range(25000)", batch_rows=10000) as (columns, batches):
        assert columns == ["range"] and [len(b) for b in batches] == [10000, 10000, 5000]
    assert main(["sql", "SELECT range AS i FROM range(5)", "--json", "--limit", "3",
                 "--store", str(empty_store.root)]) == 0
    assert json.loads(capsys.readouterr().out) == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert main(["sql", "SELECT 1 AS i WHERE false", "--json", "--store", str(empty_store.root)]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_a_query_failing_halfway_is_one_line(empty_store, capsys):
    query = "SELECT CAST(CASE WHEN range < 15000 THEN '1' ELSE 'x' END AS INTEGER) FROM range(20000)"
    assert main(["sql", query, "--csv", "--store", str(empty_store.root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tia2 sql: error: SQL error: Conversion Error") and err.count("\n") == 1


def test_help_lists_every_table_with_its_columns(capsys):
    with pytest.raises(SystemExit) as done:
        main(["sql", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, spec in TABLES.items():
        assert f" {name} {', '.join(spec.schema.names)}" in text
