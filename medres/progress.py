"""Progress reporting that library code may call without printing.

Library functions wrap long loops in :func:`track` or open a :func:`task`. Nothing is
shown unless the CLI has switched rendering on with :func:`enable` (it owns the console);
in library use both are silent no-ops apart from the iteration itself. Tests that drive
the CLI keep bars off through a fixture (``tests/conftest.py``), not through a check here.

Owns: the one switch (:func:`enable` / :func:`disable`) and the bar layout.
Imports: rich only (core layer; no other ``medres`` module).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

_console: Console | None = None


def enable(console: Console | None = None) -> None:
    """Render progress bars on ``console`` (stderr by default). Called by the CLI only."""
    global _console
    _console = console or Console(stderr=True)


def disable() -> None:
    """Stop rendering progress bars (library calls become silent again)."""
    global _console
    _console = None


def enabled() -> bool:
    """Whether :func:`enable` switched rendering on."""
    return _console is not None


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=_console,
        transient=False,
    )


class Task:
    """Handle returned by :func:`task`; ``advance`` and ``update`` are cheap no-ops when off."""

    def __init__(self, progress: Progress | None, task_id: int | None, unit: str) -> None:
        self._progress = progress
        self._id = task_id
        self._unit = unit
        self.completed = 0

    def advance(self, n: int = 1) -> None:
        self.completed += n
        if self._progress is not None and self._id is not None:
            t = self._progress.tasks[self._id]
            speed = t.speed
            rate = f"{speed:,.1f} {self._unit}/s" if speed else ""
            self._progress.update(self._id, advance=n, rate=rate)

    def update(self, *, total: int | None = None, description: str | None = None) -> None:
        if self._progress is not None and self._id is not None:
            kw: dict[str, object] = {}
            if total is not None:
                kw["total"] = total
            if description is not None:
                kw["description"] = description
            self._progress.update(self._id, **kw)


@contextlib.contextmanager
def task(description: str, total: int | None = None, unit: str = "it") -> Iterator[Task]:
    """A progress bar for a stage; ``total=None`` shows a spinner until it is known."""
    if not enabled():
        yield Task(None, None, unit)
        return
    with _progress() as prog:
        tid = prog.add_task(description, total=total, rate="")
        yield Task(prog, tid, unit)


def track(
    iterable: Iterable[T], description: str, total: int | None = None, unit: str = "it"
) -> Iterator[T]:
    """Iterate with a progress bar when the CLI enabled one."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with task(description, total=total, unit=unit) as t:
        for item in iterable:
            yield item
            t.advance()
