"""The stages' cache policy (flows/common.py): a stage's key follows the code it runs (its module,
what that imports in tasks/ and tia2/, their packages' config files) and no other code.

The edits are made in a copy of the project's packages, the policy pointed at it: other work
goes on in the real tree."""

import dataclasses
import json
import tomllib
from types import SimpleNamespace

import pytest

from flows.common import CACHED, PROJECT_PACKAGES, StageCode
from flows.finetune import finetune_task
from flows.tia2_benchmark import generate_task, metrics_task, score_task
from prefect.cache_policies import INPUTS, TASK_SOURCE
from tests.support.project import PROJECT, copy_project

TASK_INPUTS = {"store_root": "store", "store_key": "tables", "parent_run_id": "mlflow-run-1"}
# the policy before stages were keyed on their code: a test of the code key must fail with it
SOURCE_ONLY = (INPUTS - "parent_run_id") + TASK_SOURCE


def cached_at(root):
    """The stages' policy (CACHED) reading the code under `root`."""
    assert any(isinstance(p, StageCode) for p in CACHED.policies)
    return dataclasses.replace(CACHED, policies=[StageCode(root=root) if isinstance(p, StageCode) else p
                                                 for p in CACHED.policies])


def key(policy, task, **inputs):
    return policy.compute_key(SimpleNamespace(task=task), {**TASK_INPUTS, **inputs}, {})


def edit(path):
    """A change of behaviour: a new module constant, or a new config value."""
    if path.suffix == ".json":
        path.write_text(json.dumps({**json.loads(path.read_text()), "changed": True}))
    else:
        path.write_text(path.read_text() + "\nCHANGED = True\n")


@pytest.fixture
def project(tmp_path):
    return copy_project(tmp_path / "project")


@pytest.mark.parametrize("task, file", [
    (metrics_task, "tasks/metrics.py"),                  # the stage's module
    (metrics_task, "tasks/rewards.py"),                  # imported by it
    (metrics_task, "tia2/errors.py"),                    # imported by what it imports
    (score_task, "tia2/models/clip_family.py"),          # imported inside functions only
    (score_task, "tia2/models/configs/tiny-clip.json"),  # a reward model's config
    (generate_task, "tia2/models/generators/tiny-sd.json"),
    (finetune_task, "tasks/finetune.py"),
], ids=lambda x: getattr(x, "name", x))
def test_a_change_in_the_code_a_stage_runs_changes_its_key(project, task, file):
    policy = cached_at(project)
    before, source_only = key(policy, task), key(SOURCE_ONLY, task)
    edit(project / file)
    assert key(policy, task) != before
    assert key(SOURCE_ONLY, task) == source_only  # the change the old key missed


@pytest.mark.parametrize("task, file", [
    (metrics_task, "tasks/generate.py"),
    (metrics_task, "tia2/models/configs/tiny-clip.json"),
    (score_task, "tasks/metrics.py"),
    (generate_task, "tasks/score.py"),
], ids=lambda x: getattr(x, "name", x))
def test_a_change_in_code_the_stage_does_not_reach_keeps_its_key(project, task, file):
    policy = cached_at(project)
    before = key(policy, task)
    edit(project / file)
    assert key(policy, task) == before


def test_the_key_ignores_the_mlflow_parent_run_but_not_the_other_inputs():
    assert key(CACHED, metrics_task, parent_run_id="mlflow-run-2") == key(CACHED, metrics_task)
    assert key(CACHED, metrics_task, store_key="other tables") != key(CACHED, metrics_task)


def test_the_key_does_not_depend_on_where_the_project_is(tmp_path):
    """Machines that share a store share its stage caches, wherever their checkout is."""
    first, second = copy_project(tmp_path / "a"), copy_project(tmp_path / "b" / "c")
    assert key(cached_at(first), score_task) == key(cached_at(second), score_task)


def test_the_packages_are_pyprojects():
    pyproject = tomllib.loads((PROJECT / "pyproject.toml").read_text())
    included = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(PROJECT_PACKAGES) == sorted(pattern.removesuffix("*") for pattern in included)
