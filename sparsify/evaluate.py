"""Perplexity of a causal LM on held-out text, over consecutive non-overlapping windows.

Also the KL to a reference model on the same windows (:func:`evaluate_with_reference`; its log-probabilities on
disk and the meter are :mod:`sparsify.logprobs`'s), encoders' embedding similarity to a baseline, and a forward's
wall time.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsify import interrupts
from sparsify.arch import is_encoder
from sparsify.data import BUILTIN_EVAL, check_token_ids, eval_windows, load_text, tokenize
from sparsify.errors import SparsifyError
from sparsify.loading import load
from sparsify.logprobs import CachedReference, KLMeter, LogprobWriter, SavedLogprobs, window_digest
from sparsify.modules import replaying
from sparsify.progress import NoProgress, Progress, library_bars_silenced
from sparsify.runtime.format import read_config

BATCH_TOKENS = 2048  # tokens per evaluation forward: the logits (tokens × vocab floats) dominate memory
DEFAULT_EVAL_WINDOWS = 16  # windows of the embedded (or held-out) text every perplexity is measured on


def eval_window_count(data: str | None, asked: int | None = None) -> int | None:
    """How many windows a perplexity reads: ``asked``, else :data:`DEFAULT_EVAL_WINDOWS` of the embedded held-out
    text or of a run's held-out calibration windows (``data`` None), else every window of the user's text. One rule
    for the demo, ``sparsify eval`` and every run's before and after, so that one label means one number."""
    if asked is not None:
        return asked
    return DEFAULT_EVAL_WINDOWS if data is None or str(data) == BUILTIN_EVAL else None


def protocol_label(info: dict[str, Any]) -> str:
    """What a perplexity was measured on, as printed beside it: ``builtin:pydoc-topics-heldout, 16 windows × 512
    tokens`` (``info``: an :func:`evaluate` result or one of its ``by_length`` entries with the text's name)."""
    n = int(info["windows"])
    return f"{info.get('text')}, {n} window{'s' if n != 1 else ''} × {info['seq_len']} tokens"


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
def perplexity(
    model: nn.Module,
    windows: Tensor,
    batch_size: int = 4,
    progress: Progress | None = None,
    each: Callable[[Tensor], None] | None = None,
    description: str = "perplexity, batches",
) -> float:
    """``exp(mean NLL)`` over every predicted token of ``windows: (W, L)``; ``each``, given, is handed every
    batch's log-probabilities of the next token ``(B, L - 1, V)`` (float32, on the model's device)."""
    progress = progress or NoProgress()
    nll, count = 0.0, 0
    chunks = windows.split(batch_size)
    device = next(model.parameters()).device
    for chunk in progress.track(chunks, len(chunks), description):
        interrupts.check()
        chunk = chunk.to(device)
        logits = model(input_ids=chunk, use_cache=False).logits.float()  # (B, L, V)
        nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
        count += chunk[:, 1:].numel()
        if each is not None:
            each(logits[:, :-1].log_softmax(-1))  # (B, L - 1, V)
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


