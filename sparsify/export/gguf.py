"""A checkpoint as one GGUF file for llama.cpp and Ollama (``sparsify export gguf``).

What llama.cpp's ``convert_hf_to_gguf.py`` does, for the families sparsify writes and llama.cpp runs
(:data:`sparsify.arch.GGUF_ARCHITECTURES`), with one difference: a compressed-tensors checkpoint is written
as stored wherever a GGUF block type has its layout, not dequantized and rounded again.

- The plan (:mod:`.gguf_plan`): names, shapes, types and every check; the tokenizer from :mod:`.gguf_vocab`.
- Float matrices in ``--type`` are rounded here, by :mod:`sparsify.algorithms.kquants` (K types),
  :mod:`sparsify.algorithms.legacy_quants` (Q4_0 .. Q8_0) and :mod:`sparsify.algorithms.iq4` (IQ4_NL, IQ4_XS):
  their block scales fitted to each Linear's input importance on
  calibration text, :mod:`.importance`, unless ``--importance none`` (for the legacy types llama.cpp's reference
  rounding, gguf-py's bytes).
- Everything that can refuse does before the file is opened (:func:`.gguf_plan.plan`); the tensors are then converted
  one at a time and streamed to a temporary file beside the output, renamed when complete.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sparsify.algorithms.iq4 import IQ4_TYPES, quantize_iq4
from sparsify.algorithms.kquants import KTYPES, WEIGHTED, quantize_k
from sparsify.algorithms.legacy_quants import LEGACY, quantize_legacy
from sparsify.errors import SparsifyError
from sparsify.export import GgufConfig, budget, kquant_blocks
from sparsify.export import ggml_blocks as blocks
from sparsify.export.gguf_plan import Plan, Planned, ScaleChanges, kv_heads, plan, rope_parameters
from sparsify.export.gguf_vocab import Vocab, chat_template, merges
from sparsify.export.gguf_weights import Stored, read_quantized, stack
from sparsify.interrupts import Interrupted, check, deferred
from sparsify.progress import Progress

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ the writing


def write_gguf(model: str | Path, out: Path, config: GgufConfig, overwrite: bool, progress: Progress) -> dict:
    """Export ``model`` to the GGUF file ``out``; the summary (see :mod:`sparsify.export`)."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SparsifyError("GGUF export needs the gguf extra: pip install 'sparsify-llm[gguf]'") from None
    from sparsify.checkpoint import open_model

    out = _check_output(out, overwrite, model)
    md = open_model(model)
    p = plan(md, out, config)
    if config.target_size is not None or config.target_bpw is not None:
        budget.fit_budget(p, md, config, _header_bytes(p, md), progress)
    else:
        _add_importance(p, md, config, progress)
    log.info("%s: %d tensors, %s", out.name, len(p.tensors), ", ".join(f"{n} {k}" for k, n in _types(p).items()))
    with _aside(out, overwrite) as tmp:
        _write(p, md, tmp, progress)
    try:
        return _summary(p, out)
    except Interrupted as e:  # the file is in place: say so
        e.finished = str(out)
        raise


def _add_importance(p: Plan, md, config: GgufConfig, progress: Progress) -> None:
    """Each matrix fitted here (K types; IQ4_NL, IQ4_XS; Q4_0, Q4_1, Q5_0, Q5_1) gets its per-column importance,
    measured on calibration text or read from a llama-imatrix file (``config.importance``); a note where a tensor has none (embeddings, output head,
    stacked experts, a quantized checkpoint's)."""
    fitted = [t for t in p.tensors if t.qtype is not None and t.how != "as stored" and t.qtype.name.lower() in WEIGHTED]
    if config.importance == "none" or not fitted:
        return
    if p.layouts:
        p.notes.append("block scales fitted unweighted: importance is measured on float checkpoints only")
        return
    from sparsify.export.importance import importance_for

    found = importance_for(fitted, md, config, progress)
    for t in fitted:
        t.importance = found.get(t.name)
    unweighted = [t for t in fitted if t.importance is None]
    if unweighted:
        where = "in the file" if config.importance != "calibration" else "measured"
        p.notes.append(
            f"{len(unweighted)} tensors' block scales fitted unweighted (no importance {where} for them: embeddings,"
            " output head, stacked experts)"
        )


