"""Progress reporting: the library takes a :class:`Progress`; only the CLI draws bars."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

T = TypeVar("T")


class Progress(Protocol):
    def track(self, items: Iterable[T], total: int, description: str) -> Iterator[T]: ...


class NoProgress:
    def track(self, items: Iterable[T], total: int, description: str) -> Iterator[T]:
        yield from items


class RichProgress:
    """Rich progress bars on the given console (the CLI passes one bound to stderr)."""

    def __init__(self, console):
        self.console = console

    def track(self, items: Iterable[T], total: int, description: str) -> Iterator[T]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        ) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
