"""Run configuration: profiles (`configs/<name>.yaml`) and the process environment of a run."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from tia2.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROFILES_DIR = PROJECT_ROOT / "configs"
# Every key a benchmark config may set, with its meaning (also printed by `tia2 benchmark --help`).
CONFIG_KEYS = {
    "store": "store root (default: TIA2_STORE or ./storage)",
    "tia2_source": "folder or base URL of the TIA2 release (default: TIA2_SOURCE, else the public repository)",
    "sets": "TIA2 sets to ingest and evaluate (comprehensive, counting, composition)",
    "prompt_pool": "file of prompts (JSON/CSV/Parquet/text) to select diverse prompts from (tia2 sample-prompts); "
                   "they become set `selected`",
    "pool_prompts": "how many prompts to select from the pool (default 100)",
    "pool_k": "neighbours per prompt in the selection graph (default 150, the ImageReward paper's)",
    "pool_seed": "seed of the selection's tie-breaks",
    "contrast_method": "method for prompts without contrast prompts: rules (default) or llm (tia2 contrast)",
    "generator": "diffusion model to make images for the prompts (tia2 generate), e.g. tiny-sd, sd-2-1",
    "images_per_prompt": "images the generator makes per prompt",
    "steps": "denoising steps (TextNorm paper: 50)",
    "guidance": "classifier-free guidance scale (TextNorm paper: 7.5)",
    "max_prompts": "generate for the first N prompts of each set only (all when absent)",
    "generate_shards": "split generation into this many Prefect tasks over shards of the prompts (default 1)",
    "image_folders": "image files to register, {set: folder} (see tia2 import-images)",
    "reward_models": "reward models to score every image with (tia2 score), e.g. [tiny-clip, pickscore]",
    "weights": "weights of those models: pretrained (hub / HF cache), random, or a local path",
    "device": "device for scoring: cpu, cuda, ...",
    "batch_size": "images per scoring batch",
    "score_shards": "score each model as this many Prefect tasks over shards of the images (default 1)",
    "score_files": "score files (Parquet/CSV) to import before the metrics",
    "rewards": "reward specs to evaluate, e.g. textnorm(pickscore, tau=0.01)",
    "finetune": "fine-tuning and its evaluation, a mapping (flows/finetune.py): algos, reward, sets, "
                "max_prompts, model, weights, reward_weights, settings, evaluate",
}


def load_config(profile_or_path: str) -> dict:
    """A profile name (tiny, paper) or a YAML file path; unknown keys are an error."""
    path = Path(profile_or_path)
    if not path.suffix:
        path = PROFILES_DIR / f"{profile_or_path}.yaml"
        if not path.exists():
            names = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
            raise UserError(f"unknown profile {profile_or_path!r} (profiles: {', '.join(names)}; "
                            f"or give a YAML file)")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise UserError(f"{path}: no such config file") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: malformed YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a mapping of settings")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown setting(s) {', '.join(unknown)} "
                        f"(known: {', '.join(CONFIG_KEYS)})")
    if path.parent == PROFILES_DIR and config.get("prompt_pool"):
        # a profile's relative paths are relative to the project, wherever it is run from
        config["prompt_pool"] = str((PROJECT_ROOT / config["prompt_pool"]).resolve())
    return config


def merged_config(profile_or_path: str, overrides: dict | None = None) -> dict:
    """A profile or YAML file with `overrides` on top; unknown keys are an error."""
    settings = load_config(profile_or_path) | (overrides or {})
    unknown = sorted(set(settings) - set(CONFIG_KEYS))
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(unknown)} (known: {', '.join(CONFIG_KEYS)})")
    return settings


def set_prefect_defaults() -> None:
    """Keep Prefect's state in the project (not the home folder) and quiet offline; call before
    importing prefect. Values already in the environment win."""
    home = Path(os.environ.get("PREFECT_HOME", ".prefect")).resolve()
    defaults = {
        "PREFECT_HOME": str(home),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"),
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
