"""sparsify: compress Hugging Face transformer checkpoints into ones the ecosystem loads as-is."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(path: Any, **kwargs: Any) -> Any:
    """Load a checkpoint sparsify wrote with its attention patterns active (see :func:`sparsify.runtime.load`)."""
    from sparsify.runtime import load as _load

    return _load(path, **kwargs)
