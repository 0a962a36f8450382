"""Perplexity and KL of the input and the output on the held-out windows, and a forward's wall time."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from sparsify.arch import is_encoder
from sparsify.checkpoint import ModelDir
from sparsify.checkpoint.output import STATE_DIR
from sparsify.data import eval_windows
from sparsify.evaluate import (
    BATCH_TOKENS,
    before_after,
    embedding_similarity,
    eval_window_count,
    evaluate,
    forward_seconds,
    protocol_label,
)
from sparsify.logprobs import SavedLogprobs
from sparsify.pipeline.options import Options, _Run
from sparsify.pipeline.prepare import _dtype
from sparsify.progress import NOTICE
from sparsify.references import evict, open_reference, reference_key
from sparsify.sizes import fmt_bytes

log = logging.getLogger(__name__)


@dataclass
class _Measured:
    """Perplexity (decoders; the output's with its KL from the input's next-token distribution) and a forward's wall
    time (``--latency``) of one folder; None: not measured. ``note``: why the KL was not measured."""

    perplexity: dict[str, Any] | None
    seconds: float | None
    note: str | None = None
    logprobs: SavedLogprobs | None = None  # the input's: the output's KL reference (None: not saved)


def _reference_logprobs(work_dir: Path) -> SavedLogprobs:
    """Where the input's log-probabilities wait for the output's KL: in the work folder's state, which goes before
    the rename into place (and stays for ``--resume``)."""
    return SavedLogprobs(work_dir / STATE_DIR / "reference-logprobs")


def _measure(
    path: Path,
    run: _Run,
    opts: Options,
    save: SavedLogprobs | None = None,
    kl_from: SavedLogprobs | None = None,
    label: str = "the input",
) -> _Measured:
    """``path`` (``label``: the input or the output) measured; the input's log-probabilities streamed to ``save`` as
    its perplexity is (on the first length's windows), or the KL from those in ``kl_from`` measured with the
    output's."""
    ppl, note = None, None
    if run.eval_stream is not None:
        windows = eval_windows(run.eval_stream, run.eval_lengths[0], _eval_window_count(opts))  # (W, L)
        if save is not None:
            problem = save.space_problem(windows, int(getattr(run.config, "vocab_size", 0) or 0))
        else:
            problem = kl_from.problem(windows) if kl_from is not None else None
        if problem is not None:
            if save is not None:  # an interrupted run's, were it left, is not taken for this one's
                save.meta_path.unlink(missing_ok=True)
            note, save, kl_from = f"KL to the input not measured: {problem}", None, None
        ppl = _perplexity(path, run, opts, save, kl_from, label)
    return _Measured(ppl, _seconds(path, run, opts), note, save)


def _seconds(path: Path, run: _Run, opts: Options) -> float | None:
    if not opts.latency:
        return None
    return forward_seconds(path, _latency_len(run), torch.float32, opts.trust_remote_code, opts.device)


def _measure_input(
    md: ModelDir, run: _Run, opts: Options, fingerprint: str, work_dir: Path, held: contextlib.ExitStack
) -> _Measured:
    """The input measured (:func:`_measure`), or its measurement on this protocol taken from the cache
    (:mod:`sparsify.references`): measured once per model and protocol, by whichever run came first. The entry
    stays ``held`` (not evicted) until the output's KL has read it; while another run measures the same entry,
    this one measures into its work folder (kept there for ``--resume``)."""
    if run.eval_stream is None or is_encoder(run.config.model_type):
        return _measure(md.path, run, opts)
    own = partial(_measure, md.path, run, opts, save=_reference_logprobs(work_dir))  # into the work folder
    if opts.trust_remote_code:  # the model's own code is not in the key
        return own()
    count = _eval_window_count(opts)
    key = reference_key(fingerprint, run.eval_stream, run.eval_lengths, count, str(_dtype(run.recipe)), opts.device)
    windows = eval_windows(run.eval_stream, run.eval_lengths[0], count)  # (W, L)
    try:
        ref = open_reference(key, usable=lambda r: r.logprobs.problem(windows) is None)
    except OSError as e:  # the cache's folder cannot be written: measured as without one
        log.info("the cache of measurements is not usable (%s): the input measured into the work folder", e)
        ref = None
    if ref is None:
        return own()
    held.callback(ref.release)
    vocab = int(getattr(run.config, "vocab_size", 0) or 0)
    if ref.perplexity() is None and ref.logprobs.space_problem(windows, vocab) is not None:
        ref.release()  # no room on the cache's disk: the work folder's may have it
        return own()
    if (info := ref.perplexity()) is not None:
        when = info.get("measured_at", "earlier")
        log.info("the input's perplexity on %s: %.3f, measured %s (cached)", protocol_label(info),
                 info["perplexity"], when)  # fmt: skip
        note = f"the input's perplexity and log-probabilities on these windows taken from the cache (measured {when})"
        return _Measured(info, _seconds(md.path, run, opts), note, ref.logprobs)
    measured = _measure(md.path, run, opts, save=ref.logprobs)
    if measured.perplexity is not None:
        ref.store(measured.perplexity)
        evict(keep=ref.dir.name)
        log.log(
            NOTICE,
            "the input's perplexity and log-probabilities on these windows (%s) are kept in %s for"
            " later runs of this model (sparsify cache --clear frees them)",
            fmt_bytes(ref.bytes),
            ref.dir.parent,
        )
    return measured


def _eval_info(
    md: ModelDir,
    out_dir: Path,
    run: _Run,
    opts: Options,
    before: _Measured,
    after: _Measured,
    before_recovery: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Perplexity before and after (decoders; and before a recovery pass, at the first length, where measured),
    or the embeddings' similarity to the input's (encoders)."""
    if opts.evaluate and is_encoder(run.config.model_type):
        return embedding_similarity(out_dir, md.path, opts.eval_data, dtype=_dtype(run.recipe), device=opts.device)
    if before.perplexity is None or after.perplexity is None:
        return None
    info = before_after(before.perplexity, after.perplexity)
    if before_recovery is not None:
        info["before_recovery"] = before_recovery
    return info


def _latency_len(run: _Run) -> int:
    return min(512, *run.eval_lengths)


def _eval_window_count(opts: Options) -> int | None:
    return eval_window_count(opts.eval_data, opts.eval_max_windows)


def _probe(run: _Run, opts: Options) -> list[torch.Tensor] | None:
    """The perplexity's windows (first context length), in batches, for a stage with a recovery pass (heal): the
    report measures the model as it was before it on them too (rank 0 only: it alone measures)."""
    if run.eval_stream is None or not opts.world.leader:
        return None
    length = run.eval_lengths[0]
    windows = eval_windows(run.eval_stream, length, _eval_window_count(opts))  # (W, L)
    return list(windows.split(max(1, BATCH_TOKENS // length)))


def _perplexity(
    path: Path,
    run: _Run,
    opts: Options,
    save: SavedLogprobs | None = None,
    kl_from: SavedLogprobs | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    return evaluate(
        path,
        None,
        run.eval_lengths,
        _eval_window_count(opts),
        _dtype(run.recipe),
        opts.trust_remote_code,
        opts.progress,
        opts.device,
        stream=run.eval_stream,
        text_name=run.eval_name,
        save_logprobs=save,
        kl_from=kl_from,
        label=label,
    )
