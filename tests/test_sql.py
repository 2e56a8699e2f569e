import json
import os
import subprocess
import sys

import pytest

from tia2.cli import main


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
    ("INSTALL httpfs", "only read-only queries"),
    ("LOAD httpfs", "only read-only queries"),
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
