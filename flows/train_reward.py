"""The `tia2-train-reward` flow: from people's preferences to a benchmarked reward model in one
run. A reward model is trained on the store's pairs and registered (`tasks/train_reward.py`),
every image with pixels is scored with it (only missing rows, the benchmark's scoring task), and
its preference metrics on the preference sets it was trained on are recorded (whole sets: the
held-out figure is the training run's validation accuracy, in its card and MLflow run).

    prefect deployment run tia2-train-reward/tia2-train-reward --params '{"base": "tiny-clip",
      "sets": ["my-batch"], "name": "my-reward", "settings": {"steps": 200, "learning_rate": 1e-4}}'
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.runtime import deployment, flow_run

from flows.common import CACHED
from flows.tia2_benchmark import score_all
from tasks.preferences import record_preference_metrics
from tasks.train_reward import plan_training, record_train_reward
from tia2.devices import resolve_device
from tia2.specs import parse_spec
from tia2.store import Store, default_store_root
from tia2.tracking import stage_run

# the tables the pairs are read from: an unchanged re-run is a cache hit (not a "NAME is registered")
PAIR_TABLES = ("prompts", "images", "labels", "preference_ranks")


@task(name="train-reward", cache_policy=CACHED, persist_result=True, tags=["gpu"])
def train_reward_task(store_root: str, base: str, sets: list[str], name: str, settings: dict, weights: str,
                      device: str, replace: bool, annotator: str | None, store_key: str, parent_run_id: str) -> dict:
    result = record_train_reward(Store(store_root), base, sets, name, settings, weights, device, replace, annotator,
                                 parent_run_id=parent_run_id)
    state = result.training.state
    return {"name": name, "version": result.version, "run": result.run, "steps": state.step,
            "best_step": state.best_step, "validation_accuracy": state.best[0],
            "untrained_validation_accuracy": result.training.untrained_accuracy,
            "preference_sets": {s: found["annotator"] for s, found in result.data["sets"].items()
                                if found["kind"] == "preferences"}}


@flow(name="tia2-train-reward")
def tia2_train_reward(base: str, sets: list[str], name: str, settings: dict | None = None,
                      weights: str = "pretrained", device: str = "cpu", replace: bool = False,
                      annotator: str | None = None, store: str | None = None, score: bool = True,
                      batch_size: int = 32) -> dict:
    """Train `name` from `base` on the pairs of `sets` (training settings by name in `settings`),
    register it, then (with `score`) score every image with it and record its preference metrics
    on the preference sets among `sets`. `store` defaults to TIA2_STORE or ./storage."""
    device = resolve_device(device)
    data = Store(store or default_store_root(), create=False)
    plan_training(data, base, sets, name, settings, replace, annotator)  # every mistake in one line, before any work
    logger = get_run_logger()
    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.deployment": str(deployment.name or "")}
    with stage_run("tia2-train-reward", {"base": base, "sets": sets, "name": name}, tags=tags) as parent:
        parent_id = parent.info.run_id
        trained = train_reward_task(str(data.root), base, sets, name, settings or {}, weights, device, replace,
                                    annotator, data.fingerprint(*PAIR_TABLES), parent_id)
        logger.info("train-reward: %s", trained)
        summary = {"trained": trained, "scores": None, "preference_accuracy": {}, "mlflow_run_id": parent_id}
        if score:
            summary["scores"] = score_all(data, name, "pretrained", device, batch_size, 1, parent_id)
            logger.info("score %s: %s", name, summary["scores"])
            for set_name, whose in trained["preference_sets"].items():
                result = record_preference_metrics(data, [parse_spec(name)], [set_name], whose, resamples=100,
                                                   parent_run_id=parent_id)
                summary["preference_accuracy"][set_name] = result.rewards[0].figures["accuracy"]
            logger.info("preference accuracy of %s: %s", name, summary["preference_accuracy"])
    return summary