def _check_output(out: Path, overwrite: bool, model: str | Path) -> Path:
    """Refuse an output that is a folder, exists (without ``overwrite``), or is the input file itself (a ``.gguf``
    exported again: ``--overwrite`` would replace the model being exported)."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise SparsifyError(f"{out} is a folder; name the GGUF file to write")
    source = Path(model).expanduser()
    if source.is_file() and (out.resolve() == source.resolve() or (out.exists() and os.path.samefile(out, source))):
        raise SparsifyError(f"{out} is the input model {model}; choose another file for the export")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise SparsifyError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise SparsifyError(f"{out.parent} is not a folder: the GGUF file goes into an existing folder")
    return out


@contextlib.contextmanager
def _aside(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary file beside ``out``, locked while it is written, renamed to it when the block completes; removed
    otherwise. The temporary files of earlier exports to ``out`` that died (SIGKILL, power loss) are removed first."""
    from sparsify.checkpoint.output import rename_noreplace

    _sweep_partials(out)
    tmp, lock = _claim_partial(out)
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # as a plain open() would create it (mkstemp's is private)
        yield tmp
        check()  # a safe point: the last before the rename
        try:
            with deferred():  # a signal during the rename is raised after it
                if overwrite:
                    os.replace(tmp, out)
                elif not rename_noreplace(tmp, out):
                    raise SparsifyError(f"{out} appeared while writing; pass --overwrite to replace it")
        except Interrupted as e:
            if not tmp.exists():  # renamed: the file is complete and in place
                e.finished = str(out)
            raise
    finally:
        tmp.unlink(missing_ok=True)
        if lock >= 0:
            os.close(lock)


def _claim_partial(out: Path) -> tuple[Path, int]:
    """A new temporary file beside ``out`` and the descriptor of its lock (``flock``, as sparsify's work folders are
    locked: held until this process closes it or dies; -1 where the platform has no locks)."""
    from sparsify.checkpoint.output import _lock

    for _ in range(10):
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
        os.close(fd)
        tmp = Path(name)
        lock = _lock(tmp)
        with contextlib.suppress(OSError):
            if lock is not None and (lock < 0 or os.stat(tmp).st_ino == os.fstat(lock).st_ino):
                return tmp, lock
        if lock is not None and lock >= 0:  # another export swept it between its creation and the lock
            os.close(lock)
    raise SparsifyError(f"could not create a temporary file beside {out}: other exports keep removing it")


def _sweep_partials(out: Path) -> None:
    """Remove the temporary files that exports to ``out`` left when they died: named as :func:`_claim_partial`
    names them, plain files, and unlocked (a live export holds its file's lock; a dead one's was released)."""
    from sparsify.checkpoint.output import _lock

    name = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}\.partial")  # mkstemp's 8 random characters
    for p in out.parent.glob(f".{glob.escape(out.name)}.*.partial"):
        if not name.fullmatch(p.name) or p.is_symlink() or not p.is_file():
            continue
        lock = _lock(p)
        if lock is not None and lock >= 0:  # None: a live export's; -1: no locks on this platform, no telling
            p.unlink(missing_ok=True)
            os.close(lock)


def _writer(p: Plan, md, path: Path):
    """A GGUFWriter that has written the header, metadata and tensor infos to ``path``."""
    import gguf

    writer = gguf.GGUFWriter(None, p.arch.name)
    _metadata(writer, p, md)
    for t in p.tensors:
        shape, dtype, nbytes, raw = _info(t)
        writer.add_tensor_info(t.name, shape, dtype, nbytes, raw_dtype=raw)
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
    except BaseException:
        writer.close()
        raise
    return writer


def _header_bytes(p: Plan, md) -> int:
    """The file's bytes before the first tensor (the header's size does not depend on the tensors' types)."""
    from gguf import GGMLQuantizationType as Q

    typed = replace(p, tensors=[replace(t, qtype=t.qtype or Q.F32) for t in p.tensors])
    with tempfile.TemporaryDirectory() as scratch:
        _writer(typed, md, Path(scratch) / "header.gguf").close()
        size = (Path(scratch) / "header.gguf").stat().st_size
    return budget.pad(size)


def _write(p: Plan, md, path: Path, progress: Progress) -> None:
    writer = _writer(p, md, path)
    changes = ScaleChanges()
    try:
        for t in progress.track(p.tensors, len(p.tensors), "writing GGUF"):
            check()  # a safe point between tensors
            w = _load(t, p, md)
            if t.how == "as stored":
                changes.add(w)
            writer.write_tensor_data(_encode(t, w))
    finally:
        writer.close()
    note = changes.note()
    if note:
        p.notes.append(note)


