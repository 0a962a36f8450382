"""llama.cpp's legacy block types Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0, whole tensors at once.

A block is 32 consecutive weights of a row with an fp16 scale ``d`` (and for Q4_1/Q5_1 an fp16 minimum ``m``); the
codes held are unsigned for the 4- and 5-bit types and decode as ``(q - 8) * d`` (Q4_0), ``(q - 16) * d`` (Q5_0),
``q * d + m`` (Q4_1, Q5_1), and signed ``q * d`` for Q8_0.

Without an importance the choice is llama.cpp's ``quantize_row_q*_ref`` (what ``llama-quantize`` runs without an
imatrix, and gguf-py's ``gguf.quants.quantize`` reimplements), in float32, operation for operation: Q4_0/Q5_0 put
the value of largest magnitude on the code 0 (``d = max / -8``, ``/ -16``) and truncate ``x / d + 8.5``
(``+ 16.5``); Q4_1/Q5_1 span ``[min, max]`` (``d = (max - min) / 15``, ``/ 31``, ``m = min``) and truncate
``(x - min) / d + 0.5``; Q8_0 rounds ``x / d`` half away from zero with ``d = amax / 127``; where ``1 / d``
overflows (a block of float32 subnormals) the codes are 0, as the casts of inf and NaN give there. The bytes are
gguf-py's, bit for bit, with one exception: where a block's smallest or largest value is a zero and the block holds
zeros of both signs, numpy's reductions pick a sign by their SIMD order, llama.cpp's loops (and this) the first
met; the stored ``d`` or ``m`` may then be the other zero, and the decoded values differ at most in a zero's sign.

With an importance ``imp`` (llama.cpp's imatrix) the choice follows ``quantize_row_q4_0_impl`` and its siblings:
per-element weights ``imp_j * sqrt(s2 + w_ij ** 2)`` with ``s2`` the row's mean square (:func:`legacy_weights`),
then per block K-quants' :func:`~sparsify.algorithms.kquants.fit_symmetric` (``make_qx_quants(32, 8 or 16, ...)``)
for Q4_0/Q5_0 and :func:`~sparsify.algorithms.kquants.fit_affine` (``make_qkx3_quants(32, 15 or 31, ..., -0.9,
0.05, 36)``, one sweep as llama.cpp) for Q4_1/Q5_1. Where this differs from llama.cpp: float64 throughout, the tie
rule of those fits (and Q4_1/Q5_1's candidate scales kept positive); the codes are rounded again to the fp16 ``d``
and ``m`` the file holds (llama.cpp keeps the fit's codes; rounding to the stored grid can only lower the weighted
error, element by element: 1.5-4% measured); columns of ``imp`` below 1e-6 of its mean count as that much
(llama.cpp writes a block whose columns were all silent as zeros). llama.cpp ignores the imatrix for Q8_0 (its
``quantize_q8_0``), and so does this: Q8_0 is the reference rule whatever ``imp``.

Packed by ``sparsify.export.ggml_blocks.pack_legacy``; which of these types take an importance:
:data:`sparsify.algorithms.kquants.WEIGHTED`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparsify.algorithms.kquants import check_weight, fit_affine, fit_symmetric, fp16_block, silent_floor

F64 = torch.float64
LEGACY = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
QK_LEGACY = 32  # weights per legacy block
LEGACY_CHUNK = 65536  # blocks quantized at once (whole rows): a few tens of MB of float64 temporaries


@dataclass(frozen=True)
class LegacyType:
    """One legacy type's integers: the codes its blocks hold and how they decode."""

    name: str  # "q4_0": the lower-case GGML type name
    qmin: int  # smallest code held
    qmax: int  # largest code held
    zero: int  # the code that decodes to 0 in a symmetric type: 8 (Q4_0), 16 (Q5_0), 0 (Q8_0; 0 too when affine)
    affine: bool  # ``q * d + m``: Q4_1, Q5_1


LEGACY_TYPES: dict[str, LegacyType] = {
    "q4_0": LegacyType("q4_0", qmin=0, qmax=15, zero=8, affine=False),
    "q4_1": LegacyType("q4_1", qmin=0, qmax=15, zero=0, affine=True),
    "q5_0": LegacyType("q5_0", qmin=0, qmax=31, zero=16, affine=False),
    "q5_1": LegacyType("q5_1", qmin=0, qmax=31, zero=0, affine=True),
    "q8_0": LegacyType("q8_0", qmin=-128, qmax=127, zero=0, affine=False),
}


