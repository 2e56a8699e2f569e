"""Run configuration: profiles (`configs/<name>.yaml`), the keys a config may set with the check of
each value, and the process environment of a run.

Every key is checked before any work (`check_config`, called by `merged_config`): a wrong type, an
unknown model or generator, a missing file or GPU is one UserError line listing every problem,
not a failed Prefect task minutes later."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import yaml

from tia2.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROFILES_DIR = PROJECT_ROOT / "configs"
DEFAULT_PROFILE = "tiny"  # CPU and tiny models: what a run without a config does


# --- checks of values: each returns what is wrong with a value, or None ------------------------
KIND_NAMES = {"int": "a whole number", "float": "a finite number", "bool": "true or false", "str": "text"}


def has_kind(value, kind: str) -> bool:
    """Whether `value` is of a kind of KIND_NAMES (a bool is no number, though Python says so)."""
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "float":  # YAML's .nan and .inf are floats, but no setting means them
        return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    return not isinstance(value, bool) and isinstance(value, {"int": int, "str": str}[kind])


def _whole(minimum: int | None = None) -> Callable:
    def check(value):
        if not has_kind(value, "int") or (minimum is not None and value < minimum):
            return f"must be a whole number{'' if minimum is None else f' of at least {minimum}'} (got {value!r})"
    return check


def _number(value):
    if not has_kind(value, "float"):
        return f"must be a finite number (got {value!r})"


def _text(value):
    if not has_kind(value, "str"):
        return f"must be text (got {value!r})"


def _one_of(*choices: str) -> Callable:
    def check(value):
        if value not in choices:
            return f"must be one of {', '.join(choices)} (got {value!r})"
    return check


def _names(value):
    if not isinstance(value, list) or not all(has_kind(v, "str") for v in value):
        return f"must be a list of names (got {value!r})"


def _mapping(value):
    if not isinstance(value, dict):
        return f"must be a mapping of settings (got {value!r})"


def _flag(value):
    if not has_kind(value, "bool"):
        return f"must be true or false (got {value!r})"


def _tasks(value):
    from tia2.annotation import TASKS

    return _names(value) or (None if value else "must name at least one task") or _unknown("task(s)", value, list(TASKS))


def _unknown(kind: str, given: list[str], known: list[str]) -> str | None:
    wrong = [name for name in given if name not in known]
    if wrong:
        return f"unknown {kind} {', '.join(map(repr, wrong))} (known: {', '.join(known)})"


def _failure(check: Callable, *args, **kwargs) -> str | None:
    """The message of the UserError `check(*args, **kwargs)` raises, or None."""
    try:
        check(*args, **kwargs)
    except UserError as exc:
        return str(exc)


def _sets(value):
    from tasks.ingest import SETS

    return _names(value) or _unknown("TIA2 set(s)", value, list(SETS))


def _prompt_pool(value):
    from tasks.prompts import read_pool

    return _text(value) or _failure(read_pool, value)


def _generator(value):
    from tia2.models.diffusion import list_generators

    return _text(value) or _unknown("generator", [value], list_generators())


def _reward_models(value, store: str | None = None):
    """Built-in reward models and those trained into the run's store (default: TIA2_STORE or ./storage)."""
    from tia2.models import list_models
    from tia2.store import default_store_root

    return _names(value) or _unknown("reward model(s)", value, list_models(store or default_store_root()))


def _weights(value):
    if problem := _text(value):
        return problem
    if value not in ("pretrained", "random") and not Path(value).exists():
        return f"must be pretrained, random or a local path (no such file or folder: {value})"


def _device(value):
    from tia2.devices import resolve_device

    return _text(value) or _failure(resolve_device, value)


def _spec(value):
    from tia2.specs import parse_spec

    return _text(value) or _failure(parse_spec, value)


def _specs(value):
    return _names(value) or "; ".join(filter(None, map(_spec, value))) or None


def _gold(value):
    return None if value == "human" else _spec(value)


def _files(value):
    if problem := _names(value):
        return problem
    missing = [f for f in value if not Path(f).is_file()]
    if missing:
        return f"no such file(s): {', '.join(missing)}"


def _folders(value):
    if _mapping(value) or not all(has_kind(f, "str") for f in value.values()):
        return f"must be a mapping {{set: folder}} (got {value!r})"
    missing = [f for f in value.values() if not Path(f).is_dir()]
    if missing:
        return f"no such folder(s): {', '.join(missing)}"


