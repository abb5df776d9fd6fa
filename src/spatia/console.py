"""Terminal output: one stderr console, logging through rich, progress bars that `--quiet` hides."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

console = Console(stderr=True)
_state = {"quiet": False}


def configure(quiet: bool = False) -> None:
    """Set up logging for a CLI run: INFO to stderr, or WARNING only when quiet."""
    _state["quiet"] = quiet
    root = logging.getLogger("spatia")
    root.handlers.clear()
    handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


def is_quiet() -> bool:
    return _state["quiet"]


def progress() -> Progress:
    """A rich progress bar, disabled when the run is quiet (use as a context manager)."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=_state["quiet"],
        transient=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (hidden when quiet)."""
    with progress() as bar:
        task = bar.add_task(description, total=total if total is not None else _len_or_none(items))
        for item in items:
            yield item
            bar.advance(task)


def _len_or_none(items: Iterable[object]) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None
