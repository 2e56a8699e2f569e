"""tia2: benchmark and fine-tune text-to-image models against reward models.

Shared library code that is neither a stage (``tasks/``) nor a flow (``flows/``): the store,
reward specs, MLflow tracking helpers and the command line.
"""

__version__ = "0.1.0"
