"""Progress bars with ETA for long stages, shown only when the command line turns them on.

Stages report progress through :func:`track`, :func:`counter` or a :class:`Bar` and never print themselves;
outside a :func:`shown` block (tests, library use, ``--quiet``, output that is not a terminal) they cost
nothing, and :func:`active` tells a stage to say its progress in plain lines instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

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
        _Remaining(),
    )
    with Progress(*columns, console=console, transient=True) as display:
        _display = display
        try:
            yield
        finally:
            _display = None


def active() -> bool:
    """Whether bars are shown (inside :func:`shown`); stages that would otherwise be silent for long print lines when not."""
    return _display is not None


def format_duration(seconds: float) -> str:
    """A duration for people: ``45 s``, ``3.1 min``, ``18.0 h``, ``2.5 days``."""
    if seconds < 90:
        return f"{max(seconds, 0):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


class _Remaining(TimeRemainingColumn):
    """Rich's time remaining, or the ETA text a :class:`Bar` computed itself (its ``eta`` field)."""

    def render(self, task: Task) -> Text:
        eta = task.fields.get("eta")
        return super().render(task) if eta is None else Text(eta, style="progress.remaining")


class Bar:
    """A bar that its owner moves and relabels, optionally with its own ETA text (nothing outside :func:`shown`).

    Args:
        description: The text before the bar.
        total: Steps of the bar.
    """

    def __init__(self, description: str, total: int) -> None:
        self._display = _display
        self._task = None if _display is None else _display.add_task(description, total=total)

    def update(
        self, *, completed: int | None = None, total: int | None = None, description: str | None = None, eta: str | None = None
    ) -> None:
        """Move or relabel the bar; ``eta`` replaces rich's own estimate of the time remaining."""
        if self._task is None:
            return
        fields = {} if eta is None else {"eta": eta}
        self._display.update(self._task, completed=completed, total=total, description=description, **fields)

    def restart(self, total: int, description: str) -> None:
        """Start the bar again from 0, its elapsed time and rich's estimate too."""
        if self._task is not None:
            self._display.reset(self._task, total=total, description=description)

    def advance(self) -> None:
        """One step more."""
        if self._task is not None:
            self._display.advance(self._task)

    def close(self) -> None:
        """Take the bar off the display (again: nothing)."""
        if self._task is not None:
            self._display.remove_task(self._task)
            self._task = None


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