@dataclass(frozen=True)
class LegacyQuant:
    """A weight ``(rows, cols)`` quantized to a legacy type: the codes and fp16 scales its blocks hold, unpacked."""

    qtype: str  # a name in LEGACY
    q: Tensor  # (rows, cols) int8 codes as held: unsigned 4/5-bit (Q4_*, Q5_*) or signed (Q8_0)
    d: Tensor  # (rows, cols // 32) float16 block scale
    m: Tensor | None  # (rows, cols // 32) float16 block minimum (added): Q4_1, Q5_1; else None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]


def legacy_type(name: str) -> LegacyType:
    """The :class:`LegacyType` named ``name`` (``"q4_0"``, case-insensitive)."""
    t = LEGACY_TYPES.get(name.lower())
    if t is None:
        raise ValueError(f"unknown legacy type {name!r}: expected one of {', '.join(LEGACY)}")
    return t


def _check_legacy(w: Tensor, imp: Tensor | None) -> None:
    check_weight(w, imp, QK_LEGACY, "legacy quants")


def legacy_weights(w: Tensor, imp: Tensor) -> Tensor:
    """The per-element weights ``v: (rows, cols)`` float64 of llama.cpp's legacy types with an imatrix:
    ``imp_j * sqrt(s2_i + w_ij ** 2)``, ``s2_i`` the mean square of row ``i`` (``quantize_row_q4_0_impl``'s
    ``sigma2 = sum_x2 / n_per_row``). Columns of ``imp`` below ``1e-6`` of its mean count as that much."""
    _check_legacy(w, imp)
    x = w.to(F64)  # (rows, cols)
    return _legacy_weights(x, silent_floor(imp.to(device=x.device, dtype=F64)))


def _legacy_weights(x: Tensor, imp: Tensor) -> Tensor:
    s2 = x.square().mean(-1, keepdim=True)  # (rows, 1)
    return imp * (s2 + x.square()).sqrt()  # (rows, cols)


def _legacy_reference(x: Tensor, t: LegacyType) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(q, d, m)`` of blocks ``x: (B, 32)`` float32 by llama.cpp's ``quantize_row_q*_ref``, each float32 operation
    as there: codes ``(B, 32)`` float32 (integral, as held), ``d`` and ``m`` ``(B,)`` float32 before their fp16
    rounding (``m`` None when symmetric)."""

    def inverse(d: Tensor) -> Tensor:  # (B, 1): 1 / d, 0 where d is 0
        return torch.where(d == 0, 0.0, torch.ones_like(d) / torch.where(d == 0, 1.0, d))

    def finite(y: Tensor) -> Tensor:  # where 1 / d overflowed (a block of float32 subnormals): the code 0, as the
        return torch.where(y.isfinite(), y, 0.0)  # float-to-int casts of inf and NaN give in gguf-py and on x86

    if t.name == "q8_0":
        d = x.abs().amax(-1, keepdim=True) / 127  # (B, 1)
        y = finite(x * inverse(d))  # (B, 32)
        a = y.abs()
        fl = a.floor()
        q = torch.sign(y) * (fl + (2 * (a - fl)).floor())  # roundf: half away from zero, exactly as gguf-py
        return q, d[:, 0], None
    # the extremes as llama.cpp's loops find them (``if (v < min) min = v``): the first of equal values, so the sign
    # of a zero extreme is that of the first such zero (+0.0 for Q4_0's and Q5_0's all-zero block); argmin/argmax
    # return the first index of ties, -0.0 and +0.0 among them
    if not t.affine:  # q4_0, q5_0: the largest magnitude (signed) on the code 0
        mx = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # (B, 1)
        mx = torch.where(mx == 0, 0.0, mx)  # an all-zero block: llama.cpp's max stays at its initial +0.0
        d = mx / -t.zero  # (B, 1)
        q = finite(x * inverse(d) + (t.zero + 0.5)).trunc().clamp(t.qmin, t.qmax)  # (B, 32)
        return q, d[:, 0], None
    lo = x.gather(-1, x.argmin(-1, keepdim=True))  # (B, 1)
    hi = x.gather(-1, x.argmax(-1, keepdim=True))  # (B, 1)
    d = (hi - lo) / t.qmax  # (B, 1)
    q = finite((x - lo) * inverse(d) + 0.5).trunc().clamp(t.qmin, t.qmax)  # (B, 32)
    return q, d[:, 0], lo[:, 0]


def _legacy_weighted(x: Tensor, v: Tensor, t: LegacyType) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(q, d, m)`` of blocks ``x, v: (B, 32)`` float64 by llama.cpp's imatrix rule: codes ``(B, 32)`` float64
    (integral, as held) rounded to the fp16 ``d, m: (B,)`` returned."""
    if not t.affine:  # q4_0, q5_0: make_qx_quants(32, zero, ...), codes in [-zero, zero - 1] held + zero
        scale, _ = fit_symmetric(x, v, t.zero)  # (B,)
        d = fp16_block(scale, "scale")
        dd = d.to(F64)[:, None]  # (B, 1)
        live = dd != 0
        q = torch.where(live, (x / torch.where(live, dd, 1.0)).round().clamp(-t.zero, t.zero - 1), 0.0)  # (B, 32)
        return q + t.zero, d, None
    scale, the_min, _ = fit_affine(x, v, t.qmax, passes=1)  # (B,) each: make_qkx3_quants(32, qmax, ...)
    d, m = fp16_block(scale, "scale"), fp16_block(-the_min + 0.0, "minimum")  # + 0.0: a zero minimum is +0.0
    dd, mm = d.to(F64)[:, None], m.to(F64)[:, None]  # (B, 1) each
    live = dd != 0
    q = torch.where(live, ((x - mm) / torch.where(live, dd, 1.0)).round().clamp(t.qmin, t.qmax), 0.0)  # (B, 32)
    return q, d, m