@dataclass(frozen=True)
class Setting:
    meaning: str  # printed by `tia2 benchmark --help`
    check: Callable  # what is wrong with a value, or None
    optional: bool = False  # null is allowed (no such stage, no limit, the default)


def _key(meaning: str, check: Callable, default=MISSING, *, optional: bool = False):
    """A config key as a BenchmarkConfig field: the value a run takes when the config leaves it
    out (none: `BenchmarkConfig.from_settings` fills it in), its meaning and the check of a value."""
    setting = {"setting": Setting(meaning, check, optional)}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=setting)
    return field(default=default, metadata=setting)


@dataclass(frozen=True)
class BenchmarkConfig:
    """Every key a benchmark config may set, with its default, its meaning and the check of its
    value (`CONFIG_KEYS`); `resolve_config` gives the one of a run. Lists are tuples here."""
    store: str = _key("store root (default: TIA2_STORE or ./storage)", _text, optional=True)
    tia2_source: str = _key("folder or base URL of the TIA2 release (default: TIA2_SOURCE, else the public "
                            "repository)", _text, optional=True)
    sets: tuple[str, ...] = _key("TIA2 sets to ingest and evaluate (comprehensive, counting, composition)", _sets)
    prompt_pool: str | None = _key("file of prompts (JSON/CSV/Parquet/text) to select diverse prompts from (tia2 "
                                   "sample-prompts); they become set `selected`", _prompt_pool, None, optional=True)
    pool_prompts: int = _key("how many prompts to select from the pool (default 100)", _whole(1), 100)
    pool_k: int = _key("neighbours per prompt in the selection graph (default 150, the ImageReward paper's)",
                       _whole(1), 150)
    pool_seed: int = _key("seed of the selection's tie-breaks", _whole(), 0)
    contrast_method: str = _key("method for prompts without contrast prompts: rules (default) or llm (tia2 "
                                "contrast)", _one_of("rules", "llm"), "rules")
    generator: str | None = _key("diffusion model to make images for the prompts (tia2 generate), e.g. tiny-sd, "
                                 "sd-2-1", _generator, None, optional=True)
    images_per_prompt: int = _key("images the generator makes per prompt", _whole(1), 1)
    steps: int = _key("denoising steps (TextNorm paper: 50)", _whole(1), 50)
    guidance: float = _key("classifier-free guidance scale (TextNorm paper: 7.5)", _number, 7.5)
    max_prompts: int | None = _key("generate for the first N prompts of each set only (all when absent)",
                                   _whole(1), None, optional=True)
    generate_shards: int = _key("split generation into this many Prefect tasks over shards of the prompts "
                                "(default 1)", _whole(1), 1)
    image_folders: dict[str, str] = _key("image files to register, {set: folder} (see tia2 import-images)",
                                         _folders, {})
    reward_models: tuple[str, ...] = _key("reward models to score every image with (tia2 score), e.g. [tiny-clip, "
                                          "pickscore]", _reward_models, ())
    weights: str = _key("weights of those models: pretrained (hub / HF cache), random, or a local path", _weights,
                        "pretrained")
    device: str = _key("device for generation, scoring and fine-tuning: cpu, cuda, cuda:N, mps", _device, "cpu")
    batch_size: int = _key("images per scoring batch", _whole(1), 32)
    score_shards: int = _key("score each model as this many Prefect tasks over shards of the images (default 1)",
                             _whole(1), 1)
    score_files: tuple[str, ...] = _key("score files (Parquet/CSV) to import before the metrics", _files, ())
    rewards: tuple[str, ...] = _key("reward specs to evaluate, e.g. textnorm(pickscore, tau=0.01)", _specs, ())
    finetune: dict | None = _key("fine-tuning and its evaluation, a mapping (flows/finetune.py): algos, reward, "
                                 "sets, max_prompts, model, weights, reward_weights, settings, evaluate", _mapping,
                                 None, optional=True)
    annotate: dict | None = _key("annotation batches of the run's new images for people (tia2 annotate), a mapping: "
                                 "tasks, per_item, seed, aspects", _mapping, None, optional=True)

    @classmethod
    def from_settings(cls, settings: dict) -> BenchmarkConfig:
        """A checked config (`merged_config`) with what it leaves out filled in: the store and the
        TIA2 source from the environment, all of TIA2's sets, the finetune section's defaults,
        and the fields' defaults."""
        from tasks.ingest import DEFAULT_SOURCE, SETS
        from tia2.store import default_store_root

        values = {key: tuple(value) if isinstance(value, list) else value for key, value in settings.items()}
        values["store"] = settings.get("store") or default_store_root()
        values["tia2_source"] = settings.get("tia2_source") or os.environ.get("TIA2_SOURCE") or DEFAULT_SOURCE
        values.setdefault("sets", SETS)
        if settings.get("finetune"):
            values["finetune"] = _finetune_defaults(settings)
        if isinstance(settings.get("annotate"), dict):
            values["annotate"] = _annotate_defaults(settings["annotate"])
        return cls(**values)


