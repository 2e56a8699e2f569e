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
import tempfile
from pathlib import Path
from typing import Iterator

EXPERIMENT = os.environ.get("TIA2_EXPERIMENT", "tia2")


def tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path('mlruns').resolve() / 'mlflow.db'}"


def _experiment_id() -> str:
    import mlflow

    for name in ("mlflow", "alembic"):  # their INFO lines (DB migrations) are noise on the CLI
        logging.getLogger(name).setLevel(logging.WARNING)

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        folder.mkdir(parents=True, exist_ok=True)
        artifacts = (folder / "artifacts").as_uri()
    return mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)


@contextlib.contextmanager
def stage_run(stage: str, params: dict, parent_run_id: str | None = None,
              tags: dict | None = None) -> Iterator:
    """An MLflow run for one stage, nested under `parent_run_id` when given.

    The parent is passed explicitly: inside Prefect tasks (threads) MLflow's implicit nesting
    silently makes top-level runs.
    """
    import mlflow

    experiment_id = _experiment_id()
    with mlflow.start_run(run_name=stage, experiment_id=experiment_id,
                          parent_run_id=parent_run_id, nested=parent_run_id is not None, tags={"tia2.stage": stage, **(tags or {})}) as run:
        mlflow.log_params({k: _param(v) for k, v in params.items()})
        yield run


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
