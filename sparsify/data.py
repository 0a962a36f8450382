"""Text for calibration and evaluation: files read with ``datasets``, or embedded defaults.

The embedded default needs no download: the standard library's ``pydoc_data.topics``. Its topics are
split deterministically so that calibration and evaluation never see the same text.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sparsify.errors import SparsifyError

BUILTIN_CALIB = "builtin:pydoc-topics-calib"
BUILTIN_EVAL = "builtin:pydoc-topics-heldout"


@dataclass(frozen=True)
class Text:
    """A named body of text, as documents."""

    name: str
    documents: list[str]


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Silence a library's logger (and its own handlers) for the duration of the block."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log.setLevel(level)


def _pydoc_split(held_out: bool) -> list[str]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return [topics[k] for i, k in enumerate(sorted(topics)) if (i % 4 == 3) == held_out]


def load_text(path: str | Path | None, default: str = BUILTIN_CALIB) -> Text:
    """Documents from a ``.txt`` file, a ``.json``/``.jsonl`` file with a ``text`` field, or a folder of ``.txt``."""
    if path is None or str(path) in (BUILTIN_CALIB, BUILTIN_EVAL):
        name = default if path is None else str(path)
        return Text(name, _pydoc_split(held_out=name == BUILTIN_EVAL))
    p = Path(path).expanduser()
    if not p.exists():
        raise SparsifyError(f"text file not found: {p}")
    if p.is_dir():
        files = sorted(str(f) for f in p.glob("*.txt"))
        if not files:
            raise SparsifyError(f"folder {p} has no .txt files")
        builder, kwargs = "text", {"sample_by": "document"}
    elif p.suffix in (".json", ".jsonl"):
        files, builder, kwargs = [str(p)], "json", {}
    elif p.suffix in (".txt", ".md", ".rst", ""):
        files, builder, kwargs = [str(p)], "text", {"sample_by": "document"}
    else:
        raise SparsifyError(f"unsupported text file {p.name}: use .txt, .json/.jsonl (with a 'text' field) or a folder")
    if all(Path(f).stat().st_size == 0 for f in files):
        raise SparsifyError(f"{p} is empty")
    import datasets

    datasets.disable_progress_bars()
    try:
        with _quiet("datasets"):  # its own error lines would repeat the one below
            ds = datasets.load_dataset(builder, data_files=files, split="train", keep_in_memory=True, **kwargs)
    except Exception as e:
        root = e
        while root.__cause__ is not None:  # datasets wraps the parser's error: show the parser's
            root = root.__cause__
        raise SparsifyError(f"cannot read {p.name}: {root}") from e
    if "text" not in ds.column_names:
        raise SparsifyError(f"{p.name} has no 'text' field (fields: {', '.join(ds.column_names)})")
    docs = [t for t in ds["text"] if isinstance(t, str) and t.strip()]
    if not docs:
        raise SparsifyError(f"{p} holds no text")
    return Text(str(p), docs)


def tokenize(text: Text, tokenizer) -> Tensor:
    """All documents as one stream of token ids ``(N,)``, documents joined by a blank line."""
    ids = tokenizer(text.documents, add_special_tokens=False)["input_ids"]
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for doc in ids:
        stream.extend(doc)
        stream.extend(sep)
    return torch.tensor(stream, dtype=torch.long)


def sample_windows(stream: Tensor, samples: int, seq_len: int, seed: int) -> Tensor:
    """``samples`` random windows of ``seq_len`` tokens, ``(samples, seq_len)``, reproducible by ``seed``."""
    if stream.numel() < seq_len:
        raise SparsifyError(
            f"calibration text has {stream.numel()} tokens, fewer than seq_len={seq_len}; give more text or lower --seq-len"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (samples,), generator=g)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])  # (samples, seq_len)


def eval_windows(stream: Tensor, seq_len: int, max_windows: int | None = None) -> Tensor:
    """Consecutive non-overlapping windows ``(W, seq_len)``; the tail shorter than a window is dropped."""
    n = stream.numel() // seq_len
    if n == 0:
        raise SparsifyError(f"evaluation text has {stream.numel()} tokens, fewer than seq_len={seq_len}")
    if max_windows:
        n = min(n, max_windows)
    return stream[: n * seq_len].reshape(n, seq_len)
