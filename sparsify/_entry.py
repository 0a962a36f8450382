"""The ``sparsify`` command's entry point: signals handled from its first line to its last.

While the command's modules import, Python would turn SIGINT into a traceback and let SIGTERM/SIGHUP
kill it silently; after the command, while the interpreter shuts down (torch's exit hooks take a
while), the same. Nothing is being written at either end, so one line and the shell's exit code
(128 + the signal) are all there is to do; during the command, :mod:`sparsify.interrupts` takes over.
Only the standard library is imported before the handlers are in place.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))
_phase = ["starting"]


def _handler(signum: int, _frame: object) -> None:
    interrupts = sys.modules.get("sparsify.interrupts")  # imported with the command, if it got that far
    ended = _phase[0] == "finished" or (interrupts is not None and interrupts.work_ended())
    what = "after the command finished" if ended else "no output was written"
    try:
        sys.stdout.flush()
        sys.stderr.write(f"interrupted ({signal.Signals(signum).name}) {what}\n")
        sys.stderr.flush()
    finally:
        os._exit(128 + signum)


def main() -> None:
    for s in _SIGNALS:
        signal.signal(s, _handler)
    from sparsify.cli import main as cli  # typer and the configs (torch and transformers: when a command runs)

    code: object = 0
    try:
        cli()
    except SystemExit as e:
        code = e.code
    finally:
        _phase[0] = "finished"
        for s in _SIGNALS:  # the command restored ours when it ended; make sure, for the shutdown
            signal.signal(s, _handler)
    _exit(code)


def _exit(code: object) -> None:
    """Shut down with our handler in place until the process is gone.

    Python's own shutdown restores the default handlers before it finishes (``_PySignal_Fini``), and
    torch's exit hooks take a while: a signal landing then would kill the process with no word. So the
    exit hooks run here, under our handler, the signals are then ignored and blocked, and the process ends at once.
    """
    import atexit
    import logging

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        sys.stderr.write(f"{code}\n")
        status = 1
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`sparsify ... | head`): nothing to say there
            stream.flush()
    for s in _SIGNALS:  # blocking below covers this thread only: another one (torch's) would still take a signal
        signal.signal(s, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    os._exit(status)
