"""Perplexity of a causal LM on held-out text, over consecutive non-overlapping windows."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsify import interrupts
from sparsify.arch import is_encoder
from sparsify.data import BUILTIN_EVAL, eval_windows, load_text, tokenize
from sparsify.errors import SparsifyError
from sparsify.loading import load
from sparsify.modules import replaying
from sparsify.progress import NoProgress, Progress, library_bars_silenced
from sparsify.runtime.format import read_config

BATCH_TOKENS = 2048  # tokens per evaluation forward: the logits (tokens × vocab floats) dominate memory
DEFAULT_EVAL_WINDOWS = 16  # windows of the perplexity a compressing run measures before and after


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise SparsifyError(
            f"no usable tokenizer in {path} ({type(e).__name__}); sparsify needs the model's tokenizer files"
            " (tokenizer.json or tokenizer_config.json + vocab) for calibration and evaluation text"
        ) from e


def check_context(lengths: list[int], limit: int | None) -> None:
    """Refuse context lengths past the model's ``max_position_embeddings``."""
    beyond = [n for n in lengths if limit and n > limit]
    if beyond:
        raise SparsifyError(
            f"seq_len {beyond[0]} is beyond the model's context (max_position_embeddings {limit}); use {limit} or less"
        )


def load_causal_lm(
    path: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, device: str = "cpu"
) -> nn.Module:
    config = read_config(path, trust_remote_code)
    if is_encoder(config.model_type):
        raise SparsifyError(f"perplexity needs a causal LM; {config.model_type} is an encoder")
    return _load(path, dtype, trust_remote_code, device)


