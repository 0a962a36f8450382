"""The input model's perplexity and next-token log-probabilities, measured once per model and protocol.

Every compressing run measures its input before compressing it: the perplexity before, and the log-probabilities
the output's KL is measured from. Both depend only on the model's bytes and the evaluation protocol (the token
windows, the context lengths, the compute dtype, the device, sparsify's version), so they are kept in the cache
(``$SPARSIFY_CACHE/reference/<key>/``, keyed by a digest of all of these) and reused: another recipe on the same
model, a resumed run and ``sparsify eval OUT`` (whose KL reference is the input) do not measure the input again.

An entry is a folder holding the log-probabilities (:class:`~sparsify.logprobs.SavedLogprobs`) and
``perplexity.json``, written last: without it an entry is unfinished and is measured again. A process measuring an
entry holds ``<key>.lock`` exclusively, one reading it holds it shared until it is done; a run that finds an entry
being measured by another measures into its own work folder instead. Entries past :data:`BUDGET_BYTES` in all are
removed least recently used first, never one held; ``sparsify cache --clear`` removes every one not in use.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparsify._version import __version__
from sparsify.checkpoint import cache_dir
from sparsify.logprobs import SavedLogprobs
from sparsify.sizes import folder_bytes

BUDGET_BYTES = 8 << 30  # the entries kept in all (the newest is kept whatever its size)
PERPLEXITY = "perplexity.json"


def reference_root() -> Path:
    return cache_dir() / "reference"


def reference_key(model: str, stream: Tensor, lengths: list[int], windows: int | None, dtype: str, device: str) -> str:
    """The entry of one model (``model``: its fingerprint, every byte of config and weights) on one protocol: the
    evaluation text's tokens, the context lengths and window count, the compute dtype, the device kind; and the
    code that computes it (sparsify's, torch's and transformers' versions). Models run with remote code are not
    cached (their code is not in the key)."""
    import transformers

    h = hashlib.sha256(stream.contiguous().cpu().numpy().tobytes())
    protocol = {"model": model, "tokens": h.hexdigest(), "lengths": list(lengths), "windows": windows,
                "dtype": dtype, "device": device.split(":")[0], "sparsify": __version__,
                "torch": torch.__version__, "transformers": transformers.__version__}  # fmt: skip
    return hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class Reference:
    """One entry, locked by this process (shared to read, exclusive to measure) until :meth:`release`."""

    dir: Path
    fd: int | None

    @property
    def logprobs(self) -> SavedLogprobs:
        return SavedLogprobs(self.dir / "logprobs")

    def perplexity(self) -> dict[str, Any] | None:
        """The stored measurement (an :func:`~sparsify.evaluate.evaluate` result), None while unfinished."""
        try:
            info = json.loads((self.dir / PERPLEXITY).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict) or not isinstance(info.get("perplexity"), float):
            return None
        with contextlib.suppress(OSError):
            os.utime(self.dir / PERPLEXITY)  # used: the last to be evicted
        return info

    def store(self, info: dict[str, Any]) -> None:
        """Record the measurement (the entry is finished) and let other processes read it."""
        tmp = self.dir / f".{PERPLEXITY}.tmp"
        tmp.write_text(json.dumps({**info, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        tmp.replace(self.dir / PERPLEXITY)
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_SH)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @property
    def bytes(self) -> int:
        return folder_bytes(self.dir)


def _lock(path: Path, mode: int) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def open_reference(
    key: str, create: bool = True, usable: Callable[[Reference], bool] | None = None
) -> Reference | None:
    """The entry ``key``, held: finished (:meth:`Reference.perplexity` is not None, and ``usable`` if given) and held
    shared, or (``create``) emptied to be measured and held exclusively; None while another process measures it
    (or, not ``create``, unless it is finished)."""
    root = reference_root()
    lock = root / f"{key}.lock"
    if not create and not lock.is_file():
        return None
    root.mkdir(parents=True, exist_ok=True)
    fd = _lock(lock, fcntl.LOCK_EX) if create else None
    if fd is not None:
        ref = Reference(root / key, fd)
        ref.dir.mkdir(exist_ok=True)
        if ref.perplexity() is not None and (usable is None or usable(ref)):
            fcntl.flock(fd, fcntl.LOCK_SH)  # finished: others may read it too
        else:  # unfinished (a measurement killed midway, files lost): measured again from the start
            (ref.dir / PERPLEXITY).unlink(missing_ok=True)
        return ref
    fd = _lock(lock, fcntl.LOCK_SH)  # held by readers only: finished
    if fd is None:
        return None
    ref = Reference(root / key, fd)
    if ref.perplexity() is None or (usable is not None and not usable(ref)):
        ref.release()
        return None
    return ref


def evict(budget: int = BUDGET_BYTES, keep: str | None = None) -> None:
    """Remove entries, least recently used first, until those left take ``budget`` bytes (``keep``, the one a run
    just measured, stays whatever its size); an entry held by any process is never removed."""
    root = reference_root()
    if not root.is_dir():
        return
    entries = [p for p in root.iterdir() if p.is_dir() and p.name != keep]

    def used(p: Path) -> float:
        with contextlib.suppress(OSError):
            return (p / PERPLEXITY).stat().st_mtime
        return 0.0  # unfinished: first to go

    total = sum(folder_bytes(p) for p in entries) + folder_bytes(root / keep if keep else root / ".none")
    for p in sorted(entries, key=used):
        if total <= budget:
            break
        size = folder_bytes(p)
        if remove_entry(p):
            total -= size


def remove_entry(entry: Path) -> bool:
    """Remove one entry unless a process holds it; True if removed."""
    fd = _lock(entry.parent / f"{entry.name}.lock", fcntl.LOCK_EX)
    if fd is None:
        return False
    try:
        shutil.rmtree(entry, ignore_errors=True)
    finally:
        os.close(fd)
    return True


# ------------------------------------------------------------------------------------- the cache as a whole

# What sparsify keeps under $SPARSIFY_CACHE: (folder, what it is, whether --clear removes it without --all).
CACHE_PARTS = (
    ("gguf", "GGUF models converted to float32 safetensors to be read (made again when needed)", True),
    ("reference", "input models' perplexity and log-probabilities, per model and protocol", True),
    ("smollm2", "the demo's model as downloaded from PyPI", False),
    ("demo-out", "the demo's output", False),
)


def cache_contents() -> list[dict[str, Any]]:
    """Each part of the cache present: its folder, what it holds, its bytes and entries."""
    rows = []
    for name, what, _ in CACHE_PARTS:
        path = cache_dir() / name
        if path.is_dir():
            entries = [p for p in path.iterdir() if not p.name.endswith(".lock")]
            rows.append(
                {"part": name, "path": str(path), "what": what, "bytes": folder_bytes(path), "entries": len(entries)}
            )
    return rows


def clear_cache(everything: bool = False) -> tuple[int, list[str]]:
    """Remove the parts of the cache made again on demand (``everything``: the demo's download and output too).
    Returns the bytes freed and the entries left because a process holds them."""
    freed, busy = 0, []
    for name, _, default in CACHE_PARTS:
        path = cache_dir() / name
        if not path.is_dir() or not (default or everything):
            continue
        if name not in ("reference", "gguf"):
            freed += folder_bytes(path)
            shutil.rmtree(path, ignore_errors=True)
            continue
        for entry in [p for p in path.iterdir() if p.is_dir()]:  # each held while a process reads it
            size = folder_bytes(entry)
            if remove_entry(entry):
                freed += size
            else:
                busy.append(str(entry))
    return freed, busy
