"""Progress bars with ETA for long stages, shown only when the command line turns them on.

Stages report progress through :func:`track` or :func:`counter` and never print themselves; outside a
:func:`shown` block (tests, library use, ``--quiet``, output that is not a terminal) both cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

Item = TypeVar("Item")
_display: Progress | None = None


@contextmanager
def shown(console: Console) -> Iterator[None]:
    """Show the progress of every stage that runs inside the block on ``console``."""
    global _display
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as display:
        _display = display
        try:
            yield
        finally:
            _display = None


def track(items: Iterable[Item], total: int, description: str) -> Iterator[Item]:
    """Yield ``items``, advancing a bar of ``total`` steps after each."""
    if _display is None:
        yield from items
        return
    task = _display.add_task(description, total=total)
    try:
        for item in items:
            yield item
            _display.advance(task)
    finally:
        _display.remove_task(task)


def counter(description: str, total: int) -> Callable[[], None]:
    """A function that advances a new bar of ``total`` steps by one each call (thread-safe)."""
    if _display is None:
        return lambda: None
    display = _display
    task = display.add_task(description, total=total)
    return lambda: display.advance(task)
