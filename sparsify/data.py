"""Text for calibration and evaluation: files read with ``datasets``, or embedded defaults.

The embedded default needs no download: the standard library's ``pydoc_data.topics``. Its topics are
split deterministically so that calibration and evaluation never see the same text.
"""

from __future__ import annotations

import contextlib
import functools
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
    note: str = ""  # what was left out (records without text), for the run's notes


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


TEXT_SUFFIXES = (".txt", ".md", ".rst", "")
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_text(
    path: str | Path | None, default: str = BUILTIN_CALIB, text_column: str | None = None, tokenizer=None
) -> Text:
    """Documents from text as users hold it.

    - ``.txt`` (also ``.md``, ``.rst``) or a folder of ``.txt``: each file is a document;
    - ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv``, or a folder of one of those: records;
    - a folder written by ``datasets``' ``save_to_disk`` (its ``train`` split, or its only one).

    Records give their ``text_column``, else ``text``; chat records (a ``messages`` list of
    ``{"role", "content"}``) are rendered with ``tokenizer``'s chat template.
    """
    if path is None or str(path) in (BUILTIN_CALIB, BUILTIN_EVAL):
        name = default if path is None else str(path)
        return Text(name, _pydoc_split(held_out=name == BUILTIN_EVAL))
    p = Path(path).expanduser()
    if not p.exists():
        raise SparsifyError(f"text file not found: {p}")
    ds = _read_dataset(p)
    column = _column(ds.column_names, text_column, p.name)
    values = ds[column]
    if any(isinstance(v, list) for v in values[:16]):
        docs = _render_chats(values, tokenizer, p.name, column)
    else:
        docs = [t for t in values if isinstance(t, str) and t.strip()]
    if not docs:
        raise SparsifyError(f"{p} holds no text in {column!r}")
    note = ""
    if len(docs) < len(values):
        note = (
            f"{p.name}: {len(values) - len(docs)} of {len(values)} records have no text in {column!r} and were skipped"
        )
        logging.getLogger(__name__).warning(note)
    return Text(str(p), docs, note)


def _read_dataset(p: Path):
    import datasets

    datasets.disable_progress_bars()
    if p.is_dir() and any((p / f).is_file() for f in ("dataset_dict.json", "state.json")):
        loader = functools.partial(datasets.load_from_disk, str(p), keep_in_memory=True)
        files: list[str] = []
    else:
        if p.is_dir():
            kinds = [(s, sorted(str(f) for f in p.glob(f"*{s}"))) for s in (".txt", *BUILDERS)]
            suffix, files = next(((s, fs) for s, fs in kinds if fs), (None, []))
            if not files:
                raise SparsifyError(
                    f"folder {p} has no .txt, .json, .jsonl, .parquet or .csv files, nor a saved dataset"
                )
        else:
            suffix, files = p.suffix, [str(p)]
        if suffix in TEXT_SUFFIXES:
            builder, kwargs = "text", {"sample_by": "document"}
        elif suffix in BUILDERS:
            builder, kwargs = BUILDERS[suffix], {}
        else:
            raise SparsifyError(
                f"unsupported text file {p.name}: use .txt, .json/.jsonl, .parquet, .csv, a folder of them, or a"
                " folder saved by datasets"
            )
        if all(Path(f).stat().st_size == 0 for f in files):
            raise SparsifyError(f"{p} is empty")
        loader = functools.partial(
            datasets.load_dataset, builder, data_files=files, split="train", keep_in_memory=True, **kwargs
        )
    try:
        with _quiet("datasets"):  # its own error lines would repeat the one below
            ds = loader()
    except Exception as e:
        root = e
        while root.__cause__ is not None:  # datasets wraps the parser's error: show the parser's
            root = root.__cause__
        raise SparsifyError(f"cannot read {p.name}: {root}") from e
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds)) if len(ds) == 1 else None
        if split is None:
            raise SparsifyError(f"{p.name} has splits {', '.join(ds)} and none is 'train'; save the one to use")
        ds = ds[split]
    return ds


def _column(columns: list[str], wanted: str | None, name: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise SparsifyError(f"{name} has no column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    for default in ("text", "messages"):
        if default in columns:
            return default
    raise SparsifyError(
        f"{name} has no 'text' or 'messages' column (columns: {', '.join(columns)}); pass --text-column"
    )


def _render_chats(values: list, tokenizer, name: str, column: str) -> list[str]:
    """Chat records (lists of ``{"role", "content"}``) as the text the model sees, through its chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise SparsifyError(
            f"{name}: column {column!r} holds chat messages and the tokenizer has no chat template to render them;"
            " pass --text-column with a plain-text column"
        )
    docs = []
    for i, messages in enumerate(values):
        if not messages:
            continue
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise SparsifyError(f"{name}: record {i} of {column!r} is not a list of {{role, content}} messages")
        try:
            docs.append(tokenizer.apply_chat_template(messages, tokenize=False))
        except Exception as e:  # the template is the model's own Jinja: its errors are the user's to fix
            raise SparsifyError(f"{name}: record {i}: the chat template failed: {e}") from e
    return docs


def tokenize(text: Text, tokenizer) -> Tensor:
    """All documents as one stream of token ids ``(N,)``, documents joined by a blank line."""
    ids = tokenizer(text.documents, add_special_tokens=False)["input_ids"]
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for doc in ids:
        stream.extend(doc)
        stream.extend(sep)
    return torch.tensor(stream, dtype=torch.long)


def check_token_ids(ids: Tensor | None, rows: int | None, what: str | None) -> None:
    """Refuse token ids the model has no embedding row for (a tokenizer larger than the model's ``vocab_size``),
    before any forward would fail with an index error."""
    if ids is None or not rows or ids.numel() == 0:
        return
    top = int(ids.max())
    if top >= rows:
        raise SparsifyError(
            f"the tokenizer gives ids up to {top} for {what or 'the text'}, beyond the model's vocab_size {rows}"
            f" (its embedding rows): the tokenizer does not match the model"
        )


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
