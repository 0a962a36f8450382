"""Atomic folder moves: ``renameat2`` (NOREPLACE, EXCHANGE) where the kernel has it, and a folder written whole.

The bottom of :mod:`sparsify.checkpoint`: :mod:`.output` moves a finished output into place with these, and
:mod:`.source` caches a converted GGUF model with :func:`replace_dir`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def renameat2(src: Path, dst: Path, flags: int) -> bool | None:
    """``renameat2(src, dst, flags)``: True on success, False if ``dst`` exists, None if unsupported here."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return None
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        return False
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return None
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst`` unless ``dst`` exists; False if it does."""
    done = renameat2(src, dst, RENAME_NOREPLACE)
    if done is not None:
        return done
    if dst.exists() or dst.is_symlink():  # no atomic primitive: check, then rename (a small window)
        return False
    os.rename(src, dst)
    return True


@contextlib.contextmanager
def replace_dir(target: Path) -> Iterator[Path]:
    """A cache folder written whole or not at all (no locking, no checks: for sparsify's own cache)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if not rename_noreplace(tmp, target):  # someone else made it meanwhile: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
