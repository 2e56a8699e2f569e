"""Two benchmark runs at once on one store, and a reader querying the store throughout a
re-score: the store stays consistent and the reader sees no errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.project import PROJECT
from tia2.store import TABLES, Store

pytestmark = [pytest.mark.slow, pytest.mark.prefect_server]


def _env(tmp_path, name, mini_release, isolated_tracking):
    return dict(os.environ, PREFECT_HOME=str(tmp_path / f"prefect-{name}"), TIA2_SOURCE=str(mini_release),
                MLFLOW_TRACKING_URI=f"sqlite:///{isolated_tracking}/mlflow-{name}.db", PYTHONPATH=str(PROJECT),
                HF_HUB_OFFLINE="1")


def test_two_runs_at_once_and_a_reader_during_a_rescore(tmp_path, mini_release, isolated_tracking):
    store_root = tmp_path / "store"
    config = tmp_path / "run.yaml"
    config.write_text(f"store: {store_root}\nsets: [counting, composition]\ngenerator: tiny-sd\n"
                      "images_per_prompt: 2\nsteps: 2\nreward_models: [tiny-clip, tiny-hpsv2]\nweights: random\n")
    runs = [subprocess.Popen([sys.executable, "-m", "cli", "benchmark", "--config", str(config)],
                             env=_env(tmp_path, name, mini_release, isolated_tracking), cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-3000:]

    store = Store(store_root)
    con = store.connect()
    for table, spec in TABLES.items():  # no key stored twice
        key = ", ".join(f'"{k}"' for k in spec.key)
        assert con.execute(f"SELECT count(*) - count(DISTINCT ({key})) FROM {table}").fetchall() == [(0,)], table
    # 2 sets x 2 captions x 2 images; each scored against its caption and 3 contrast prompts
    assert con.execute("SELECT count(*) FROM images WHERE path IS NOT NULL").fetchall() == [(8,)]
    assert con.execute("SELECT reward_model, count(*) FROM scores GROUP BY ALL ORDER BY 1").fetchall() == [
        ("tiny-clip", 32), ("tiny-hpsv2", 32)]

    rescore = subprocess.Popen([sys.executable, "-m", "cli", "--store", str(store_root), "score",
                                "--reward-model", "tiny-aesthetic", "--random-init"],
                               env=_env(tmp_path, "c", mini_release, isolated_tracking), cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, errors = [], []
    while rescore.poll() is None or not seen:
        try:
            _, rows = store.query_readonly("SELECT count(*) FROM scores")
            seen.append(rows[0][0])
        except Exception as exc:  # noqa: BLE001 - any error a reader sees is the failure under test
            errors.append(repr(exc))
    assert rescore.wait(timeout=600) == 0, rescore.stderr.read()[-3000:]
    assert errors == []
    assert seen == sorted(seen) and len(seen) > 1  # rows only ever appear
    assert store.connect().execute("SELECT count(*) FROM scores").fetchall() == [(96,)]
