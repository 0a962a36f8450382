"""Progress reporting: the library takes a :class:`Progress`; only the CLI draws bars."""

from __future__ import annotations

import contextlib
import io
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


@contextlib.contextmanager
def library_bars_silenced() -> Iterator[None]:
    """Within the block, what libraries write to stderr is dropped: compressed-tensors draws its own tqdm bars
    (no switch turns them off) when transformers loads a quantized checkpoint. For short blocks that log nothing
    of sparsify's own."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield
