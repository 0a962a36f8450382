"""SIGINT / SIGTERM / SIGHUP handled explicitly, so that no interrupt is ever lost.

Python turns SIGINT into ``KeyboardInterrupt`` wherever the main thread happens to be; when that is
inside a finalizer (``__del__``), the exception cannot propagate and Python only prints it, so the
run would carry on and exit 0. Inside :func:`handle_signals` each of the three signals instead

1. records the signal (the flag is never lost),
2. raises :class:`Interrupted` at once the first time (a ``KeyboardInterrupt``, so libraries that clean
   up on Ctrl-C still do), and only records later ones, so that cleanup code runs to its end;

and :func:`check`, called by the library at safe points (between layers, tensors, batches, and before
an output is renamed into place), raises :class:`Interrupted` again if the first one was swallowed.
Without :func:`handle_signals` (a library user's own process) :func:`check` does nothing.

The received signal is process state by nature (handlers are per process), so it lives in this module.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; ``exit_code`` is the shell convention ``128 + signum``."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.kept: str | None = None  # set when partial work was kept for --resume: the work folder
        self.kept_layers: int | None = None  # with kept: the finished layers kept (None: a complete output)
        self.finished: str | None = None  # set when the output was already complete and in place

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _State:
    received: int | None = None  # the last handled signal
    raised: bool = False  # Interrupted was raised for it once (later signals are only recorded)
    deferring: int = 0  # inside deferred(): record only
    active: bool = False
    ended: bool = False  # a handle_signals block ran and ended (the command's work is over)


_state = _State()


def check() -> None:
    """Raise :class:`Interrupted` if a handled signal arrived (a safe point in long work)."""
    if _state.active and _state.received is not None:
        _state.raised = True
        raise Interrupted(_state.received)


def _handler(signum: int, _frame: Any) -> None:
    _state.received = signum
    if not _state.raised and not _state.deferring:
        _state.raised = True
        raise Interrupted(signum)


def _unraisable(previous):
    def hook(args: Any) -> None:
        # An Interrupted raised inside a finalizer cannot propagate; the flag is already set and the
        # next check() raises it again, so there is nothing to print.
        if isinstance(args.exc_value, Interrupted):
            return
        previous(args)

    return hook


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Install the handlers for the duration of the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread() or _state.active:
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    previous_hook = sys.unraisablehook
    _state.received, _state.raised, _state.deferring, _state.active = None, False, 0, True
    _state.ended = False
    try:
        for s in SIGNALS:
            signal.signal(s, _handler)
        sys.unraisablehook = _unraisable(previous_hook)
        yield
    finally:
        _state.deferring += 1  # from here a signal is recorded, never raised out of this cleanup
        for s, h in previous.items():
            signal.signal(s, h)  # a signal arriving from now on goes to the previous handler directly
        sys.unraisablehook = previous_hook
        late = _state.received if not _state.raised else None
        _state.received, _state.raised, _state.deferring, _state.active = None, False, 0, False
        _state.ended = True
        if late is not None:  # it came as the block ended: handed to the previous handler, not lost
            signal.raise_signal(late)


@contextlib.contextmanager
def recorded_only() -> Iterator[None]:
    """Signals arriving inside the block are only recorded (never raised there); the end of
    :func:`handle_signals` hands one that was never raised to the handler in place before it."""
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1


def work_ended() -> bool:
    """Whether a :func:`handle_signals` block (the command's work) has ended in this process."""
    return _state.ended


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Signals arriving inside the block are recorded and raised when it ends (a rename and its bookkeeping)."""
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1
        if _state.active and not _state.deferring and _state.received is not None and not _state.raised:
            _state.raised = True
            raise Interrupted(_state.received)
