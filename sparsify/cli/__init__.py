"""The ``sparsify`` command: parse flags, call the library, render the result. Nothing else.

Each compressing command is generated from its pass (a pass class names its ``command``): one option per
field of the pass's config (:mod:`sparsify.cli_options`), the calibration settings and the compute dtype
(from the recipe's own fields), and the run settings every compressing command shares, declared once in
:data:`RUN_OPTIONS`. Adding a knob to a pass is adding one field. ``sparsify export <format>`` is generated
likewise, one command per entry of :data:`sparsify.export.FORMATS`, with one option per field of its config.

The modules: ``app`` (the Typer application, shared options, logging) → ``running`` (a recipe run from flags) →
``errors`` (one line per failure) → ``generated`` (the commands generated from the pass and format registries) →
``commands`` (the hand-written ones: eval, report, cache, inspect, demo) → ``docs`` (docs/cli.md's tables).
"""

from __future__ import annotations

from sparsify.cli import commands  # noqa: F401 - the commands register on the app (generated ones first)
from sparsify.cli.app import app
from sparsify.cli.docs import reference, write_reference


def _tune_allocator() -> None:
    """A fixed 16 MiB mmap threshold for glibc's malloc (as ``MALLOC_MMAP_THRESHOLD_=16777216`` would set).

    Layer after layer of same-sized tensors otherwise fragments the heap under glibc's dynamic threshold:
    peak RSS of a 32-layer run was 1.34x an 8-layer run's; with the fixed threshold 1.08x
    (docs/benchmarks.md, memory). Large tensors then come from mmap and go back to the OS when freed.
    """
    import ctypes
    import ctypes.util
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return  # the user chose
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 16 * 1024 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc


def main() -> None:
    _tune_allocator()
    app()


__all__ = ["app", "main", "reference", "write_reference"]
