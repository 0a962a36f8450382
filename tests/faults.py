"""Run the ``sparsify`` CLI in a fresh process with one fault injected, for tests that need real signals.

    python -m tests.faults FAULT -- prune MODEL -o OUT ...

FAULT is one of
- ``count``: no fault; print ``calls=N`` (calls into sparsify's own code) on stderr at exit;
- ``SIGINT@N`` / ``SIGTERM@N`` / ``SIGHUP@N``: send that signal to this process at the N-th call into sparsify
  (or as it exits, when this run makes fewer calls than the one that counted them);
- ``raise@K``: a pass raises RuntimeError on its K-th call (K counts compress calls, from 1);
- ``kill@L``: SIGKILL this process when a pass starts on layer L (a hard death: no cleanup possible);
- ``sigterm@L``: SIGTERM when a pass starts on layer L;
- ``del@L``: SIGINT delivered inside an object's ``__del__`` when a pass starts on layer L (Python cannot
  raise out of a finalizer, so a plain KeyboardInterrupt would be lost there);
- ``appear@L``: another "process" creates OUT (a folder with a file) when a pass starts on layer L;
- ``slow@S``: every layer takes S more seconds (so that two runs overlap);
- ``gate@PATH``: the first layer waits until PATH exists (another run can then be started and finished
  while this one holds its work folder: deterministic, whatever the machine's load);
- ``run``: nothing injected (a resumed or competing run as the installed command runs it, at full speed);
  ``count`` also counts the calls into sparsify (printed at exit: ``calls=N``), under a profile (~2x slower).
- ``killin@FUNC``: SIGKILL this process when sparsify's function FUNC is called (a hard death at a point
  that is not a layer, e.g. ``begin`` before any state is written); ``killin@FUNC#N``: at its N-th call.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import time
from pathlib import Path


def _on_layer(action) -> None:
    """Call ``action(layer_index, call_number)`` whenever a pass compresses a layer."""
    from sparsify.passes import PASSES

    for cls in {c for c in PASSES.values() if c.layerwise}:
        original = cls.compress_layer
        calls = [0]

        def compress_layer(self, work, _original=original, _calls=calls):
            _calls[0] += 1
            action(work.index, _calls[0])
            return _original(self, work)

        cls.compress_layer = compress_layer


class _SignalInFinalizer:
    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):  # the handler runs here, inside __del__
            pass


def _output(args: list[str]) -> Path:
    return Path(args[args.index("-o") + 1])


def main() -> None:
    fault, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: python -m tests.faults FAULT -- ARGS"
    kind, _, value = fault.partition("@")
    package = str(Path(__import__("sparsify").__file__).parent)
    calls = [0]

    def counter(frame, event, _arg):
        if event == "call" and frame.f_code.co_filename.startswith(package):
            calls[0] += 1
            if kind.startswith("SIG") and calls[0] == int(value):
                sys.setprofile(None)  # counted enough: the run ends at full speed (a profile slows it ~2x)
                os.kill(os.getpid(), getattr(signal, kind))

    function, _, nth = value.partition("#")
    seen = [0]

    def kill_in(frame, event, _arg):
        if event == "call" and frame.f_code.co_name == function and frame.f_code.co_filename.startswith(package):
            seen[0] += 1
            if seen[0] == int(nth or 1):
                os.kill(os.getpid(), signal.SIGKILL)

    if kind == "count" or kind.startswith("SIG"):
        sys.setprofile(counter)
    elif kind == "killin":
        sys.setprofile(kill_in)
    elif kind == "gate":

        def wait(layer: int, n: int) -> None:
            while n == 1 and not Path(value).exists():
                time.sleep(0.05)

        _on_layer(wait)
    elif kind == "raise":

        def fail(_layer: int, n: int) -> None:
            if n == int(value):
                raise RuntimeError("injected fault")

        _on_layer(fail)
    elif kind in ("kill", "sigterm", "del", "appear"):

        def act(layer: int, _n: int) -> None:
            if layer != int(value):
                return
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif kind == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            elif kind == "del":
                obj = _SignalInFinalizer()
                del obj
            else:
                out = _output(args)
                if not out.exists():
                    out.mkdir(parents=True)
                    (out / "theirs.txt").write_text("another process's work")

        _on_layer(act)
    elif kind == "slow":
        _on_layer(lambda layer, n: time.sleep(float(value)))

    def at_exit() -> None:  # run by the entry point's exit, under its signal handler
        sys.setprofile(None)
        if kind == "count":
            print(f"calls={calls[0]}", file=sys.stderr)
        elif kind.startswith("SIG") and calls[0] < int(value):
            # This run made fewer calls than the counting one (its timed activation saves and progress lines
            # vary with the machine's load): the signal arrives as the process exits instead.
            os.kill(os.getpid(), getattr(signal, kind))

    atexit.register(at_exit)
    from sparsify import _entry

    sys.argv = ["sparsify", *args]
    _entry.main()  # as the installed command: signals handled from its first line to its last


if __name__ == "__main__":
    main()
