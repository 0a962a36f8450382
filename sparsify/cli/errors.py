"""One line per failure: ``handle_errors`` turns every exception into an ``error:`` line and an exit code
(``--debug``: the traceback), interrupts into the command that resumes."""

from __future__ import annotations

import functools
import sys
from typing import Any

import typer

from sparsify.cli.app import F, _say, _setup_logging, err_console
from sparsify.cli.running import _FlagError, _render
from sparsify.errors import SparsifyError, one_line


def _interrupted(e: KeyboardInterrupt, late: bool = False) -> int:
    """One line for an interruption; the exit code (128 + signal). ``late``: it came as the command ended."""
    from sparsify.interrupts import Interrupted

    name, code = (e.name, e.exit_code) if isinstance(e, Interrupted) else ("SIGINT", 130)
    if late:
        _say(f"interrupted ({name}) after the command finished")
    elif isinstance(e, Interrupted) and e.finished:
        _say(f"interrupted ({name}) after {e.finished} was written")
    elif isinstance(e, Interrupted) and e.kept:
        n = e.kept_layers
        what = "its complete output" if n is None else f"{n} finished layer{'s' if n != 1 else ''}"
        head, command = f"interrupted ({name}); {what} kept in {e.kept}; to continue, run", _resume_command()
        if _under_torchrun():
            head += " the same torchrun command with --resume"
            command = command and f"torchrun [its options] -m {command}"
        if command is None:
            _say(head if _under_torchrun() else f"{head} the same command with --resume")
        else:  # the command as it is (not folded or cut: it is to be run)
            err_console.print(f"{one_line(head)}: {command}", markup=False, highlight=False, emoji=False)
    else:
        _say(f"interrupted ({name}); no output was written")
    return code


def _resume_command() -> str | None:
    """The command that continues an interrupted run: this command line with ``--resume`` (once), shell-quoted, as
    ``sparsify ...`` (run as ``python -m sparsify`` too). None where it cannot be shown on one line as it is (an
    argument with a newline or a tab)."""
    import shlex

    args = sys.argv[1:]
    if not all(a.isprintable() for a in args):
        return None
    if "--resume" not in args:
        end = args.index("--") if "--" in args else len(args)  # after "--" it would be taken for an argument
        args = [*args[:end], "--resume", *args[end:]]
    return shlex.join(["sparsify", *args])


def _kept_after_peer(e: Exception) -> str:
    """What a torchrun rank that stopped because another ended adds to its line: where its finished layers are
    kept, and the command that continues them ("" for any other error)."""
    from sparsify.distributed import PeerLost

    if not isinstance(e, PeerLost) or not getattr(e, "kept", None):
        return ""
    return f"; finished layers kept in {e.kept}: run the same torchrun command with --resume to continue"


def _under_torchrun() -> bool:
    import os

    try:
        return int(os.environ.get("WORLD_SIZE") or 1) > 1
    except ValueError:
        return False


def handle_errors(fn: F) -> F:
    """One line on stderr and a non-zero exit for every failure; the traceback only with --debug.

    SIGINT, SIGTERM and SIGHUP are handled explicitly for the whole command (:mod:`sparsify.interrupts`):
    the run stops at once or at the next safe point, cleans up and exits 128 + the signal number.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from sparsify.interrupts import handle_signals, recorded_only

        debug = bool(kwargs.get("debug"))
        _setup_logging(debug, bool(kwargs.get("verbose")))
        try:
            with handle_signals():
                try:
                    return fn(*args, **kwargs)
                except typer.Exit:
                    raise
                except KeyboardInterrupt as e:
                    if debug:
                        raise
                    with recorded_only():  # a signal while saying so is not raised out of here
                        _let_go(e)
                        code = _interrupted(e)
                except Exception as e:  # every failure: one line, unless --debug
                    if debug:
                        raise
                    with recorded_only():
                        _let_go(e)
                        report = getattr(e, "report", None)  # output written, but it failed its quality bar
                        if report is not None:
                            _render(report, bool(kwargs.get("json_out")))
                        if isinstance(e, SparsifyError):
                            _say(f"error: {e}{_kept_after_peer(e)}")
                        else:
                            _say(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)")
                        code = 2 if isinstance(e, _FlagError) else 1
        except KeyboardInterrupt as e:  # raised at the call that puts the handlers back: the work had ended
            if debug:
                raise
            code = _interrupted(e, late=True)
        raise typer.Exit(code)  # outside the except blocks: nothing keeps the failed run's frames alive

    return wrapper  # type: ignore[return-value]


def _let_go(e: BaseException) -> None:
    """Release what the failed run's frames hold, now, while its threads still run: an abandoned progress
    bar then stops here instead of at interpreter exit, where joining its refresh thread would hang."""
    import gc
    import traceback

    traceback.clear_frames(e.__traceback__)
    gc.collect()


# ------------------------------------------------------------------------------------------------- running
