"""llama.cpp's non-linear 4-bit types IQ4_NL and IQ4_XS chosen by weighted least squares, whole tensors at once.

Both hold 4-bit indices into one fixed grid of 16 levels, ``kvalues_iq4nl`` (:data:`KVALUES`: ``-127 .. 113``,
denser near 0, as the values of a trained weight are), times a scale:

- IQ4_NL: blocks of 32 weights of a row, each with its fp16 ``d``; a weight decodes as ``d * KVALUES[q]``
  (``block_iq4_nl``, 18 bytes: 4.5 bits per weight);
- IQ4_XS: super-blocks of 256 weights with an fp16 ``d`` and 8 sub-blocks of 32, each with a signed 6-bit scale
  ``l`` in ``[-32, 31]`` (stored ``l + 32``); a weight decodes as ``(d * l) * KVALUES[q]`` (``block_iq4_xs``, 136
  bytes: 4.25 bits per weight).

The choice follows llama.cpp's ``quantize_row_iq4_nl_impl`` (``ggml-quants.c``; what ``quantize_iq4_nl`` and
``quantize_iq4_xs`` run, with or without an imatrix), written again for whole tensors (loops only over the
candidates, never over blocks), per block of 32 (:func:`fit_blocks`): the first guess ``d = max / 127`` (``max`` the
value of largest magnitude, signed) rounds every ``x / d`` to the nearest level (``best_index_int8``: ties to the
upper one) and ``d`` is refitted by weighted least squares; then the inverse scales ``(i - 127) / max``,
``i = -7..7`` (the extreme on the grid's negative end, ``-127 + i``), each rounding refitted likewise; the
candidate that removes the most weighted error, ``sum(v x q)**2 / sum(v q**2)``, is kept. IQ4_NL stores that ``d``;
IQ4_XS quantizes its 8 sub-block scales against the super-block's ``d = -s / 32`` (``s`` the sub-block scale of
largest magnitude, signed: it lands on ``-32``, the end with one more level), ``l = round(scale / d)``. The codes
are then chosen again, each the level nearest to ``x / (d * l)`` (or ``x / d``) for the scales the file holds.

The error minimised is ``sum_ij v_ij * (w_ij - ŵ_ij) ** 2`` with llama.cpp's per-element weights
(:func:`iq4_weights`): with a per-column importance ``imp`` (the diagonal of ``X^T X``, llama.cpp's imatrix)
``imp_j * sqrt(s2 + w_ij**2)``, ``s2`` twice the mean square of the block the scales are fitted in (the 32 weights
of an IQ4_NL block, the 256 of an IQ4_XS super-block: llama.cpp's ``sigma2 = 2 * sum_x2 / super_block_size``, not
the row's as for Q4_0); without, ``w_ij**2``. Where this differs from llama.cpp:

- the codes are chosen again for the fp16 ``d`` (and the sub-block scales ``l`` rounded against it) that the file
  holds; llama.cpp rounds against its float32 ``d`` (and keeps IQ4_NL's fitted codes against the unrounded scale).
  The nearest level of ``x / scale`` minimises each weight's error for that scale, so this can only lower it;
- IQ4_XS: each sub-block's ``l`` is the best of ``round(scale / d)`` and its two neighbours, by the weighted error
  of the codes chosen again for each (llama.cpp: the rounding alone): 0.3-4% less weighted error on Gaussian and
  Student-t matrices;
- a candidate must win by a relative 1e-12 (ties go to the first, whatever the last bits of a sum); float64
  throughout;
- a block all of whose weights are below 1e-15 in magnitude (llama.cpp's ``GROUP_MAX_EPS``) has scale 0 and codes
  8 (the level ``1``), as there; an IQ4_XS super-block whose sub-blocks all are has ``d = +0.0`` (llama.cpp:
  ``-0.0``); columns of ``imp`` below 1e-6 of its mean (never active in calibration) count as that much (llama.cpp
  writes a block whose columns were all silent as zeros).

The float32 values of :func:`dequantize_iq4` are bit for bit what ggml (and ``gguf.quants``) decode from the packed
blocks (``sparsify.export.kquant_blocks.pack_iq4``): ``d * l`` (11 and 6 significant bits) and its product with a
level (7 bits) are exact in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparsify.algorithms.kquants import EPS, QK_K, TIE, check_weight, fp16_block, silent_floor

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml's kvalues_iq4nl
QK_IQ4 = 32  # weights per IQ4_NL block and per IQ4_XS sub-block
IQ4_TYPES = ("iq4_nl", "iq4_xs")
BLOCK = {"iq4_nl": QK_IQ4, "iq4_xs": QK_K}  # weights per (super-)block: what a row's length must be a multiple of
NTRY = 7  # llama.cpp's ntry: the inverse scales (i - 127) / max, i = -7..7
SCALE_MIN, SCALE_MAX = -32, 31  # IQ4_XS's 6-bit sub-block scales, stored + 32
ZERO_CODE = 8  # the level nearest 0 (KVALUES[8] = 1): the codes of a block whose scale is 0
CHUNK = 65536  # blocks of 32 quantized at once (whole rows): a few tens of MB of float64 temporaries
F64 = torch.float64


@dataclass(frozen=True)
class IQ4Quant:
    """A weight ``(rows, cols)`` in IQ4_NL or IQ4_XS: the indices and scales its blocks hold, unpacked.

    ``ŵ = d * KVALUES[q]`` per block of 32 (IQ4_NL), ``(d * scales) * KVALUES[q]`` per sub-block (IQ4_XS).
    """

    qtype: str  # "iq4_nl" or "iq4_xs"
    q: Tensor  # (rows, cols) uint8 indices into KVALUES, in [0, 15]
    d: Tensor  # (rows, cols // 32) float16 block scale (IQ4_NL); (rows, cols // 256) super-block scale (IQ4_XS)
    scales: Tensor | None  # (rows, cols // 32) int8 sub-block scales in [-32, 31] (IQ4_XS); None for IQ4_NL

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]


def _type(name: str) -> str:
    t = name.lower()
    if t not in IQ4_TYPES:
        raise ValueError(f"unknown IQ4 type {name!r}: expected one of {', '.join(IQ4_TYPES)}")
    return t


def _check(w: Tensor, name: str, imp: Tensor | None) -> None:
    check_weight(w, imp, BLOCK[name], name.upper(), plural=False)


def _grid(device: torch.device) -> tuple[Tensor, Tensor]:
    """``(levels (16,), midpoints (15,))`` float64: KVALUES and the half-way points between neighbours."""
    levels = torch.tensor(KVALUES, dtype=F64, device=device)
    return levels, (levels[1:] + levels[:-1]) / 2


def _nearest(y: Tensor, mids: Tensor) -> Tensor:
    """The index of the level nearest each ``y`` (ties to the upper, as ggml's ``best_index_int8``)."""
    return torch.bucketize(y, mids, right=True)  # the number of midpoints at or below y


def iq4_weights(w: Tensor, name: str, imp: Tensor | None = None) -> Tensor:
    """The per-element weights ``v: (rows, cols)`` float64 llama.cpp fits ``name``'s scales to: with ``imp``,
    ``imp_j * sqrt(s2 + w_ij**2)`` (``s2`` twice the mean square of the IQ4_NL block or IQ4_XS super-block);
    without, ``w_ij**2``. Columns of ``imp`` below ``1e-6`` of its mean count as that much."""
    name = _type(name)
    _check(w, name, imp)
    x = w.to(F64)  # (rows, cols)
    if imp is None:
        return x * x
    return _weights(x, silent_floor(imp.to(device=x.device, dtype=F64)), BLOCK[name])


def _weights(x: Tensor, imp: Tensor, block: int) -> Tensor:
    rows, cols = x.shape
    xb = x.reshape(rows, cols // block, block)  # (rows, blocks, block)
    s2 = 2 * xb.square().mean(-1, keepdim=True)  # (rows, blocks, 1)
    return imp * (s2 + xb.square()).sqrt().reshape(rows, cols)


def fit_blocks(x: Tensor, v: Tensor) -> Tensor:
    """The scale ``(B,)`` float64 of each block ``x: (B, 32)`` (weights ``v``) as llama.cpp chooses it (the module
    docstring): the best of the first guess ``max / 127`` and the inverse scales ``(i - 127) / max``, ``i = -7..7``,
    each rounding to the nearest levels refitted by weighted least squares. 0 for an all-zero block."""
    levels, mids = _grid(x.device)
    ext = x.gather(-1, x.abs().argmax(-1, keepdim=True))[:, 0]  # (B,): the first value of largest magnitude
    x, v = x.T.contiguous(), v.T.contiguous()  # (32, B): per-block values broadcast along the contiguous dim
    zero = ext.abs() < EPS
    ext = torch.where(zero, 1.0, ext)

    def candidate(isc: Tensor) -> tuple[Tensor, Tensor]:  # (B,) inverse scale -> its (scale, error removed)
        q = levels[_nearest(isc * x, mids)]  # (32, B)
        vq = v * q
        sqx, sq2 = (vq * x).sum(0), (vq * q).sum(0)  # (B,) each
        pos = sq2 > 0
        den = torch.where(pos, sq2, 1.0)
        return torch.where(pos, sqx / den, 0.0), torch.where(pos, sqx * sqx / den, 0.0)

    scale, gain = candidate(-KVALUES[0] / ext)  # llama.cpp's first guess, d = max / 127
    for i in range(-NTRY, NTRY + 1):  # llama.cpp's order: the first of equal gains stands
        s, g = candidate((i + KVALUES[0]) / ext)
        take = g > (1 + TIE) * gain  # (B,)
        scale = torch.where(take, s, scale)
        gain = torch.where(take, g, gain)
    return torch.where(zero, 0.0, scale) + 0.0  # + 0.0: never -0.0


def _codes(x: Tensor, scale: Tensor, mids: Tensor) -> Tensor:
    """Indices ``(..., 32)`` of the levels nearest ``x / scale`` for ``x: (..., 32)`` and ``scale: (...)``
    (float64, exact products of the stored integers); :data:`ZERO_CODE` where the scale is 0."""
    live = (scale != 0)[..., None]
    y = x / torch.where(live, scale[..., None], 1.0)
    return torch.where(live, _nearest(y, mids), ZERO_CODE)


def _quantize_rows(x: Tensor, v: Tensor, name: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(q, d, l)`` of whole rows ``x, v: (rows, cols)`` float64: indices ``(rows, cols // 32, 32)``, fp16 ``d``
    ``(rows, blocks)`` and IQ4_XS's sub-block scales ``(rows, cols // 32)`` (float64, integral; None for NL)."""
    rows, cols = x.shape
    _, mids = _grid(x.device)
    blocks = cols // QK_IQ4
    scale = fit_blocks(x.reshape(-1, QK_IQ4), v.reshape(-1, QK_IQ4)).reshape(rows, blocks)  # (rows, cols // 32)
    xb = x.reshape(rows, blocks, QK_IQ4)  # (rows, cols // 32, 32)
    if name == "iq4_nl":
        d = fp16_block(scale, "scale")  # (rows, cols // 32)
        return _codes(xb, d.to(F64), mids), d, None
    subs = QK_K // QK_IQ4
    scale = scale.reshape(rows, cols // QK_K, subs)  # (rows, super-blocks, 8)
    ext = scale.gather(-1, scale.abs().argmax(-1, keepdim=True))[..., 0]  # (rows, super-blocks), signed
    d = fp16_block(-ext / -SCALE_MIN + 0.0, "scale")  # the largest on -32; + 0.0: an all-zero super-block's is +0.0
    dd = d.to(F64)[..., None]  # (rows, super-blocks, 1)
    live = dd != 0
    ls = torch.where(live, (scale / torch.where(live, dd, 1.0)).round().clamp(SCALE_MIN, SCALE_MAX), 0.0)
    q, ls = _best_scales(xb, v.reshape(xb.shape), dd.expand_as(ls).reshape(rows, blocks), ls.reshape(rows, blocks))
    return q, d, ls


def _best_scales(x: Tensor, v: Tensor, d: Tensor, ls: Tensor) -> tuple[Tensor, Tensor]:
    """``(q, l)``: each sub-block ``x, v: (rows, blocks, 32)``'s scale code among ``ls - 1, ls, ls + 1`` (clamped)
    whose nearest codes leave the least weighted error with the super-block scale ``d: (rows, blocks)``, and those
    codes; ``ls`` itself unless another is better by a relative 1e-12."""
    levels, mids = _grid(x.device)
    tol = TIE * (v * x * x).sum(-1)  # (rows, blocks)
    best_q = best_l = best_e = None
    for step in (0, -1, 1):
        lc = (ls + step).clamp(SCALE_MIN, SCALE_MAX)  # (rows, blocks)
        s = d * lc  # exact: fp16 times a 6-bit integer
        q = _codes(x, s, mids)  # (rows, blocks, 32)
        e = (v * (x - s[..., None] * levels[q]).square()).sum(-1)  # (rows, blocks)
        if best_e is None:
            best_q, best_l, best_e = q, lc, e
            continue
        take = e < best_e - tol
        best_q = torch.where(take[..., None], q, best_q)
        best_l, best_e = torch.where(take, lc, best_l), torch.where(take, e, best_e)
    assert best_q is not None and best_l is not None
    return best_q, best_l


def quantize_iq4(w: Tensor, name: str, imp: Tensor | None = None) -> IQ4Quant:
    """Quantize ``w: (rows, cols)`` to ``name`` (``"iq4_nl"``: cols a multiple of 32; ``"iq4_xs"``: of 256).

    ``imp: (cols,)`` is a per-column importance (the diagonal of ``X^T X`` over calibration inputs, llama.cpp's
    imatrix); ``None`` uses llama.cpp's weighting for no imatrix (:func:`iq4_weights`). Runs on ``w``'s device in
    float64, whole rows of about :data:`CHUNK` blocks of 32 at a time; deterministic.
    """
    name = _type(name)
    _check(w, name, imp)
    rows, cols = w.shape
    if imp is not None:
        imp = silent_floor(imp.to(device=w.device, dtype=F64))  # (cols,)
    step = max(1, CHUNK * QK_IQ4 // max(cols, 1))  # rows at a time
    parts = []
    for r in range(0, max(rows, 1), step):
        x = w[r : r + step].to(F64)  # (step, cols)
        v = x * x if imp is None else _weights(x, imp, BLOCK[name])
        parts.append(_quantize_rows(x, v, name))
    q, d, ls = (None if p[0] is None else torch.cat(p) for p in zip(*parts, strict=True))
    assert q is not None and d is not None
    return IQ4Quant(
        qtype=name,
        q=q.reshape(rows, cols).to(torch.uint8),
        d=d.reshape(rows, cols // BLOCK[name]),
        scales=None if ls is None else ls.reshape(rows, cols // QK_IQ4).to(torch.int8),
    )


def dequantize_iq4(iq: IQ4Quant) -> Tensor:
    """The float32 weight ``(rows, cols)`` that ``iq``'s packed blocks decode to in ggml, bit for bit: ``d * level``
    (IQ4_NL) or ``(d * l) * level`` (IQ4_XS) in float32, every product exact."""
    name = _type(iq.qtype)
    rows, cols = iq.q.shape
    levels = torch.tensor(KVALUES, dtype=torch.float32, device=iq.q.device)[iq.q.long()]  # (rows, cols)
    levels = levels.reshape(rows, cols // QK_IQ4, QK_IQ4)  # (rows, cols // 32, 32)
    if name == "iq4_nl":
        return (iq.d.to(torch.float32)[..., None] * levels).reshape(rows, cols)
    assert iq.scales is not None
    subs = QK_K // QK_IQ4
    dl = iq.d.to(torch.float32)[..., None] * iq.scales.to(torch.float32).reshape(rows, cols // QK_K, subs)
    return (dl.reshape(rows, cols // QK_IQ4)[..., None] * levels).reshape(rows, cols)  # dl: (rows, nb, 8)