# Every key a benchmark config may set, with its meaning and the check of its value.
CONFIG_KEYS = {key.name: key.metadata["setting"] for key in fields(BenchmarkConfig)}
# The keys of the `finetune` section, and of its `evaluate` mapping.
FINETUNE_KEYS = {
    "algos": Setting("rwr, ddpo and/or refl (default [refl])", _names),
    "reward": Setting("the reward spec to maximise", _spec),
    "sets": Setting("training prompts of these sets (default: all)", _names),
    "max_prompts": Setting("the first N training prompts of each set", _whole(1), optional=True),
    "model": Setting("the generator (default: the config's generator)", _generator, optional=True),
    "weights": Setting("the generator's weights (default pretrained)", _weights),
    "reward_weights": Setting("the reward models' weights (default: the config's weights)", _weights),
    "settings": Setting("hyperparameters on top of the paper's: any fine-tuning setting (SETTING_NAMES, "
                        "tasks/finetune.py)", _mapping),
    "evaluate": Setting("the checkpoints against the base model on held-out prompts", _mapping),
}
EVALUATE_KEYS = {
    "gold": Setting("the held-out reward: a spec, or human", _gold),
    "sets": Setting("held-out prompts of these sets (default: all)", _names),
    "max_prompts": Setting("the first N held-out prompts of each set", _whole(1), optional=True),
    "images_per_prompt": Setting("images per prompt and model (default 4)", _whole(1)),
    "steps": Setting("denoising steps (default 50)", _whole(1)),
    "guidance": Setting("classifier-free guidance (default 7.5)", _number),
    "rewards": Setting("more reward specs to compare", _specs),
}
# The keys of the `annotate` section (a mapping, even empty, turns the flow's annotate step on).
ANNOTATE_KEYS = {
    "tasks": Setting("rating (default: TIA2's good / bad / skip), ranking, pairwise and/or best-worst", _tasks),
    "per_item": Setting("annotators per item (default 3, as TIA2)", _whole(1)),
    "seed": Setting("seed of the item order, the assignment and the sides shown (default 0)", _whole()),
    "aspects": Setting("rating: also ImageReward's 1-7 alignment, fidelity and harmlessness (default false)", _flag),
}


def _problems(settings: dict, keys: dict[str, Setting], section: str = "") -> list[str]:
    """What is wrong with a mapping of settings: unknown keys, and each value against its key's check."""
    prefix = f"{section}: " if section else ""
    unknown = sorted(set(settings) - set(keys))
    problems = [f"{prefix}unknown setting(s) {', '.join(unknown)} (known: {', '.join(keys)})"] if unknown else []
    for key, value in settings.items():
        if key in keys and not (value is None and keys[key].optional):
            problem = keys[key].check(value)
            if problem:
                problems.append(f"{section}.{key}: {problem}" if section else f"{key}: {problem}")
    return problems


def check_config(settings: dict) -> None:
    """Every problem of a config, in one UserError line: nothing has been done yet."""
    store = settings.get("store") if has_kind(settings.get("store"), "str") else None
    keys = {**CONFIG_KEYS, "reward_models": replace(CONFIG_KEYS["reward_models"],  # the models of the run's store
                                                    check=functools.partial(_reward_models, store=store))}
    problems = _problems(settings, keys)
    if settings.get("finetune") and isinstance(settings["finetune"], dict):  # {}: no fine-tuning
        problems += _finetune_problems(settings)
    if isinstance(settings.get("annotate"), dict):
        problems += _annotate_problems(settings)
    if problems:
        raise UserError("; ".join(problems))


def _finetune_defaults(settings: dict) -> dict:
    section = dict(settings.get("finetune") or {})
    section.setdefault("algos", ["refl"])
    section.setdefault("model", settings.get("generator"))
    section.setdefault("weights", "pretrained")
    section.setdefault("reward_weights", settings.get("weights", "pretrained"))
    section.setdefault("settings", {})
    section.setdefault("evaluate", {})
    return section


