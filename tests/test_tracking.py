"""MLflow runs of killed processes: the next top-level stage run marks them KILLED."""

import os
import socket
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.support.project import PROJECT
from tia2.tracking import stage_run

# A stage run with a nested one, open until the process ends; prints both run ids.
HOLD_A_RUN = """
import time
from tia2.tracking import stage_run
with stage_run("holder", {}) as parent, stage_run("step", {}, parent.info.run_id) as child:
    print(parent.info.run_id, child.info.run_id, flush=True)
    time.sleep(600)
"""


def _hold_a_run() -> tuple[subprocess.Popen, list[str]]:
    process = subprocess.Popen([sys.executable, "-c", HOLD_A_RUN], cwd=PROJECT, stdout=subprocess.PIPE, text=True)
    return process, process.stdout.readline().split()


@pytest.mark.slow
def test_runs_of_a_killed_process_are_marked_killed_and_a_live_ones_are_left_alone():
    killed, killed_runs = _hold_a_run()
    live, live_runs = _hold_a_run()
    try:
        killed.kill()  # SIGKILL: the process cannot end its runs
        killed.wait()
        client = MlflowClient()
        assert {client.get_run(r).info.status for r in killed_runs} == {"RUNNING"}
        with stage_run("next", {}) as run:
            assert run.data.tags["tia2.pid"] == str(os.getpid()) and run.data.tags["tia2.host"] == socket.gethostname()
        assert {client.get_run(r).info.status for r in killed_runs} == {"KILLED"}
        assert {client.get_run(r).info.status for r in live_runs} == {"RUNNING"}
    finally:
        for process in (killed, live):
            process.kill()
            process.wait()
