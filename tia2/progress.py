"""Progress bars with a throughput column, drawn only when stderr is a terminal.

Every bar open at once in a process is a task of one shared rich display: generation or scoring
shards in threads each get their own labelled line instead of drawing over each other.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Callable, Iterator

_lock = threading.Lock()
_display = None  # the shared rich Progress while any bar is open
_open_bars = 0


@contextlib.contextmanager
def progress_bar(label: str, total: int, unit: str = "images", show: bool = True) -> Iterator[Callable]:
    """Yields `advance(n, rate)`: n more items done, at `rate` items per second."""
    if not (show and sys.stderr.isatty()):
        yield lambda n, rate: None
        return
    display = _open_bar()
    task = display.add_task(label, total=total, rate=0.0, unit=unit)
    try:
        yield lambda n, rate: display.update(task, advance=n, rate=rate)
    finally:
        _close_bar()


def _open_bar():
    global _display, _open_bars
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with _lock:
        if _display is None:
            _display = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]:.2f} {task.fields[unit]}/s"), TimeRemainingColumn(),
                                console=Console(file=sys.stderr))
            _display.start()
        _open_bars += 1
        return _display


def _close_bar() -> None:
    """The last bar to close ends the display (finished bars stay drawn until then)."""
    global _display, _open_bars
    with _lock:
        _open_bars -= 1
        if _open_bars == 0:
            _display.stop()
            _display = None
