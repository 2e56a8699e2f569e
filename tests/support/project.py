"""The project's location, and copies of its packages for tests that edit code."""

from __future__ import annotations

import shutil
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
SHARED_TIA2 = PROJECT.parent / "shared" / "data" / "tia2"


def copy_project(dest: Path) -> Path:
    """The project's packages (what the stage keys read) copied to `dest`."""
    from flows.common import PROJECT_PACKAGES  # imports Prefect: only when copying

    for package in PROJECT_PACKAGES:
        shutil.copytree(PROJECT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    return dest
