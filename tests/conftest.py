"""Shared fixtures: the real TIA2 release from ../shared (tests using it skip cleanly when it is
absent), a small constructed release for error cases, an isolated MLflow state, and a Prefect
server for the session's flow runs. Helpers that are not fixtures are in tests/support/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.prefect_server import SERVER_GROUP, prefect_server
from tests.support.project import SHARED_TIA2
from tests.support.stores import make_release, write_images


@pytest.fixture(autouse=True)
def isolated_tracking(tmp_path_factory, monkeypatch):
    """Each test logs to its own MLflow store and never touches the project's mlruns/."""
    import mlflow

    root = tmp_path_factory.mktemp("mlruns")
    uri = f"sqlite:///{root}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # the process-wide URI an earlier test's run may have set wins over the variable
    monkeypatch.delenv("TIA2_STORE", raising=False)
    monkeypatch.delenv("TIA2_SOURCE", raising=False)
    return root


@pytest.fixture(scope="session")
def tia2_source() -> Path:
    if not (SHARED_TIA2 / "human_annotations").is_dir():
        pytest.skip("../shared/data/tia2 is not present")
    return SHARED_TIA2


@pytest.fixture(scope="session")
def real_scores_file(tmp_path_factory, tia2_source) -> Path:
    """Synthetic scores of two models for every image of the real benchmark, caption and
    contrast rows, in the import format."""
    import pyarrow.parquet as pq

    from tasks.ingest import ingest_tia2
    from tests.support.scores import synthetic_score_table
    from tia2.store import Store

    scratch = Store(tmp_path_factory.mktemp("scratch") / "store")
    ingest_tia2(scratch, str(tia2_source))
    path = tmp_path_factory.mktemp("scores") / "scores.parquet"
    pq.write_table(synthetic_score_table(scratch, {"alpha": 2.0, "beta": 0.7}, seed=1), path)
    return path


@pytest.fixture(scope="session")
def real_store(tmp_path_factory, tia2_source, real_scores_file):
    """The real benchmark ingested once per session, with `real_scores_file` imported.
    Tests must not write to it (use `copy_store`)."""
    from tasks.ingest import ingest_tia2
    from tasks.score import import_scores
    from tia2.store import Store

    store = Store(tmp_path_factory.mktemp("real") / "store")
    ingest_tia2(store, str(tia2_source))
    import_scores(store, real_scores_file)
    return store


@pytest.fixture
def mini_release(tmp_path) -> Path:
    return make_release(tmp_path / "release")


@pytest.fixture
def image_store(tmp_path, mini_release):
    """`mini_release` ingested, with random JPEGs registered for its counting and composition images."""
    from tasks.ingest import import_images, ingest_tia2
    from tia2.store import Store

    store = Store(tmp_path / "store")
    ingest_tia2(store, str(mini_release))
    images = write_images(mini_release, tmp_path / "images")
    for set_name in ("counting", "composition"):
        result = import_images(store, set_name, images / set_name)
        assert result["registered"] == 8 and result["unmatched_files"] == 0
    return store


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> str:
    """The API URL of one `prefect server start` for the session. A flow process given it as
    PREFECT_API_URL starts no temporary server of its own, which takes about 25 s (the server's
    imports, a new database's migrations). Tests using it are marked `prefect_server` (below)."""
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as api:
        yield api


# Tests marked `prefect_server` run flows against a Prefect server: the session's (`prefect_api`),
# a temporary one of their own (what a flow process without PREFECT_API_URL starts), or one that
# `prefect server start` runs. Under pytest-xdist (`make test` runs two workers) they share one
# worker, one after the other: two servers starting at once on one machine raced for a port and
# timed out, and the session's server starts once.
@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups (into node ids)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("prefect_server"):
            item.add_marker(pytest.mark.xdist_group(SERVER_GROUP))