def _load(path: Path, dtype: torch.dtype, trust_remote_code: bool, device: str = "cpu") -> nn.Module:
    """:func:`sparsify.loading.load` in eval mode on ``device``, a transformers failure turned into one line.

    The checkpoint is checked first, as ``compress`` checks its input: transformers would fill a missing
    or misshapen tensor with random weights and evaluate that.
    """
    from sparsify.arch import lookup
    from sparsify.checkpoint import open_model, verify

    md = open_model(path)
    config = md.load_config(trust_remote_code)
    arch = lookup(config.model_type)
    verify(md.source, config, arch.layers if arch else None, arch.optional if arch else (), is_encoder(config.model_type),
           trust_remote_code)  # fmt: skip
    try:
        with library_bars_silenced():
            model = load(path, dtype=dtype, trust_remote_code=trust_remote_code, kernel="exact")  # its own numerics
    except SparsifyError:
        raise
    except Exception as e:
        raise SparsifyError(f"transformers cannot load {path}: {e}") from e
    return model.to(device).eval()


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 4, progress: Progress | None = None) -> float:
    """``exp(mean NLL)`` over every predicted token of ``windows: (W, L)``."""
    progress = progress or NoProgress()
    nll, count = 0.0, 0
    chunks = windows.split(batch_size)
    device = next(model.parameters()).device
    for chunk in progress.track(chunks, len(chunks), "evaluating perplexity"):
        interrupts.check()
        chunk = chunk.to(device)
        logits = model(input_ids=chunk, use_cache=False).logits.float()  # (B, L, V)
        nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
        count += chunk[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def perplexity_of_hidden(model: nn.Module, layers: nn.ModuleList, batches: list[tuple[Tensor, Tensor]]) -> float:
    """``exp(mean NLL)`` of token windows whose hidden states after the last decoder layer are given, per batch
    ``(tokens (B, L), hidden (B, L, d))``: the model's own head (final norm, LM head, any logit soft-capping)
    computes the logits (see :func:`replaying`).
    Every batch but the last holds as many windows as the first (as ``Tensor.split`` cuts them)."""
    with replaying(layers, [h for _, h in batches]):
        windows = torch.cat([t for t, _ in batches])  # (W, L): cut again by perplexity() into the same batches
        return perplexity(model, windows, batch_size=int(batches[0][0].shape[0]))


@torch.no_grad()
def forward_seconds(
    path: Path,
    seq_len: int,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    device: str = "cpu",
    repeats: int = 5,
) -> float:
    """Median wall time of one forward over ``seq_len`` tokens (a prefill) of the model at ``path``, loaded as
    its users load it, after one warm-up forward."""
    import statistics
    import time

    model = _load(path, dtype, trust_remote_code, device)
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    ids = torch.arange(seq_len, device=device).reshape(1, -1) % vocab
    times = []
    for i in range(repeats + 1):
        interrupts.check()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def _embed(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    hidden = model(**batch).last_hidden_state  # (B, T, H)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, H) mean-pooled


def embedding_similarity(
    path: Path,
    baseline: Path,
    data: str | None,
    seq_len: int = 128,
    max_texts: int = 256,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Encoders: cosine similarity of mean-pooled embeddings to the ``baseline`` model on held-out paragraphs."""
    tokenizer = load_tokenizer(baseline, trust_remote_code)
    text = load_text(data, default=BUILTIN_EVAL, tokenizer=tokenizer)
    paragraphs = [p.strip() for doc in text.documents for p in doc.split("\n\n") if len(p.strip()) > 40][:max_texts]
    if not paragraphs:
        raise SparsifyError(f"{text.name} has no paragraphs to embed")
    models = [_load(p, dtype, trust_remote_code, device) for p in (path, baseline)]
    seq_len = min(seq_len, getattr(models[1].config, "max_position_embeddings", seq_len))
    sims = []
    for start in range(0, len(paragraphs), 16):
        batch = tokenizer(
            paragraphs[start : start + 16], padding=True, truncation=True, max_length=seq_len, return_tensors="pt"
        )
        interrupts.check()
        batch = {k: v.to(device) for k, v in batch.items()}
        a, b = (_embed(m, batch) for m in models)
        sims.append(F.cosine_similarity(a.float(), b.float(), dim=-1))
    cos = torch.cat(sims)  # (N,)
    return {
        "metric": "cosine",
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "text": text.name,
        "texts": len(paragraphs),
        "seq_len": seq_len,
        "baseline": str(baseline),
    }


def evaluate(
    path: Path,
    data: str | None,
    seq_len: int | list[int] = 512,
    max_windows: int | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    device: str = "cpu",
    text_column: str | None = None,
    stream: Tensor | None = None,
    text_name: str | None = None,
) -> dict[str, Any]:
    """Perplexity of the model at ``path`` on ``data`` (default: held-out embedded text), with settings.

    Several ``seq_len`` values evaluate the same text at each context length (the model is loaded once);
    the result then describes the first length and lists all under ``by_length``. ``stream`` (token ids,
    named ``text_name``) is evaluated instead of ``data``: windows held out of a run's calibration text.
    """
    lengths = [seq_len] if isinstance(seq_len, int) else list(seq_len)
    if stream is None:
        tokenizer = load_tokenizer(path, trust_remote_code)
        text = load_text(data, default=BUILTIN_EVAL, text_column=text_column, tokenizer=tokenizer)
        stream, text_name = tokenize(text, tokenizer), text.name
    model = load_causal_lm(path, dtype, trust_remote_code, device)
    check_context(lengths, getattr(model.config, "max_position_embeddings", None))
    results = []
    for length in lengths:
        windows = eval_windows(stream, length, max_windows)
        results.append(
            {
                "perplexity": perplexity(model, windows, max(1, BATCH_TOKENS // length), progress),
                "seq_len": length,
                "windows": int(windows.shape[0]),
                "tokens": int(windows.numel()),
            }
        )
    first = results[0]
    info = {
        **first,
        "text": text_name,
        "stride": first["seq_len"],
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
    }
    if len(results) > 1:
        info["by_length"] = results
    return info


def eval_lengths(
    requested: tuple[int, ...] | None, asked: list[tuple[int, ...]], config, measured: bool = True
) -> tuple[list[int], list[str]]:
    """Context lengths for the perplexity, within the model's context, and notes on those left out.

    ``requested``: the user's (``--eval-seq-len``; refused beyond the context when ``measured``); else those
    the passes ask for (``asked``, one tuple per pass: an attention window's), else 512.
    """
    wanted = list(requested or sorted({n for lengths in asked for n in lengths}) or [512])
    limit = getattr(config, "max_position_embeddings", None)
    if requested and measured:
        check_context(wanted, limit)  # asked for explicitly: refused, not dropped
    kept = [n for n in wanted if not limit or n <= limit]
    notes = [
        f"perplexity not measured at {n} tokens: beyond max_position_embeddings {limit}"
        for n in wanted
        if n not in kept
    ]
    if not kept:
        kept = [int(limit)]
        notes.append(f"perplexity measured at the model's full context, {limit} tokens")
    return kept, notes


def before_after(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One evaluation record with ``before`` and ``after`` perplexities, per context length too."""

    def pair(b: dict[str, Any], a: dict[str, Any]) -> dict[str, Any]:
        return {
            **{k: v for k, v in a.items() if k != "perplexity"},
            "before": b["perplexity"],
            "after": a["perplexity"],
        }

    info = pair(before, after)
    if "by_length" in after:
        info["by_length"] = [pair(b, a) for b, a in zip(before["by_length"], after["by_length"], strict=True)]
    return info
