"""MLflow tracking: where runs go, and one helper to open a stage's run.

Default store: `sqlite:///<cwd>/mlruns/mlflow.db` with artifacts under `mlruns/artifacts` (MLflow
3.17's file store needs an opt-in flag; see ../shared/NOTES.md). `MLFLOW_TRACKING_URI` or
`--mlflow-uri` point elsewhere, e.g. a tracking server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Iterator

EXPERIMENT = os.environ.get("TIA2_EXPERIMENT", "tia2")
# MLflow's experiment type for classic training runs (metrics, params, artifacts), the tag its UI's
# type setting writes. MLflow 3.17's UI opens every experiment by its GenAI / Model training
# switch (GenAI unless told), which a link sets with WORKFLOW_QUERY.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
WORKFLOW_QUERY = "?workflowType=machine_learning"


def tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path('mlruns').resolve() / 'mlflow.db'}"


def _experiment_id() -> str:
    import mlflow

    for name in ("mlflow", "alembic"):  # their INFO lines (DB migrations) are noise on the CLI
        logging.getLogger(name).setLevel(logging.WARNING)
    # with a tracking server MLflow prints two links a run on stdout, to its GenAI view; the
    # report, the Prefect artifacts and `tia2 benchmark` give the run's own (run_page_url)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        for key, value in EXPERIMENT_KIND.items() - experiment.tags.items():  # made before tia2 set the type
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        folder.mkdir(parents=True, exist_ok=True)
        artifacts = (folder / "artifacts").as_uri()
    return mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts, tags=EXPERIMENT_KIND)


@contextlib.contextmanager
def stage_run(stage: str, params: dict, parent_run_id: str | None = None,
              tags: dict | None = None, label: str | None = None) -> Iterator:
    """An MLflow run for one stage, nested under `parent_run_id` when given, named
    "<stage> <label>" with a label (the model, the shard: a stage runs several times under one
    parent) and tagged `tia2.stage`. A top-level run first marks the runs that killed processes
    of this host left RUNNING as KILLED.

    The parent is passed explicitly: inside Prefect tasks (threads) MLflow's implicit nesting
    silently makes top-level runs.
    """
    import mlflow

    experiment_id = _experiment_id()
    if parent_run_id is None:
        end_runs_of_dead_processes(experiment_id)
    tags = {"tia2.stage": stage, "tia2.host": socket.gethostname(), "tia2.pid": str(os.getpid()), **(tags or {})}
    with mlflow.start_run(run_name=f"{stage} {label}" if label else stage, experiment_id=experiment_id,
                          parent_run_id=parent_run_id, nested=parent_run_id is not None, tags=tags) as run:
        mlflow.log_params({k: _param(v) for k, v in params.items()})
        yield run


def end_runs_of_dead_processes(experiment_id: str) -> None:
    """Mark the experiment's RUNNING runs whose process (tags tia2.host, tia2.pid) is gone from
    this host as KILLED: a killed process never ends its runs. Runs of live processes, e.g. a
    concurrent run, and of other hosts are left alone."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    running = client.search_runs([experiment_id],
                                 f"attributes.status = 'RUNNING' AND tags.`tia2.host` = '{socket.gethostname()}'")
    for run in running:
        if not _process_exists(int(run.data.tags["tia2.pid"])):
            client.set_terminated(run.info.run_id, status="KILLED")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process is there
    except ProcessLookupError:
        return False
    except PermissionError:  # there, but another user's
        pass
    return True


def run_label(name: str, shard: tuple[int, int]) -> str:
    """What one shard of a stage works on, for its run name and progress bar: the model, and the
    shard when the work is split ("tiny-clip shard 1/2")."""
    index, count = shard
    return name if count == 1 else f"{name} shard {index + 1}/{count}"


def run_page_url(run_id: str, artifact: str | None = None, server: str | None = None) -> str | None:
    """The page of a run, or of one of its artifacts, in the MLflow UI at `server`; by default the
    tracking server when runs go to one (http/https), else None: a local store has no UI until
    someone starts one (`mlflow ui`)."""
    uri = tracking_uri()
    server = server or (uri if uri.startswith(("http://", "https://")) else None)
    if server is None:
        return None
    from mlflow.tracking import MlflowClient

    experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    page = f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return page + (f"/artifacts/{artifact}" if artifact else "") + WORKFLOW_QUERY


def artifact_reference(run_id: str, artifact: str) -> str:
    """Markdown for one artifact of a run, for a Prefect artifact: a link to its MLflow UI view
    with a tracking server, else where it is as plain text (a file:// link is dead in a browser's
    web page)."""
    url = run_page_url(run_id, artifact)
    if url:
        return f"[{artifact}]({url})"
    from urllib.parse import unquote, urlparse

    from mlflow.tracking import MlflowClient

    location = f"{MlflowClient(tracking_uri()).get_run(run_id).info.artifact_uri}/{artifact}"
    parsed = urlparse(location)
    return f"`{unquote(parsed.path) if parsed.scheme in ('', 'file') else location}`"


def _param(value) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text[:6000]


def metric_key(*parts: str) -> str:
    """MLflow metric names allow letters, digits and _-./ and spaces; specs have more."""
    return "/".join(re.sub(r"[^A-Za-z0-9_.\- ]+", "_", p).strip("_") for p in parts)


def log_figure(fig, name: str) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    mlflow.log_figure(fig, name)
    plt.close(fig)


def log_text_files(files: dict[str, str]) -> None:
    """Log text artifacts given as {relative name: content}."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
        mlflow.log_artifacts(tmp)
