"""What every flow module shares: Prefect's defaults, set before prefect is first imported (its
settings are read at import), and the stages' cache policy."""

from tia2.config import set_prefect_defaults

set_prefect_defaults()

from prefect.cache_policies import INPUTS, TASK_SOURCE  # noqa: E402

# A task's inputs and source; the MLflow parent run differs every run and must not enter the key.
CACHED = (INPUTS - "parent_run_id") + TASK_SOURCE
