"""The KL of a model's next-token distribution from a reference model's, one model in memory at a time.

The reference's log-probabilities over the evaluation windows are written to disk as it is evaluated
(:class:`LogprobWriter` into a :class:`SavedLogprobs`), then read back a window at a time while the model is
evaluated on the same windows (:class:`KLMeter`: the KL per token and the top-1 agreement). A cache of such
measurements between runs (:mod:`sparsify.references`) hands them over as a :class:`CachedReference`. The
evaluation that drives both is :func:`sparsify.evaluate.evaluate`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from sparsify.algorithms.metrics import kl_stats
from sparsify.errors import SparsifyError
from sparsify.sizes import fmt_bytes

LOGPROB_BYTES = 2  # the reference's log-probabilities are kept on disk as float16: bytes per token and vocab entry
SPACE_MARGIN = 256 << 20  # free space left on the disk that holds them


def window_digest(windows: Tensor) -> str:
    """Which token windows ``(W, L)`` these are: the SHA-256 of their ids as int64."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().cpu().numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class SavedLogprobs:
    """A model's log-probabilities of the next token over evaluation windows ``(W, L)``, on disk: ``path`` holds them
    (float16, ``(W, L - 1, V)``, written a window at a time while the model is evaluated) and ``path.top1`` its most
    likely tokens (int32, ``(W, L - 1)``: exact, where float16 may round near-ties together); ``path.json`` says
    which windows (their digest), which vocabulary size and which model, and is written last: without it the data
    is unfinished. The reference a KL is measured from, read back a window at a time (one model in memory)."""

    path: Path

    @property
    def meta_path(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    @property
    def top1_path(self) -> Path:
        return self.path.with_name(self.path.name + ".top1")

    def space_problem(self, windows: Tensor, vocab: int) -> str | None:
        """Why the disk that holds ``path`` cannot take these windows' log-probabilities (None: it can)."""
        need = windows.shape[0] * (windows.shape[1] - 1) * vocab * LOGPROB_BYTES
        free = shutil.disk_usage(self.path.parent).free
        if need <= free - SPACE_MARGIN:
            return None
        return (
            f"the reference's log-probabilities over {windows.shape[0] * (windows.shape[1] - 1):,} tokens × {vocab:,}"
            f" vocabulary entries need {fmt_bytes(need)} in {self.path.parent}, {fmt_bytes(free)} free"
        )

    def problem(self, windows: Tensor) -> str | None:
        """Why these log-probabilities cannot be the reference on ``windows`` (None: they can)."""
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return "the reference's log-probabilities are missing"
        if meta.get("windows") != window_digest(windows):
            return "the reference's log-probabilities were measured on other windows"
        positions = windows.shape[0] * (windows.shape[1] - 1)
        sizes = {self.path: positions * int(meta.get("vocab", 0)) * LOGPROB_BYTES, self.top1_path: positions * 4}
        if any(not f.is_file() or f.stat().st_size != size for f, size in sizes.items()):
            return "the reference's log-probabilities are incomplete"
        return None

    def meta(self) -> dict[str, Any]:
        return json.loads(self.meta_path.read_text())

    def windows(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The saved log-probabilities and most likely tokens, one window at a time: ``(L - 1, V)`` float16 and
        ``(L - 1,)`` int32."""
        meta = self.meta()
        n, vocab = int(meta["positions"]), int(meta["vocab"])
        with self.path.open("rb") as f, self.top1_path.open("rb") as g:
            while buf := f.read(n * vocab * LOGPROB_BYTES):
                top1 = torch.frombuffer(bytearray(g.read(n * 4)), dtype=torch.int32)
                yield torch.frombuffer(bytearray(buf), dtype=torch.float16).view(n, vocab), top1


class LogprobWriter:
    """Writes a model's log-probabilities batch by batch into a :class:`SavedLogprobs` (its description when
    :meth:`close` is called, after the last)."""

    def __init__(self, saved: SavedLogprobs, windows: Tensor, vocab: int, model: str):
        if (problem := saved.space_problem(windows, vocab)) is not None:
            raise SparsifyError(f"KL not measured: {problem} (fewer windows: --max-windows N; elsewhere: TMPDIR)")
        saved.meta_path.unlink(missing_ok=True)  # unfinished until close() describes it
        self.saved, self.windows, self.vocab, self.model = saved, windows, vocab, model
        self.file, self.top1 = saved.path.open("wb"), saved.top1_path.open("wb")

    def __call__(self, logprobs: Tensor) -> None:  # (B, L - 1, V)
        self.file.write(logprobs.to(torch.float16).cpu().numpy().tobytes())
        self.top1.write(logprobs.argmax(-1).to(torch.int32).cpu().numpy().tobytes())

    def close(self, complete: bool = True) -> None:
        """The files closed; described (finished) when ``complete``."""
        self.file.close()
        self.top1.close()
        if not complete:
            return
        meta = {"windows": window_digest(self.windows), "positions": int(self.windows.shape[1]) - 1, "vocab": self.vocab,
                "model": self.model}  # fmt: skip
        self.saved.meta_path.write_text(json.dumps(meta) + "\n")


class KLMeter:
    """The KL of a model's next-token distribution from a reference's saved one (:class:`SavedLogprobs`), per
    token, and the top-1 agreement, accumulated batch by batch as the model is evaluated on the same windows."""

    def __init__(self, saved: SavedLogprobs, windows: Tensor):
        if (problem := saved.problem(windows)) is not None:
            raise SparsifyError(f"KL not measured: {problem}")
        self.meta = saved.meta()
        self.seq_len = int(windows.shape[1])
        self._reference = saved.windows()
        self.kl: list[Tensor] = []
        self.top1: list[Tensor] = []

    def __call__(self, logprobs: Tensor) -> None:  # (B, L - 1, V)
        if logprobs.shape[-1] != self.meta["vocab"]:
            raise SparsifyError(
                f"the reference {self.meta['model']} has a vocabulary of {self.meta['vocab']} tokens, this model"
                f" {logprobs.shape[-1]}: KL compares distributions over the same tokens"
            )
        for lp in logprobs:  # a window at a time: (L - 1, V)
            ref, top1 = next(self._reference)
            kl, agree = kl_stats(ref.to(lp.device).float().log_softmax(-1), lp, top1)  # float16: normalized again
            self.kl.append(kl.cpu())
            self.top1.append(agree.cpu())

    def result(self) -> dict[str, Any]:
        kl = torch.cat(self.kl).double().numpy()  # (tokens,)
        return {
            "mean": float(kl.mean()),
            "p99": float(np.percentile(kl, 99)),
            "top1": float(torch.cat(self.top1).double().mean()),
            "tokens": int(kl.size),
            "seq_len": self.seq_len,
            "reference": self.meta["model"],
        }


class CachedReference(Protocol):
    """A reference model's measurement kept between runs (:mod:`sparsify.references`): its perplexity (None until
    measured) and log-probabilities."""

    @property
    def logprobs(self) -> SavedLogprobs: ...

    def perplexity(self) -> dict[str, Any] | None: ...

    def store(self, info: dict[str, Any]) -> None: ...

    def release(self) -> None: ...
