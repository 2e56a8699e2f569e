"""A progress bar with a throughput column, drawn only when stderr is a terminal."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator


@contextlib.contextmanager
def progress_bar(label: str, total: int, unit: str = "images", show: bool = True) -> Iterator[Callable]:
    """Yields `advance(n, rate)`: n more items done, at `rate` items per second."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(),
               TextColumn(f"{{task.fields[rate]:.2f}} {unit}/s"), TimeRemainingColumn())
    with Progress(*columns, disable=not (show and sys.stderr.isatty())) as bar:
        task = bar.add_task(label, total=total, rate=0.0)
        yield lambda n, rate: bar.update(task, advance=n, rate=rate)
