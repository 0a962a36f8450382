"""A GGUF file of a given size: one type per matrix, chosen by measured damage (``--target-size``/``--target-bpw``).

1. **Menu.** Every float matrix may take each type llama.cpp runs on its shape: the K types and IQ4_XS where its
   rows are whole super-blocks of 256, the legacy types and IQ4_NL where they are whole blocks of 32, Q8_0 and F16
   (:data:`MENU`).
   Vectors stay F32. Each option's bytes are exact (blocks × block size, padded to the file's alignment).
2. **Damage.** For each matrix and type, the rounding error the export would make, weighed by each weight's
   Fisher information (:mod:`.sensitivity`): ``sum F * (W - Q(W))**2``, twice the predicted per-token KL
   divergence to the float model. ``Q`` is the very rounding the file gets (block scales fitted to the
   calibration importance, :mod:`.importance`), measured on every ``stride``-th row and scaled to all rows (rows
   are rounded independently, so a sampled row is rounded exactly as in the file).
3. **Choice.** The least total damage within the budget (:func:`sparsify.algorithms.allocate.allocate`), the
   budget counting every byte of the file (header, vocabulary, vectors) as ``ls -l`` would, or for
   ``--target-bpw`` the tensors' bytes per weight, as llama.cpp prints BPW.

The allocation, the predicted KL divergence and the per-layer type map (:func:`heat_map`) go into the summary.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import Tensor

from sparsify.algorithms.allocate import Option, allocate
from sparsify.algorithms.iq4 import BLOCK as IQ4_BLOCK
from sparsify.algorithms.iq4 import IQ4_TYPES, dequantize_iq4, quantize_iq4
from sparsify.algorithms.kquants import KTYPES, QK_K, WEIGHTED, dequantize_k, quantize_k
from sparsify.algorithms.legacy_quants import dequantize_legacy, quantize_legacy
from sparsify.errors import SparsifyError
from sparsify.progress import NoProgress, Progress
from sparsify.sizes import fmt_bytes, parse_size

MENU = ("q2_k", "q3_k", "iq4_xs", "q4_0", "iq4_nl", "q4_1", "q4_k", "q5_0", "q5_1", "q5_k", "q6_k", "q8_0", "f16")
SAMPLE_ROWS = 128  # rows per matrix whose rounding is measured (every stride-th)
ALIGN = 32  # GGUF's default data alignment
# the heat map's column order
_COLUMNS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "ffn_gate_exps",
            "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")  # fmt: skip


def menu(cols: int) -> list[str]:
    """The types llama.cpp runs on rows of ``cols`` weights."""
    return [n for n in MENU if n == "f16" or cols % _block(n) == 0]


def _block(name: str) -> int:
    """Weights per (super-)block of the type ``name``: what a row's length must be a multiple of."""
    return QK_K if name in KTYPES else IQ4_BLOCK.get(name, 32)


def type_bytes(shape: tuple[int, ...], name: str) -> int:
    """The tensor's bytes in the file in type ``name``, padded to the alignment."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    block, size = GGML_QUANT_SIZES[Q[name.upper()]]
    return pad(math.prod(shape) // block * size)


def pad(n: int) -> int:
    """``n`` bytes padded to the file's data alignment."""
    return -(-n // ALIGN) * ALIGN


def roundtrip(x: Tensor, name: str, imp: Tensor | None) -> Tensor:
    """``x`` (rows, cols) as the file holds it in type ``name``, dequantized to float32."""
    if name == "f16":
        return x.half().float()
    if name in KTYPES:
        return dequantize_k(quantize_k(x, name, imp))
    if name in IQ4_TYPES:
        return dequantize_iq4(quantize_iq4(x, name, imp))
    return dequantize_legacy(quantize_legacy(x, name, imp if name in WEIGHTED else None))


def damage(w: Tensor, fisher: Tensor, name: str, imp: Tensor | None) -> float:
    """``sum F * (W - Q(W))**2`` over every row, measured on at most :data:`SAMPLE_ROWS` evenly spaced rows."""
    w, fisher = w.reshape(-1, w.shape[-1]).float(), fisher.reshape(-1, w.shape[-1]).float()  # (rows, cols)
    stride = max(1, w.shape[0] // SAMPLE_ROWS)
    rows = torch.arange(0, w.shape[0], stride)  # (sampled,)
    err = (w[rows] - roundtrip(w[rows], name, imp)).square()  # (sampled, cols)
    return float((fisher[rows] * err).sum(dtype=torch.float64)) * w.shape[0] / len(rows)


def target_bytes(config, header: int, elements: int) -> int:
    """The file's bytes the user asked for: ``--target-size``, or ``--target-bpw`` over every tensor's weights plus
    the header."""
    if config.target_size is not None:
        return parse_size(config.target_size)
    return header + int(config.target_bpw * elements / 8)


def fit_budget(p, md, config, header: int, progress: Progress | None = None) -> None:
    """Choose every float matrix's type in the plan ``p`` (see the module docstring); ``header``: the file's bytes
    before the first tensor."""
    progress = progress or NoProgress()
    free = [t for t in p.tensors if _free(t)]
    if p.layouts:
        raise SparsifyError(
            f"{_flag(config)} needs a float checkpoint; this one is quantized (export it as stored without a budget)"
        )
    if not free:
        raise SparsifyError(f"{_flag(config)}: the model has no float matrices to choose types for")
    fixed = sum(type_bytes(t.shape, t.qtype.name.lower()) for t in p.tensors if not _free(t))
    elements = sum(math.prod(t.shape) for t in p.tensors)
    menus = {t.name: menu(t.shape[-1]) for t in free}
    sizes = {t.name: [type_bytes(t.shape, n) for n in menus[t.name]] for t in free}
    want = target_bytes(config, header, elements)
    low = header + fixed + sum(min(s) for s in sizes.values())
    high = header + fixed + sum(max(s) for s in sizes.values())
    if want < low:
        raise SparsifyError(f"{_flag(config)} {_asked(config)} is below the smallest file this model can be:"
                            f" {fmt_bytes(low)} ({_bpw(low - header, elements)} bits per weight)")  # fmt: skip
    if want > high:
        raise SparsifyError(f"{_flag(config)} {_asked(config)} is above the F16 file ({fmt_bytes(high)}):"
                            " use --type f16")  # fmt: skip
    imps = _importance(p, md, config, free, progress)
    names = {s for t in free for s in t.sources}
    from sparsify.export.sensitivity import weight_fisher

    fisher = weight_fisher(md, config.calib, config.samples, config.seq_len, config.seed, names, progress)
    options: list[list[Option]] = []
    uniform = [t.name for t in free if any(s not in fisher for s in t.sources)]
    mean = sum(float(f.sum()) for f in fisher.values()) / sum(f.numel() for f in fisher.values()) if fisher else 1.0
    for t in progress.track(free, len(free), "damage of each matrix at each type"):
        w = torch.stack([md.source.get_many([s])[s].float() for s in t.sources])  # (experts or 1, out, in)
        f = torch.stack([fisher[s] if s in fisher else torch.full(w.shape[1:], mean) for s in t.sources])
        imp = imps.get(t.name)
        options.append([Option(b, damage(w, f, n, imp)) for n, b in zip(menus[t.name], sizes[t.name], strict=True)])
    chosen = allocate(options, want - header - fixed)
    from gguf import GGMLQuantizationType as Q

    predicted = 0.0
    for t, opts, j in zip(free, options, chosen, strict=True):
        name = menus[t.name][j]
        t.qtype, t.how = Q[name.upper()], ("float" if name == "f16" else "quantized")
        t.importance = imps.get(t.name) if name in WEIGHTED else None
        predicted += 0.5 * opts[j].damage
    total = header + fixed + sum(o[j].bytes for o, j in zip(options, chosen, strict=True))
    p.budget = {
        "asked_bytes": want,
        "bytes": total,
        "bits_per_weight": round((total - header) * 8 / elements, 4),
        "predicted_kl": predicted,
        "types": {t.name: menus[t.name][j] for t, j in zip(free, chosen, strict=True)},
    }
    p.notes.append(
        f"{_flag(config)} {_asked(config)}: {len(free)} matrices typed by measured damage"
        f" ({', '.join(f'{n} {k}' for k, n in sorted(Counter(p.budget['types'].values()).items()))}),"
        f" {fmt_bytes(total)} ({p.budget['bits_per_weight']:.2f} bits per weight);"
        f" predicted KL divergence to the float model {predicted:.3g} per token"
    )
    if uniform:
        p.notes.append(f"{len(uniform)} matrices' damage weighed by the model's mean sensitivity (no gradient"
                       " of their own: stacked experts)")  # fmt: skip


def _free(t) -> bool:
    """A matrix whose type the budget chooses: 2-D or stacked, written from floats (not kept in F32)."""
    return len(t.shape) > 1 and t.how == "float" and t.values is None and t.qtype.name != "F32"


def _importance(p, md, config, free: list, progress: Progress) -> dict[str, Tensor]:
    """GGUF name -> the (in,) importance its blocks are fitted with (empty with ``--importance none``)."""
    from sparsify.export.importance import importance_for

    return importance_for(free, md, config, progress)


def _flag(config) -> str:
    return "--target-size" if config.target_size is not None else "--target-bpw"


def _asked(config) -> str:
    return config.target_size if config.target_size is not None else f"{config.target_bpw:g}"


def _bpw(n: int, elements: int) -> str:
    return f"{n * 8 / elements:.2f}"


def heat_map(types: dict[str, str]) -> list[str]:
    """The chosen type per layer (rows) and matrix (columns), as text: ``blk.0.attn_q.weight`` -> row 0, column
    attn_q; tensors outside the blocks on one line."""
    layers: dict[int, dict[str, str]] = {}
    outside = []
    for name, kind in types.items():
        parts = name.split(".")
        if parts[0] == "blk":
            layers.setdefault(int(parts[1]), {})[parts[2]] = kind
        else:
            outside.append(f"{parts[0]} {kind}")
    seen = {c for row in layers.values() for c in row}
    columns = [c for c in _COLUMNS if c in seen] + sorted(seen - set(_COLUMNS))
    width = max([len(c) for c in columns] + [4])
    lines = ["layer " + " ".join(c.ljust(width) for c in columns)] if columns else []
    for i in sorted(layers):
        lines.append(f"{i:>5} " + " ".join(layers[i].get(c, "-").ljust(width) for c in columns))
    if outside:
        lines.append("other: " + ", ".join(outside))
    return [line.rstrip() for line in lines]