def _vocab(model: nn.Module) -> int:
    """The number of logits a forward gives per position."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def _hooks(*hooks: Callable[[Tensor], None] | None) -> Callable[[Tensor], None] | None:
    kept = [h for h in hooks if h is not None]
    if not kept:
        return None

    def each(logprobs: Tensor) -> None:
        for h in kept:
            h(logprobs)

    return each


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
    save_logprobs: SavedLogprobs | None = None,
    kl_from: SavedLogprobs | None = None,
    label: str | None = None,
    cache: Callable[[Tensor], CachedReference | None] | None = None,
) -> dict[str, Any]:
    """Perplexity of the model at ``path`` on ``data`` (default: held-out embedded text), with settings.

    Several ``seq_len`` values evaluate the same text at each context length (the model is loaded once);
    the result then describes the first length and lists all under ``by_length``. ``stream`` (token ids,
    named ``text_name``) is evaluated instead of ``data``: windows held out of a run's calibration text.
    At the first length, ``save_logprobs`` receives the model's log-probabilities of every next token (a KL's
    reference), and with ``kl_from`` (a reference's, on the same windows) the result's ``kl`` is the KL of this
    model's from them (:class:`KLMeter`). ``cache``, given the tokens, returns the model's entry in a cache of
    measurements on them, if it has one: its perplexity is returned instead of measured again (with neither
    ``save_logprobs`` nor ``kl_from``).
    """
    lengths = [seq_len] if isinstance(seq_len, int) else list(seq_len)
    if stream is None:
        tokenizer = load_tokenizer(path, trust_remote_code)
        text = load_text(data, default=BUILTIN_EVAL, text_column=text_column, tokenizer=tokenizer)
        stream, text_name = tokenize(text, tokenizer), text.name
    if cache is not None and save_logprobs is None and kl_from is None and (entry := cache(stream)) is not None:
        try:
            if (found := entry.perplexity()) is not None:
                return {k: v for k, v in found.items() if k != "measured_at"} | {"cached": found.get("measured_at")}
        finally:
            entry.release()
    first_windows = eval_windows(stream, lengths[0], max_windows)
    meter = KLMeter(kl_from, first_windows) if kl_from is not None else None  # refused before the model loads
    model = load_causal_lm(path, dtype, trust_remote_code, device)
    check_context(lengths, getattr(model.config, "max_position_embeddings", None))
    check_token_ids(stream, model.get_input_embeddings().num_embeddings, text_name)
    writer = None
    if save_logprobs is not None:
        writer = LogprobWriter(save_logprobs, first_windows, _vocab(model), str(Path(path).absolute()))
    results = []
    for k, length in enumerate(lengths):
        windows = eval_windows(stream, length, max_windows)
        each = _hooks(writer, meter) if k == 0 else None
        measured = False
        try:
            shown = protocol_label({"text": text_name, "windows": windows.shape[0], "seq_len": length})
            what = f"perplexity of {label or Path(path).name} ({shown}), batches"
            ppl = perplexity(model, windows, max(1, BATCH_TOKENS // length), progress, each, what)
            measured = True
        finally:  # (not sys.exc_info(): an exception a caller is handling around this call is not this one)
            if writer is not None and k == 0:
                writer.close(complete=measured)
        results.append(
            {"perplexity": ppl, "seq_len": length, "windows": int(windows.shape[0]), "tokens": int(windows.numel())}
        )
    first = results[0]
    info = {
        **first,
        "text": text_name,
        "digest": window_digest(first_windows),  # which windows: two perplexities compare only on the same ones
        "stride": first["seq_len"],
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
    }
    if len(results) > 1:
        info["by_length"] = results
    if meter is not None:
        info["kl"] = meter.result()
    return info


def evaluate_with_reference(
    path: Path,
    reference: Path,
    data: str | None,
    seq_len: int | list[int] = 512,
    max_windows: int | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    device: str = "cpu",
    text_column: str | None = None,
    shown: str | None = None,
    required: bool = True,
    cache: Callable[[Tensor], CachedReference | None] | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """:func:`evaluate`, with ``kl``: the KL of the model's next-token distribution from the ``reference`` model's
    (``shown``: as the user named it) on the same windows, at the first length. The reference is evaluated first,
    its log-probabilities streamed to a temporary file (under TMPDIR) and the model freed: one model in memory.
    Without room for that file the KL is refused, or (not ``required``) left out with a line under ``notes``.
    ``cache``, given the evaluation tokens, returns the reference's entry in a cache of measurements (held until this
    returns): its measurement is taken from it, or made into it."""
    shown = shown or str(reference)
    config, ref_config = (read_config(p, trust_remote_code) for p in (path, reference))
    if is_encoder(ref_config.model_type):
        raise SparsifyError(f"the reference {shown} is an encoder ({ref_config.model_type}); KL needs a causal LM")
    vocab, ref_vocab = (getattr(c, "vocab_size", None) for c in (config, ref_config))
    if vocab != ref_vocab:
        raise SparsifyError(
            f"the reference {shown} has a vocabulary of {ref_vocab} tokens, {path} of {vocab}: KL compares"
            " distributions over the same tokens"
        )
    tokenizer = load_tokenizer(path, trust_remote_code)
    try:
        ref_tokens = load_tokenizer(reference, trust_remote_code).get_vocab()
    except SparsifyError:
        ref_tokens = None  # no tokenizer of its own: the vocabulary sizes agree
    if ref_tokens is not None and ref_tokens != tokenizer.get_vocab():
        raise SparsifyError(
            f"the reference {shown} has another tokenizer than {path} (the same ids are other tokens): KL compares"
            " distributions over the same tokens"
        )
    text = load_text(data, default=BUILTIN_EVAL, text_column=text_column, tokenizer=tokenizer)
    stream = tokenize(text, tokenizer)
    lengths = [seq_len] if isinstance(seq_len, int) else list(seq_len)
    first = eval_windows(stream, lengths[0], max_windows)  # (W, L)
    with tempfile.TemporaryDirectory(prefix="sparsify-kl-") as tmp:
        try:
            entry = cache(stream) if cache is not None else None
        except OSError:  # the cache's folder cannot be written: measured as without one
            entry = None
        try:
            ref = entry.perplexity() if entry is not None else None
            if entry is not None and (
                entry.logprobs.problem(first) is not None
                if ref is not None
                else entry.logprobs.space_problem(first, int(vocab or 0)) is not None
            ):
                entry.release()  # without its log-probabilities, or no room for them: measured here, under TMPDIR
                entry, ref = None, None
            saved = entry.logprobs if entry is not None else SavedLogprobs(Path(tmp) / "reference-logprobs")
            if ref is None:
                if (problem := saved.space_problem(first, int(vocab or 0))) is not None:
                    if required:
                        raise SparsifyError(
                            f"KL not measured: {problem} (fewer windows: --max-windows N; elsewhere: TMPDIR)"
                        )
                    info = evaluate(path, None, lengths, max_windows, dtype, trust_remote_code, progress, device,
                                    stream=stream, text_name=text.name, label=label)  # fmt: skip
                    return {**info, "notes": [f"KL to {shown} not measured: {problem}"]}
                ref = evaluate(reference, None, lengths[0], max_windows, dtype, trust_remote_code, progress, device,
                               stream=stream, text_name=text.name, save_logprobs=saved, label=f"the reference {shown}")  # fmt: skip
                if entry is not None:
                    entry.store(ref)
            info = evaluate(path, None, lengths, max_windows, dtype, trust_remote_code, progress, device,
                            stream=stream, text_name=text.name, kl_from=saved, label=label)  # fmt: skip
        finally:
            if entry is not None:
                entry.release()
    info["kl"].update(reference=shown, reference_perplexity=ref["perplexity"])
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
