"""The one owner of rich: stderr console, logging setup and progress bars for long loops."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

T = TypeVar("T")

err_console = Console(stderr=True)
_state = {"quiet": False}


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """CLI-only: library code logs to `logging.getLogger(__name__)`, never adds handlers."""
    _state["quiet"] = quiet or not err_console.is_terminal
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root = logging.getLogger("trt_pipeline")
    root.handlers.clear()
    handler = RichHandler(console=err_console, show_path=False, show_time=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(level)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)  # stage log files keep INFO


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """A progress bar on stderr for a long loop; a plain iteration when quiet or not a TTY."""
    if _state["quiet"] or not err_console.is_terminal:
        yield from items
        return
    with _progress() as progress:
        yield from progress.track(items, total=total, description=description)


@contextmanager
def _progress() -> Iterator[Progress]:
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )
    with progress:
        yield progress
