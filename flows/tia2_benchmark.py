"""The `tia2-benchmark` flow: TIA2 ingest → prompts selected from a pool → contrast prompts for
prompts without any → image generation and image files → annotation batches of the new images
for people (when the config has `annotate`) → scoring with reward models → score import →
metrics of reward specs → HTML report (MLflow, linked from a Prefect artifact).

Each stage is a thin Prefect task over a function in `tasks/`. A task's cache key is its inputs,
the code it runs (`StageCode`, flows/common.py) and the state of the store it reads (the store's
id and a fingerprint of the tables), so an unchanged re-run reports every stage Cached, and a
changed table or module recomputes what reads it.
Runs locally with no server (`tia2 benchmark --config tiny`) or as the `tia2-benchmark`
deployment (prefect.yaml).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import deployment, flow_run

from flows.common import CACHED
from flows.finetune import run_finetune
from tasks.contrast import record_contrast
from tasks.generate import record_generate
from tasks.human_evaluation import benchmark_batches, people_labelled_sets
from tasks.ingest import import_images, ingest_tia2
from tasks.metrics import caption_ranking, format_table2, record_metrics
from tasks.prompts import record_select_from_pool
from tasks.report import record_report, report_markdown, table2_markdown
from tasks.score import import_scores, record_score
from tia2.config import DEFAULT_PROFILE, BenchmarkConfig, resolve_config
from tia2.specs import parse_spec
from tia2.store import Store
from tia2.tracking import stage_run

POOL_SET = "selected"  # the set of prompts picked from the pool


def source_fingerprint(source: str) -> str:
    """Content hash of a local TIA2 folder; a URL (pinned to a commit by default) is its own."""
    path = Path(source)
    if not path.is_dir():
        return source
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*.json")):
        digest.update(file.relative_to(path).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


@task(name="ingest-tia2", cache_policy=CACHED, persist_result=True)
def ingest_task(store_root: str, source: str, sets: tuple[str, ...], source_key: str,
                store_id: str, parent_run_id: str) -> dict:
    store = Store(store_root)
    report = ingest_tia2(store, source, sets)
    with stage_run("ingest-tia2", {"source": source, "sets": sets}, parent_run_id):
        mlflow.log_metrics({f"new_rows/{k}": v for k, v in report["new_rows"].items()})
    return report


@task(name="sample-prompts", cache_policy=CACHED, persist_result=True)
def sample_prompts_task(store_root: str, pool: str, pool_key: str, n: int, k: int, seed: int, set_name: str,
                        store_id: str, parent_run_id: str) -> dict:
    return record_select_from_pool(Store(store_root), pool, n, k, seed, set_name, parent_run_id,
                                   show_progress=False)


@task(name="contrast", cache_policy=CACHED, persist_result=True)
def contrast_task(store_root: str, method: str, prompts_key: str, parent_run_id: str) -> dict:
    """Contrast prompts for the prompts that have none (TIA2's captions come with theirs)."""
    return record_contrast(Store(store_root), method, missing_only=True, parent_run_id=parent_run_id,
                           show_progress=False)


@task(name="import-scores", cache_policy=CACHED, persist_result=True)
def import_scores_task(store_root: str, file: str, file_key: str, store_id: str) -> dict:
    return import_scores(Store(store_root), file)


# A retry makes only the images still missing. One retry, since two shards in threads once failed
# inside DuckDB's parameter binding (not reproduced since, in 36 runs of two shards).
@task(name="generate", cache_policy=CACHED, persist_result=True, tags=["gpu"], retries=1, retry_delay_seconds=1)
def generate_task(store_root: str, model: str, sets: tuple[str, ...], images_per_prompt: int, steps: int,
                  guidance: float, max_prompts: int | None, device: str, shard: tuple[int, int], store_key: str,
                  parent_run_id: str) -> dict:
    report = record_generate(Store(store_root), model, "pretrained", list(sets), images_per_prompt, steps,
                             guidance, max_prompts=max_prompts, device=device, parent_run_id=parent_run_id,
                             shard=shard)
    return {"images": report.images, "already_present": report.already_present, "seconds": report.seconds,
            "identity": report.identity}


@task(name="import-images", cache_policy=CACHED, persist_result=True)
def import_images_task(store_root: str, set_name: str, folder: str, folder_key: str, store_id: str) -> dict:
    return import_images(Store(store_root), set_name, folder)


@task(name="annotate", cache_policy=CACHED, persist_result=True)
def annotate_task(store_root: str, tasks: tuple[str, ...], sets: tuple[str, ...], per_item: int, seed: int,
                  aspects: bool, images_key: str) -> list[dict]:
    """Annotation batches of the sets' images that people have not judged (keyed on the images:
    the same images give the same batches)."""
    return benchmark_batches(Store(store_root), list(tasks), list(sets), per_item=per_item, seed=seed, aspects=aspects)


def metrics_sets(store: Store, config: BenchmarkConfig) -> tuple[str, ...]:
    """The sets the metrics cover: the config's TIA2 sets and, where the config has people
    annotate (`annotate`), the sets they labelled."""
    labelled = people_labelled_sets(store) if config.annotate is not None else []
    return tuple(dict.fromkeys((*config.sets, *labelled)))


@task(name="score", cache_policy=CACHED, persist_result=True, tags=["gpu"])
def score_task(store_root: str, reward_model: str, weights: str, device: str, batch_size: int,
               store_key: str, parent_run_id: str, shard: tuple[int, int] = (0, 1)) -> dict:
    report = record_score(Store(store_root), reward_model, weights, batch_size=batch_size, device=device,
                          parent_run_id=parent_run_id, show_progress=False, shard=shard)
    return {"reward_model": reward_model, "images": report.images, "rows_added": report.rows_added,
            "rows_superseded": report.rows_superseded, "failures": len(report.failures), "seconds": report.seconds}


def score_all(store: Store, reward_model: str, weights: str, device: str, batch_size: int, shards: int,
              parent_run_id: str) -> dict:
    """One score task per shard of the images (side by side under a task runner with several
    workers, e.g. a Dask cluster), summed into one report."""
    # Scoring reads what is to be scored, and the weights of models trained into the store (their
    # cards change with them); the rows it adds must not change its own key.
    store_key = store.fingerprint("prompts", "contrast_prompts", "images", "reward_model_cards")
    reports = [f.result() for f in score_task.map(
        str(store.root), reward_model, weights, device, batch_size, store_key, parent_run_id,
        [(i, shards) for i in range(shards)])]
    images, seconds = sum(r["images"] for r in reports), sum(r["seconds"] for r in reports)
    return {"reward_model": reward_model, "images": images, "rows_added": sum(r["rows_added"] for r in reports),
            "rows_superseded": sum(r["rows_superseded"] for r in reports),
            "failures": sum(r["failures"] for r in reports), "shards": shards,
            "images_per_second": round(images / seconds, 2) if seconds else 0.0}


@task(name="metrics", cache_policy=CACHED, persist_result=True)
def metrics_task(store_root: str, rewards: tuple[str, ...], sets: tuple[str, ...],
                 store_key: str, parent_run_id: str):
    store = Store(store_root)
    return record_metrics(store, [parse_spec(r) for r in rewards], list(sets),
                          parent_run_id=parent_run_id)


def _file_key(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _folder_key(folder: str) -> str:
    """Names, sizes and modification times of a folder's files (cheap; content is hashed on import)."""
    digest = hashlib.sha256()
    for file in sorted(Path(folder).rglob("*")):
        if file.is_file():
            stat = file.stat()
            digest.update(f"{file.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


@flow(name="tia2-benchmark")
def tia2_benchmark(config: str = DEFAULT_PROFILE, overrides: dict | None = None) -> dict:
    """The whole benchmark DAG with the settings of a profile (`tiny`: CPU, tiny models; `paper`:
    the papers' models) or YAML file, and `overrides` of any of its keys (see README,
    Configuration): ingest TIA2, select prompts from a pool, make contrast prompts where missing,
    generate images, register image files, score them, import score files, evaluate reward specs.
    Every setting is checked first: a mistake fails the run in one line, before any work."""
    return run_benchmark(resolve_config(config, overrides))


def run_benchmark(config: BenchmarkConfig) -> dict:
    """The DAG itself, inside the tia2-benchmark flow run (its tasks need the flow's context)."""
    logger = get_run_logger()
    specs = [str(parse_spec(r)) for r in config.rewards]  # as stored: the canonical spelling
    sets = config.sets
    data = Store(config.store)
    params = {"store": str(data.root), "tia2_source": config.tia2_source, "sets": sets, "rewards": specs}
    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.deployment": str(deployment.name or "")}
    with stage_run("tia2-benchmark", params, tags=tags) as parent:
        parent_id = parent.info.run_id
        ingest = ingest_task(str(data.root), config.tia2_source, sets, source_fingerprint(config.tia2_source),
                             data.store_id, parent_id)
        logger.info("ingest: %s", ingest["new_rows"])
        prompt_sets, selected = sets, None
        if config.prompt_pool:
            selected = sample_prompts_task(str(data.root), str(Path(config.prompt_pool).resolve()),
                                           _file_key(config.prompt_pool), config.pool_prompts, config.pool_k,
                                           config.pool_seed, POOL_SET, data.store_id, parent_id)
            prompt_sets = (*sets, POOL_SET)
            logger.info("sample-prompts: %s", selected)
        contrast = contrast_task(str(data.root), config.contrast_method, data.fingerprint("prompts"), parent_id)
        logger.info("contrast: %s new rows for %s prompts without any", contrast["rows_added"], contrast["prompts"])
        generated = None
        if config.generator:
            # one task per shard of the prompts: a task runner with several workers (threads, a
            # Dask cluster) runs them side by side; the `gpu` tag's concurrency limit keeps a
            # single GPU to one at a time
            shards = [(i, config.generate_shards) for i in range(config.generate_shards)]
            reports = [f.result() for f in generate_task.map(
                str(data.root), config.generator, unmapped(prompt_sets), config.images_per_prompt, config.steps,
                config.guidance, config.max_prompts, config.device, shards, data.fingerprint("prompts"), parent_id)]
            made = sum(r["images"] for r in reports)
            generated = {"generator": config.generator, "identity": reports[0]["identity"], "images": made,
                         "shards": config.generate_shards,
                         "already_present": sum(r["already_present"] for r in reports),
                         "images_per_second": round(made / max(sum(r["seconds"] for r in reports), 1e-9), 3),
                         "sets": prompt_sets, "max_prompts": config.max_prompts,
                         "images_per_prompt": config.images_per_prompt, "steps": config.steps,
                         "guidance": config.guidance}
            logger.info("generate: %s", generated)
        registered = []
        for set_name, folder in config.image_folders.items():
            registered.append(import_images_task(str(data.root), set_name, str(Path(folder).resolve()),
                                                 _folder_key(folder), data.store_id))
            logger.info("images %s: %s", set_name, registered[-1])
        annotation = None
        if config.annotate is not None:
            made_sets = (*(prompt_sets if config.generator else ()), *config.image_folders)
            section = config.annotate
            annotation = annotate_task(str(data.root), tuple(section["tasks"]), tuple(dict.fromkeys(made_sets)),
                                       section["per_item"], section["seed"], section["aspects"],
                                       data.fingerprint("images"))
            logger.info("annotate: %s", annotation)
        summary_scores = []
        for name in config.reward_models:
            summary_scores.append(score_all(data, name, config.weights, config.device, config.batch_size,
                                            config.score_shards, parent_id))
            logger.info("score: %s", summary_scores[-1])
        imported = []
        for file in config.score_files:
            imported.append({"file": str(file), **import_scores_task(str(data.root), str(Path(file).resolve()),
                                                                      _file_key(file), data.store_id)})
            logger.info("import %s: %s", file, imported[-1])
        summary = {"ingest": ingest, "selected": selected, "contrast": contrast, "generated": generated,
                   "image_folders": registered, "annotation": annotation, "scores": summary_scores,
                   "score_imports": imported,
                   "caption_ranking": None, "mlflow_run_id": parent_id, "table2": None, "set_means": None}
        ranking = caption_ranking(data, list(config.reward_models)) if config.reward_models else None
        if ranking is not None:
            summary["caption_ranking"] = ranking.to_string(index=False)
        if specs:
            store_key = data.fingerprint("prompts", "contrast_prompts", "images", "labels", "scores")
            means = metrics_task(str(data.root), tuple(specs), metrics_sets(data, config), store_key, parent_id)
            summary["table2"] = format_table2(means)
            summary["set_means"] = means.to_dict("records")
        # also without metrics: the artifact says why there are none
        create_markdown_artifact(key="tia2-table2", markdown=table2_markdown(summary),
                                 description="per-set means of the evaluated reward specs against the human labels")
        if config.finetune:
            summary["finetune"] = run_finetune(data, config.finetune, config.device, parent_id)
        summary["report"] = record_report(data, summary, ranking)
        create_markdown_artifact(key="tia2-report", markdown=report_markdown(summary),
                                 description="the run's HTML report (MLflow) and its stages")
    return summary