def _annotate_defaults(section: dict) -> dict:
    return {"tasks": ["rating"], "per_item": 3, "seed": 0, "aspects": False} | section


def _annotate_problems(settings: dict) -> list[str]:
    """What is wrong with the annotate section: its keys, and whether the run has images to annotate."""
    problems = _problems(settings["annotate"], ANNOTATE_KEYS, "annotate")
    section = _annotate_defaults(settings["annotate"])
    if section["aspects"] is True and isinstance(section["tasks"], list) and "rating" not in section["tasks"]:
        problems.append("annotate.aspects: the 1-7 aspect ratings belong to the rating task")
    if not settings.get("generator") and not settings.get("image_folders"):
        problems.append("annotate: the run makes no images to annotate (set generator or image_folders)")
    return problems


def _finetune_problems(settings: dict) -> list[str]:
    """What is wrong with the finetune section: the keys it sets (a default from the config's own
    keys is checked there), what it lacks, and the hyperparameters of each algorithm."""
    problems = _problems(settings.get("finetune") or {}, FINETUNE_KEYS, "finetune")
    section = _finetune_defaults(settings)
    if "reward" not in section:
        problems.append("finetune: needs `reward`, the reward spec to maximise")
    if not section["model"]:
        problems.append("finetune: needs `model` (or the config's `generator`)")
    evaluate = section["evaluate"]
    if isinstance(evaluate, dict):
        problems += _problems(evaluate, EVALUATE_KEYS, "finetune.evaluate")
        if evaluate and "gold" not in evaluate:
            problems.append("finetune.evaluate: needs `gold`, the held-out reward (a spec, or human)")
    if not problems:  # the hyperparameters need a well-formed section
        problems += _hyperparameter_problems(section)
    return problems


def _hyperparameter_problems(section: dict) -> list[str]:
    from tasks.finetune import ALGORITHMS, SETTING_NAMES, paper_config

    unknown_algos = _unknown("algorithm(s)", section["algos"], list(ALGORITHMS))
    if unknown_algos:
        return [f"finetune.algos: {unknown_algos}"]
    unknown = sorted(set(section["settings"]) - set(SETTING_NAMES))
    if unknown:
        return [f"finetune.settings: unknown setting(s) {', '.join(unknown)} (known: {', '.join(SETTING_NAMES)})"]
    failures = [_failure(paper_config, algo, section["reward"], **hyperparameters(section))
                for algo in section["algos"]]
    # the same mistake fails every algorithm: report it once
    return [f"finetune.settings: {failure}" for failure in dict.fromkeys(failures) if failure]


def hyperparameters(section: dict) -> dict:
    """A finetune section's hyperparameters; `kl_beta: sweep` (RWR's β sweep) is not one."""
    return {k: v for k, v in section["settings"].items() if not (k == "kl_beta" and v == "sweep")}


def finetune_section(settings: dict) -> dict:
    """The config's `finetune` section with its defaults filled in; every problem in one UserError."""
    problems = _finetune_problems(settings)
    if problems:
        raise UserError("; ".join(problems))
    return _finetune_defaults(settings)


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
    """A profile or YAML file with `overrides` on top, checked (`check_config`)."""
    settings = load_config(profile_or_path) | (overrides or {})
    check_config(settings)
    return settings


def resolve_config(profile_or_path: str = DEFAULT_PROFILE, overrides: dict | None = None) -> BenchmarkConfig:
    """The benchmark flow's settings: `merged_config` with what it leaves out filled in
    (`BenchmarkConfig.from_settings`) and the TIA2 source checked: its files are there, or its URL
    answers."""
    from tasks.ingest import check_source

    config = BenchmarkConfig.from_settings(merged_config(profile_or_path, overrides))
    check_source(config.tia2_source, config.sets)
    return config


def set_prefect_defaults() -> None:
    """Keep Prefect's state in the current folder (not the home folder) and quiet offline; call
    before importing prefect. Values already in the environment win.

    Logging: Prefect's loggers keep their level (INFO unless PREFECT_LOGGING_LEVEL says otherwise),
    so the stages' lines reach the Prefect UI (its API handler), while the console shows warnings
    only, or what PREFECT_LOGGING_LEVEL asks for (which wins over a level this function set in a
    parent process)."""
    home = Path(os.environ.get("PREFECT_HOME", ".prefect")).resolve()
    defaults = {
        "PREFECT_HOME": str(home),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if os.environ.get("PREFECT_LOGGING_LEVEL"):
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = os.environ["PREFECT_LOGGING_LEVEL"]