def _info(t: Planned) -> tuple[tuple[int, ...], Any, int, Any]:
    """``(shape, numpy dtype, bytes, raw type)`` as GGUFWriter.add_tensor_info takes them."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quant_shape_to_byte_shape

    if t.qtype == Q.F32:
        return t.shape, np.float32, int(np.prod(t.shape)) * 4, None
    if t.qtype == Q.F16:
        return t.shape, np.float16, int(np.prod(t.shape)) * 2, None
    byte_shape = quant_shape_to_byte_shape(t.shape, t.qtype)
    return byte_shape, np.uint8, int(np.prod(byte_shape)), t.qtype


def _load(t: Planned, p: Plan, md) -> Stored:
    """The tensor's weight, stacked, permuted, offset and reshaped as GGUF holds it."""
    if t.values is not None:
        return Stored(tensor=t.values)
    parts = [read_quantized(md.source, s.rpartition(".")[0], p.layouts[s]) if s in p.layouts
             else Stored(tensor=md.source.get_many([s])[s]) for s in t.sources]  # fmt: skip
    w = stack(parts) if len(parts) > 1 else parts[0]
    if t.permute_heads:
        w = w.rows(_rotary_rows(w.shape[-2] if len(w.shape) > 1 else w.shape[0], t.permute_heads))
    if t.offset or t.reshape is not None or (w.quantized and t.how != "as stored"):
        dense = w.dense() + t.offset
        w = Stored(tensor=dense.reshape(t.reshape) if t.reshape is not None else dense)
    return w


def _rotary_rows(rows: int, heads: int) -> Tensor:
    """The row order llama.cpp's rotary layout wants, per head: (pairs of halves) -> (interleaved pairs), as
    ``convert_hf_to_gguf.py``'s ``LlamaModel.permute``: ``W.reshape(heads, 2, d / 2, in).swapaxes(1, 2)``."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)  # (rows,)


def _encode(t: Planned, w: Stored) -> np.ndarray:
    """The tensor's bytes in its GGUF type: our own integers and scales as stored, else rounded by gguf."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quant_shape_to_byte_shape, quantize

    if t.how == "as stored":
        rows = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731  (..., rows, n) -> (all rows, n)
        codes, scale = rows(w.codes), rows(w.scale)
        if t.qtype == Q.Q4_0:
            data = blocks.q4_0(codes, scale)
        elif t.qtype == Q.Q4_1:
            data = blocks.q4_1(codes, scale, rows(w.zero_point))
        else:
            data = blocks.q8_0(codes, scale)
        return data.reshape(quant_shape_to_byte_shape(t.shape, t.qtype))
    if t.qtype.name.lower() in KTYPES:  # ours: gguf-py does not quantize K types
        x = w.tensor.to(torch.float32).reshape(-1, t.shape[-1])  # type: ignore[union-attr]  (all rows, cols)
        data = kquant_blocks.pack(quantize_k(x, t.qtype.name.lower(), t.importance))
        return data.reshape(quant_shape_to_byte_shape(t.shape, t.qtype))
    if t.qtype.name.lower() in IQ4_TYPES:  # ours: gguf-py does not quantize them either
        x = w.tensor.to(torch.float32).reshape(-1, t.shape[-1])  # type: ignore[union-attr]  (all rows, cols)
        data = kquant_blocks.pack_iq4(quantize_iq4(x, t.qtype.name.lower(), t.importance))
        return data.reshape(quant_shape_to_byte_shape(t.shape, t.qtype))
    if t.qtype.name.lower() in LEGACY:  # llama.cpp's imatrix fit with importance; gguf-py's bytes without
        x = w.tensor.to(torch.float32).reshape(-1, t.shape[-1])  # type: ignore[union-attr]  (all rows, cols)
        data = blocks.pack_legacy(quantize_legacy(x, t.qtype.name.lower(), t.importance))
        return data.reshape(quant_shape_to_byte_shape(t.shape, t.qtype))
    x = w.tensor.to(torch.float32).contiguous().numpy()  # type: ignore[union-attr]
    if t.qtype == Q.F32:
        return x
    if t.qtype == Q.F16:
        return x.astype(np.float16)
    return quantize(x, t.qtype).reshape(quant_shape_to_byte_shape(t.shape, t.qtype))


