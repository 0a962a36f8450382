"""Progress reporting: the library takes a :class:`Progress`; only the CLI draws bars."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

T = TypeVar("T")

# A log level between info and warning: a one-time line a user should see without -v, though nothing is wrong (what
# a cache keeps on disk and how to free it). The CLI prints it as "note: ...".
NOTICE = logging.INFO + 5


class Progress(Protocol):
    def track(self, items: Iterable[T], total: int, description: str) -> Iterator[T]: ...


class NoProgress:
    def track(self, items: Iterable[T], total: int, description: str) -> Iterator[T]:
        yield from items


class RichProgress:
    """Progress on the given console (the CLI passes one bound to stderr): bars on a terminal; elsewhere (a log
    file, CI) a plain line when a task starts, every ``every`` seconds while it runs, and when it ends."""

    def __init__(self, console, every: float = 10.0):
        self.console = console
        self.every = every

    def track(self, items: Iterable[T], total: int, description: str) -> Iterator[T]:
        if not self.console.is_terminal:
            yield from self._lines(items, total, description)
            return
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

    def _lines(self, items: Iterable[T], total: int, description: str) -> Iterator[T]:
        start = last = time.monotonic()
        self._say(f"{description}: 0/{total}")
        done = 0
        for item in items:
            yield item
            done += 1
            now = time.monotonic()
            if now - last >= self.every and done < total:
                self._say(f"{description}: {done}/{total} ({_clock(now - start)})")
                last = now
        self._say(f"{description}: {done}/{total} done in {_clock(time.monotonic() - start)}")

    def _say(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes}m {s:02d}s" if minutes else f"{seconds:.1f}s"


@contextlib.contextmanager
def library_bars_silenced() -> Iterator[None]:
    """Within the block, what libraries write to stderr is dropped: compressed-tensors draws its own tqdm bars
    (no switch turns them off) when transformers loads a quantized checkpoint. For short blocks that log nothing
    of sparsify's own."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield
