"""A benchmark config is checked whole before any work: each mistake is one line (exit 2), the
store is not created, nothing is written, and Prefect is not even imported."""

import os
import subprocess
import sys

import pytest
import yaml

from tests.support.project import PROJECT
from cli.main import main
from tia2.config import check_config, merged_config
from tia2.errors import UserError
from tia2.models import list_models

FINETUNE = {"reward": "tiny-clip", "settings": {"steps": 3}}


@pytest.mark.parametrize("settings, message", [
    ({"images_per_prompt": -3}, "images_per_prompt: must be a whole number of at least 1 (got -3)"),
    ({"steps": "ten"}, "steps: must be a whole number of at least 1 (got 'ten')"),
    ({"guidance": "high"}, "guidance: must be a finite number (got 'high')"),
    ({"guidance": float("nan")}, "guidance: must be a finite number (got nan)"),
    ({"max_prompts": 2.5}, "max_prompts: must be a whole number of at least 1 (got 2.5)"),
    ({"sets": "counting"}, "sets: must be a list of names (got 'counting')"),
    ({"sets": ["counting", "nosuch"]}, "sets: unknown TIA2 set(s) 'nosuch' (known: comprehensive, counting"),
    ({"reward_models": ["tiny-clip", "nosuch"]}, "reward_models: unknown reward model(s) 'nosuch' (known: "),
    ({"generator": "nosuch"}, "generator: unknown generator 'nosuch' (known: sd-2-1, sd-2-1-base, tiny-sd)"),
    ({"contrast_method": "magic"}, "contrast_method: must be one of rules, llm (got 'magic')"),
    ({"device": "foo"}, "device: unknown device 'foo' (use cpu, cuda, cuda:N or mps)"),
    ({"weights": "no/such/weights"}, "weights: must be pretrained, random or a local path (no such file or folder"),
    ({"prompt_pool": "no/such/pool.json"}, "prompt_pool: no/such/pool.json: no such file"),
    ({"score_files": ["no/such/scores.parquet"]}, "score_files: no such file(s): no/such/scores.parquet"),
    ({"image_folders": {"counting": "no/such/folder"}}, "image_folders: no such folder(s): no/such/folder"),
    ({"rewards": ["textnorm(tiny-clip, tau="]}, "rewards: bad reward spec 'textnorm(tiny-clip, tau='"),
    ({"finetune": ["refl"]}, "finetune: must be a mapping of settings (got ['refl'])"),
    ({"finetune": {"reward": "tiny-clip", "epochs": 3}}, "finetune: unknown setting(s) epochs"),
    ({"finetune": {"settings": {}}}, "finetune: needs `reward`"),
    ({"finetune": {**FINETUNE, "algos": "refl"}}, "finetune.algos: must be a list of names (got 'refl')"),
    ({"finetune": {**FINETUNE, "algos": ["ppo"]}}, "finetune.algos: unknown algorithm(s) 'ppo'"),
    ({"finetune": {**FINETUNE, "evaluate": {"gold": "human", "steps": 0}}},
     "finetune.evaluate.steps: must be a whole number of at least 1 (got 0)"),
    ({"finetune": {"reward": "tiny-clip", "settings": {"stepz": 3}}},
     "finetune.settings: unknown setting(s) stepz (known: steps, checkpoint_every"),
    ({"finetune": {"reward": "tiny-clip", "settings": {"steps": "10"}}},
     "finetune.settings: steps must be a whole number (got '10')"),
    ({"finetune": {"reward": "tiny-clip", "settings": {"denoise_steps": "ten"}}},
     "finetune.settings: denoise_steps must be a whole number (got 'ten')"),
    ({"finetune": {"reward": "tiny-clip", "settings": {"learning_rate": float("nan")}}},  # YAML's .nan
     "finetune.settings: learning_rate must be a finite number (got nan)"),
])
def test_a_mistake_is_one_line_and_nothing_is_written(tmp_path, monkeypatch, capsys, settings, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"store": "store", "generator": "tiny-sd", **settings}))
    assert main(["benchmark", "--config", "bad.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tia2 benchmark: error: ") and message in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == ["bad.yaml"]  # no store, no MLflow or Prefect state


def test_cuda_without_a_gpu_is_a_mistake():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="device: device 'cuda': this machine has no CUDA GPU"):
        check_config({"device": "cuda"})


def test_every_mistake_is_in_the_one_line():
    with pytest.raises(UserError) as error:
        check_config({"images_per_prompt": -3, "steps": "ten", "reward_models": ["nosuch"], "device": "foo",
                      "score_files": ["no/such/file.csv"]})
    assert str(error.value).split("; ") == [
        "images_per_prompt: must be a whole number of at least 1 (got -3)",
        "steps: must be a whole number of at least 1 (got 'ten')",
        f"reward_models: unknown reward model(s) 'nosuch' (known: {', '.join(list_models())})",
        "device: unknown device 'foo' (use cpu, cuda, cuda:N or mps)",
        "score_files: no such file(s): no/such/file.csv"]


def test_the_profiles_and_empty_sections_pass():
    for profile in ("tiny", "paper"):
        merged_config(profile)
    check_config({"finetune": {}, "max_prompts": None, "generator": None, "prompt_pool": None})


def test_the_check_runs_before_prefect_is_imported(tmp_path):
    (tmp_path / "bad.yaml").write_text("steps: ten\n")
    code = ("import sys; from cli.main import main; code = main(['benchmark', '--config', 'bad.yaml']); "
            "print('prefect' in sys.modules); sys.exit(code)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(PROJECT)))
    assert out.returncode == 2 and out.stdout.strip() == "False"
    assert out.stderr.strip() == "tia2 benchmark: error: steps: must be a whole number of at least 1 (got 'ten')"


def test_each_flow_checks_its_config_first(tmp_path):
    """The deployments' entry points: the check is the first thing each flow function does (its
    body runs without a Prefect run here, so anything after the check would fail differently)."""
    from flows.finetune import tia2_finetune
    from flows.rescore import tia2_rescore
    from flows.tia2_benchmark import tia2_benchmark

    bad = tmp_path / "bad.yaml"
    bad.write_text("reward_models: [nosuch]\n")
    for flow in (tia2_benchmark, tia2_finetune, tia2_rescore):
        with pytest.raises(UserError, match="reward_models: unknown reward model.s. 'nosuch'"):
            flow.fn(config=str(bad))
        with pytest.raises(UserError, match="device: unknown device 'foo'"):
            flow.fn(config="tiny", overrides={"device": "foo"})


def test_a_resolved_config_has_every_default_and_the_environments_store_and_source(tmp_path, monkeypatch):
    """What the flows and `tia2 benchmark` read: a BenchmarkConfig with lists as
    tuples, the store and TIA2 source of the environment, and the defaults of the keys left out."""
    from tests.support.stores import make_release
    from tia2.config import BenchmarkConfig, resolve_config

    release = str(make_release(tmp_path / "release"))
    monkeypatch.setenv("TIA2_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("TIA2_SOURCE", release)
    (tmp_path / "run.yaml").write_text("sets: [counting]\nreward_models: [tiny-clip]\nsteps: 10\n")
    config = resolve_config(str(tmp_path / "run.yaml"))
    assert config == BenchmarkConfig(store=str(tmp_path / "store"), tia2_source=release, sets=("counting",),
                                     reward_models=("tiny-clip",), steps=10)
    assert (config.batch_size, config.device, config.image_folders, config.finetune) == (32, "cpu", {}, None)
