"""The `tia2-rescore` flow, scheduled nightly by prefect.yaml: score the (image, text, reward
model) rows still missing — new images, new contrast prompts, a reward model added to the
config — refresh the metrics (recomputed when labels arrived too: people's answers in the
annotation app write labels; with the config's `annotate` section the metrics also cover the
sets people labelled), and post a Prefect table artifact of what changed.

It reuses the benchmark flow's scoring and metrics tasks, so a model whose inputs did not change
is a cache hit, and scoring itself only ever computes missing rows.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import deployment, flow_run

from flows.tia2_benchmark import metrics_sets, metrics_task, score_all
from tia2.config import DEFAULT_PROFILE, BenchmarkConfig, merged_config
from tia2.specs import parse_spec
from tia2.store import Store
from tia2.tracking import stage_run


def score_counts(store: Store) -> dict[str, int]:
    """Stored score rows per reward model."""
    rows = store.connect().execute("SELECT reward_model, count(*) FROM scores GROUP BY ALL").fetchall()
    return dict(rows)


@flow(name="tia2-rescore")
def tia2_rescore(config: str = DEFAULT_PROFILE, overrides: dict | None = None) -> dict:
    """Score what is missing for the config's reward models and refresh its reward specs' metrics."""
    run_config = BenchmarkConfig.from_settings(merged_config(config, overrides))  # checked first, before any work
    logger = get_run_logger()
    rewards = [str(parse_spec(r)) for r in run_config.rewards]
    store = Store(run_config.store, create=False)
    root = str(store.root)
    before = score_counts(store)
    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.deployment": str(deployment.name or "")}
    with stage_run("tia2-rescore", {"config": config, "reward_models": list(run_config.reward_models)},
                   tags=tags) as parent:
        parent_id = parent.info.run_id
        superseded = {}
        for name in run_config.reward_models:
            report = score_all(store, name, run_config.weights, run_config.device, run_config.batch_size,
                               run_config.score_shards, parent_id)
            superseded[name] = report["rows_superseded"]
            logger.info("score: %s", report)
        after = score_counts(store)
        # rows_recomputed: rows of older scoring code, replaced by the current version's
        changed = [{"reward_model": model, "rows_before": before.get(model, 0), "rows_after": n,
                    "rows_added": n - before.get(model, 0),
                    "rows_recomputed": superseded.get(model, 0)} for model, n in sorted(after.items())]
        if rewards:
            store_key = store.fingerprint("prompts", "contrast_prompts", "images", "labels", "scores")
            metrics_task(root, tuple(rewards), metrics_sets(store, run_config), store_key, parent_id)
    create_table_artifact(key="tia2-rescore", table=changed,
                          description=f"score rows per reward model before and after (MLflow run {parent_id})")
    return {"changed": changed, "mlflow_run_id": parent_id}
