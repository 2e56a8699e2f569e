"""The `tia2-finetune` flow: LoRA fine-tuning of a generator against a reward spec (RWR, DDPO,
ReFL; `tasks/finetune.py`), then the evaluation of every checkpoint against the base model on
held-out prompts (`tasks/evaluate_finetune.py`). The benchmark flow runs the same two stages when
its config has a `finetune` section, so the embedded default ends with a short fine-tune.

The config's `finetune` section (see README, Configuration):

    finetune:
      algos: [refl]                 # any of rwr, ddpo, refl
      reward: tiny-clip             # the spec to maximise
      sets: [selected]              # training prompts (default: all)
      max_prompts: 4
      model: tiny-sd                # default: the config's generator
      weights: random               # the generator's weights (default pretrained)
      reward_weights: random        # the reward models' weights (default: the config's weights)
      settings: {steps: 10, ...}    # any of tasks/finetune.py's SETTING_NAMES, on top of the paper's;
                                    # kl_beta: sweep runs RWR for each β and keeps the paper's pick
      evaluate: {gold: tiny-pickscore, sets: [composition], max_prompts: 4, images_per_prompt: 2,
                 steps: 10, guidance: 7.5, rewards: [...]}   # held-out prompts of these sets
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.runtime import deployment, flow_run

from flows.common import CACHED
from tasks.evaluate_finetune import record_evaluate_finetune
from tasks.finetune import paper_config, record_finetune, sweep_kl_coefficient
from tasks.report import finetune_rows
from tia2.artifacts import records
from tia2.config import DEFAULT_PROFILE, BenchmarkConfig, finetune_section, hyperparameters, merged_config
from tia2.store import Store
from tia2.tracking import stage_run


@task(name="finetune", cache_policy=CACHED, persist_result=True, tags=["gpu"])
def finetune_task(store_root: str, algo: str, section: dict, device: str, prompts_key: str,
                  parent_run_id: str) -> dict:
    """Train (or continue) one algorithm's adapter; its checkpoints are in the store."""
    store = Store(store_root)
    config = paper_config(algo, section["reward"], **hyperparameters(section))
    options = dict(sets=section.get("sets"), max_prompts=section.get("max_prompts"), weights=section["weights"],
                   reward_weights=section["reward_weights"], device=device, parent_run_id=parent_run_id)
    swept = None
    if algo == "rwr" and section["settings"].get("kl_beta") == "sweep":
        swept = sweep_kl_coefficient(store, section["model"], config, **options)
        result = swept.runs[swept.chosen]  # the run that goes on to the evaluation
    else:
        result = record_finetune(store, section["model"], config, **options)
    # the last checkpoint, also when an earlier run already trained to the target
    step, mean_reward, wins, n_eval = store.connect().execute(
        "SELECT step, mean_reward, wins, n_eval FROM finetune_checkpoints WHERE run = ? ORDER BY step DESC LIMIT 1",
        [result.run]).fetchone()
    return {"algo": algo, "run": result.run, "folder": str(result.folder), "final_step": step,
            "selected_step": result.selected_step, "base_mean_reward": result.base_mean_reward,
            "final_mean_reward": mean_reward, "final_wins": f"{wins}/{n_eval}",
            **({"kl_beta": swept.chosen, "wins_by_kl_beta": swept.wins} if swept else {})}


@task(name="evaluate", cache_policy=CACHED, persist_result=True, tags=["gpu"])
def evaluate_task(store_root: str, run: str, section: dict, device: str, store_key: str,
                  parent_run_id: str) -> dict:
    """A fine-tuning run's checkpoints against the base model on held-out prompts: the tables as
    rows (the report draws and lays them out) and the images compared, base first."""
    evaluate = section["evaluate"]
    result = record_evaluate_finetune(
        Store(store_root), section["model"], evaluate["gold"], run=run, sets=evaluate.get("sets"),
        max_prompts=evaluate.get("max_prompts"), images_per_prompt=evaluate.get("images_per_prompt", 4),
        denoise_steps=evaluate.get("steps", 50), guidance=evaluate.get("guidance", 7.5),
        rewards=evaluate.get("rewards", ()), weights=section["weights"], reward_weights=section["reward_weights"],
        device=device, parent_run_id=parent_run_id)
    return {"run": run, "proxy": result.proxy, "gold": result.gold, "heldout_prompts": len(result.prompts),
            "win_tie_loss": records(result.win_tie_loss.drop(columns=["path", "lora"])),
            "steps_curve": records(result.steps_curve), "best_of_n_curve": records(result.best_of_n_curve),
            "images": records(result.frame[["variant", "set", "prompt_id", "caption", "ordinal", "image_id"]])}


def run_finetune(store: Store, section: dict, device: str, parent_run_id: str) -> list[dict]:
    """Every configured algorithm, one after the other (they share the GPU), each followed by the
    evaluation of its checkpoints when the section has one; each logged in a line a stage."""
    logger = get_run_logger()
    prompts_key = store.fingerprint("prompts", "contrast_prompts", "reward_model_cards")  # cards: trained rewards
    reports = []
    for algo in section["algos"]:
        report = finetune_task(str(store.root), algo, section, device, prompts_key, parent_run_id)
        if section["evaluate"]:
            store_key = store.fingerprint("prompts", "contrast_prompts", "finetune_checkpoints", "reward_model_cards")
            report["evaluation"] = evaluate_task(str(store.root), report["run"], section, device, store_key,
                                                 parent_run_id)
        for stage, result in finetune_rows(report):
            logger.info("%s: %s", stage, result)
        reports.append(report)
    return reports


@flow(name="tia2-finetune")
def tia2_finetune(config: str = DEFAULT_PROFILE, overrides: dict | None = None) -> dict:
    """Fine-tune and evaluate with the `finetune` section of a profile (`tiny`, `paper`) or YAML
    file, with `overrides` of any config key on top. The store must hold the prompts (run
    tia2-benchmark, or `tia2 ingest-tia2` / `tia2 sample-prompts`, first)."""
    settings = merged_config(config, overrides)  # every setting checked first, before any work
    section = finetune_section(settings)
    run_config = BenchmarkConfig.from_settings(settings)
    store = Store(run_config.store, create=False)
    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.deployment": str(deployment.name or "")}
    with stage_run("tia2-finetune", {"config": config, "algos": section["algos"], "reward": section["reward"]},
                   tags=tags) as parent:
        trained = run_finetune(store, section, run_config.device, parent.info.run_id)
    return {"finetune": trained, "mlflow_run_id": parent.info.run_id}