def quantize_legacy(w: Tensor, name: str, imp: Tensor | None = None) -> LegacyQuant:
    """Quantize ``w: (rows, cols)`` (cols a multiple of 32) to the legacy type ``name`` (``"q4_0"``...).

    ``imp: None``: llama.cpp's reference rule (no imatrix), the bytes gguf-py's ``quantize`` writes. ``imp: (cols,)``
    (the diagonal of ``X^T X``, llama.cpp's imatrix): llama.cpp's imatrix fit, in float64; Q8_0 ignores it, as
    llama.cpp does. Runs on ``w``'s device, whole rows of about :data:`LEGACY_CHUNK` blocks at a time.
    """
    t = legacy_type(name)
    _check_legacy(w, imp)
    rows, cols = w.shape
    weighted = imp is not None and t.name != "q8_0"
    if weighted:
        assert imp is not None
        imp = silent_floor(imp.to(device=w.device, dtype=F64))  # (cols,)
    step = max(1, LEGACY_CHUNK * QK_LEGACY // cols)  # rows at a time
    parts = []
    for r in range(0, max(rows, 1), step):
        if weighted:
            x = w[r : r + step].to(F64)  # (step, cols)
            v = _legacy_weights(x, imp)  # (step, cols)
            parts.append(_legacy_weighted(x.reshape(-1, QK_LEGACY), v.reshape(-1, QK_LEGACY), t))
        else:
            parts.append(_legacy_reference(w[r : r + step].to(torch.float32).reshape(-1, QK_LEGACY), t))
    q, d, m = (None if p[0] is None else torch.cat(p) for p in zip(*parts, strict=True))
    assert q is not None and d is not None
    return LegacyQuant(
        qtype=t.name,
        q=q.reshape(rows, cols).to(torch.int8),
        d=fp16_block(d, "scale").reshape(rows, cols // QK_LEGACY),
        m=None if m is None else fp16_block(m, "minimum").reshape(rows, cols // QK_LEGACY),
    )


def dequantize_legacy(lq: LegacyQuant) -> Tensor:
    """The float32 weight ``(rows, cols)`` that ``lq``'s packed blocks decode to in ggml, bit for bit.

    ``(q - zero) * d`` or ``q * d + m`` in float32 as ggml's ``dequantize_row_q*`` (and gguf-py): the product of an
    fp16 ``d`` and a code of at most 8 bits is exact, so only the addition of ``m`` rounds, once; signed zeros come
    out as there (a negative ``d`` times the zero code is ``-0.0``).
    """
    t = legacy_type(lq.qtype)
    rows, cols = lq.q.shape
    q = lq.q.to(torch.float32).reshape(rows, cols // QK_LEGACY, QK_LEGACY)  # (rows, blocks, 32)
    if t.zero:
        q = q - t.zero
    out = lq.d.to(torch.float32)[..., None] * q  # (rows, blocks, 32)
    if t.affine:
        assert lq.m is not None
        out = out + lq.m.to(torch.float32)[..., None]
    return out.reshape(rows, cols)