# ---------------------------------------------------------------------------------------------- the metadata


def _metadata(w, p: Plan, md) -> None:
    """The model's and the tokenizer's keys, as llama.cpp's converter writes them for these families."""
    import gguf

    cfg, fam = p.config, p.arch
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    w.add_name(md.path.name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads(cfg))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(int(cfg.vocab_size))
    rope = rope_parameters(cfg)
    w.add_rope_dimension_count(int(head_dim * float(rope.get("partial_rotary_factor", 1.0))))
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    _moe_metadata(w, cfg)
    window = getattr(cfg, "sliding_window", None)
    if fam.windows != "none" and window:
        w.add_sliding_window(int(window))
    if fam.softcapping:
        for key, add in (("attn_logit_softcapping", w.add_attn_logit_softcapping),
                         ("final_logit_softcapping", w.add_final_logit_softcapping)):  # fmt: skip
            if getattr(cfg, key, None) is not None:
                add(float(getattr(cfg, key)))
    w.add_file_type(_file_type(p.tensors, p.file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer_metadata(w, p.vocab, md.path)


def _moe_metadata(w, cfg) -> None:
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if not experts:
        return
    w.add_expert_count(int(experts))
    w.add_expert_used_count(int(cfg.num_experts_per_tok))
    if getattr(cfg, "moe_intermediate_size", None):
        w.add_expert_feed_forward_length(int(cfg.moe_intermediate_size))
    if getattr(cfg, "shared_expert_intermediate_size", None):
        w.add_expert_shared_feed_forward_length(int(cfg.shared_expert_intermediate_size))


def _file_type(tensors: list[Planned], named: str | None = None) -> int:
    """llama.cpp's ``general.file_type``: ``named`` (a mix's), else the type most matrix weights have."""
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    if named is not None:
        return int(F[named])
    counts = Counter(t.qtype for t in tensors if len(t.shape) > 1)
    top = counts.most_common(1)[0][0] if counts else Q.F32
    return int({Q.F32: F.ALL_F32, Q.F16: F.MOSTLY_F16, Q.BF16: F.MOSTLY_BF16, Q.Q8_0: F.MOSTLY_Q8_0,
                Q.Q4_0: F.MOSTLY_Q4_0, Q.Q4_1: F.MOSTLY_Q4_1, Q.Q5_0: F.MOSTLY_Q5_0, Q.Q5_1: F.MOSTLY_Q5_1,
                Q.Q2_K: F.MOSTLY_Q2_K, Q.Q3_K: F.MOSTLY_Q3_K_S, Q.Q4_K: F.MOSTLY_Q4_K_S, Q.Q5_K: F.MOSTLY_Q5_K_S,
                Q.Q6_K: F.MOSTLY_Q6_K, Q.IQ4_NL: F.MOSTLY_IQ4_NL, Q.IQ4_XS: F.MOSTLY_IQ4_XS}[top])  # fmt: skip


def _tokenizer_metadata(w, vocab: Vocab, folder: Path) -> None:
    w.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if vocab.model == "gpt2":
        w.add_token_merges(merges(folder))
    for name, i in vocab.special.items():
        getattr(w, f"add_{name}_token_id")(i)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if vocab.space_prefix is not None:
        w.add_add_space_prefix(vocab.space_prefix)
    template = chat_template(folder)
    if template:
        w.add_chat_template(template)


def _types(p: Plan) -> dict[str, int]:
    return dict(sorted(Counter(t.qtype.name for t in p.tensors).items()))


def _summary(p: Plan, out: Path) -> dict[str, Any]:
    return {
        "format": "gguf",
        "path": str(out),
        "bytes": out.stat().st_size,
        "architecture": p.arch.name,
        "tensors": len(p.tensors),
        "types": _types(p),
        "as_stored": sum(t.how == "as stored" for t in p.tensors),
        "requantized": sum(t.how == "requantized" for t in p.tensors),
        "requantized_tensors": [t.name for t in p.tensors if t.how == "requantized"],
        "notes": p.notes,
        **_budget_summary(p),
    }


def _budget_summary(p: Plan) -> dict[str, Any]:
    if p.budget is None:
        return {}
    return {"budget": p.budget, "details": budget.heat_map(p.budget["types"])}
