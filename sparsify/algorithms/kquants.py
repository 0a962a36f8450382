"""llama.cpp's K-quants (Q2_K..Q6_K) chosen by weighted least squares, whole tensors at once.

A K-quant row is cut into super-blocks of 256 weights; each super-block into sub-blocks of 16 or 32 weights,
each with its own scale (and, for the asymmetric types, a minimum that is subtracted), themselves stored as
small integers times the super-block's fp16 ``d`` (and ``dmin``). A weight decodes as

- Q2_K, Q4_K, Q5_K: ``d * sc * q - dmin * m`` with ``q`` in ``[0, 2**bits - 1]``, ``sc, m`` in ``[0, 15]``
  (Q2_K) or ``[0, 63]``;
- Q3_K: ``d * sc * q`` with ``q`` in ``[-4, 3]``, ``sc`` in ``[-32, 31]``;
- Q6_K: ``d * sc * q`` with ``q`` in ``[-32, 31]``, ``sc`` in ``[-128, 127]``.

The choice follows the method of llama.cpp's ``ggml-quants.c`` (``quantize_row_q*_K_impl``), written again for
whole tensors (loops only over candidates and positions within a block, never over blocks): per sub-block,
candidate inverse scales ``(nmax + rmin + rdelta * i) / (max - min)`` are tried, each rounding refitted by
weighted least squares (scale and minimum together, the minimum kept at or below 0), the best kept
(:func:`fit_affine`); or the extreme value put on the code ``-nmax``, ``nmax + 0.1 * i`` tried and the scale
refitted (:func:`fit_symmetric`). The sub-block scales (and minimums) are then quantized themselves against the
super-block's fp16 scale, weighted by each sub-block's total weight (:func:`fit_levels`; Q3_K by
:func:`fit_symmetric`; Q6_K's 8-bit ones by rounding against the largest), and the codes rounded again to the
scales the file holds.

The error minimised is ``sum_ij v_ij * (w_ij - ŵ_ij) ** 2`` with per-element weights from :func:`element_weights`:
with a per-column importance ``imp`` (the diagonal of ``X^T X``, llama.cpp's imatrix) llama.cpp's imatrix rule.
Without an importance (and ``rule="llama"``) :func:`quantize_k` gives llama.cpp's own bytes instead: its reference
routines (``quantize_row_q*_K_ref``), operation for operation, in :mod:`sparsify.algorithms.kquants_ref`. With one,
where this differs from llama.cpp:

- the affine search sweeps its candidates twice (llama.cpp: once), Q3_K's and Q6_K's codes get 5 sweeps of
  coordinate descent (llama.cpp: none on that path), and a candidate must win by a relative 1e-12 (ties go to
  the first, whatever the last bits of a sum);
- float64 throughout; codes of a sub-block whose scale rounds to 0 are 0 (they decode the same whatever they are);
  columns that were never active count a little (see :func:`element_weights`).

Against ggml's own ``ggml_quantize_chunk`` on the same Gaussian, Student-t and SmolLM2 matrices: with the same
importance the weighted error comes out 0-5% lower (Q6_K and Q3_K gain most, from the descent). The float32
values of :func:`dequantize_k` are bit for bit what ggml (and ``gguf.quants``) decode from the packed blocks
(``sparsify.export.kquant_blocks``).

The fits (:func:`fit_affine`, :func:`fit_symmetric`) and the checks of an importance are shared with the legacy
block types Q4_0..Q8_0 (:mod:`sparsify.algorithms.legacy_quants`) and IQ4_NL, IQ4_XS (:mod:`sparsify.algorithms.iq4`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from sparsify.algorithms.kquants_ref import fp16_scale, quantize_k_ref

QK_K = 256  # weights per super-block, in every K type
EPS = 1e-15  # llama.cpp's GROUP_MAX_EPS: a (sub-)block whose largest value is below this is all zeros
# a candidate replaces the one kept only when better by more than this (relative to the block's weighted energy or
# gain): candidates equal in exact arithmetic (a constant block, values already on a grid) are then decided by
# their order, not by the last bits of a sum, so that a block-by-block loop picks the same ones
TIE = 1e-12
_SILENT = 1e-6  # the importance, relative to the mean, that a column never active in calibration counts for
F64 = torch.float64
Rule = Literal["llama", "plain"]  # how the per-element weights follow from imp: see element_weights


@dataclass(frozen=True)
class KType:
    """One K type's integers: sub-block size, code and scale ranges."""

    name: str  # "q4_k": the lower-case GGML type name
    sub: int  # weights per sub-block: 16 or 32
    qmin: int  # smallest weight code
    qmax: int  # largest weight code
    smin: int  # smallest sub-block scale code
    smax: int  # largest sub-block scale code (minimum codes share the range, asymmetric types)
    asymmetric: bool  # a minimum per sub-block, subtracted: Q2_K, Q4_K, Q5_K

    @property
    def subs(self) -> int:
        """Sub-blocks per super-block."""
        return QK_K // self.sub


KTYPES: dict[str, KType] = {
    "q2_k": KType("q2_k", sub=16, qmin=0, qmax=3, smin=0, smax=15, asymmetric=True),
    "q3_k": KType("q3_k", sub=16, qmin=-4, qmax=3, smin=-32, smax=31, asymmetric=False),
    "q4_k": KType("q4_k", sub=32, qmin=0, qmax=15, smin=0, smax=63, asymmetric=True),
    "q5_k": KType("q5_k", sub=32, qmin=0, qmax=31, smin=0, smax=63, asymmetric=True),
    "q6_k": KType("q6_k", sub=16, qmin=-32, qmax=31, smin=-128, smax=127, asymmetric=False),
}
# the types whose block scales take an importance: the K types, the legacy ones but Q8_0
# (sparsify.algorithms.legacy_quants), IQ4_NL and IQ4_XS (sparsify.algorithms.iq4); here, in the module both import
WEIGHTED = (*KTYPES, "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "iq4_xs")


@dataclass(frozen=True)
class KQuant:
    """A weight ``(rows, cols)`` quantized to a K type: every integer and fp16 scale its blocks hold, unpacked.

    ``ŵ = d * scales * q - dmin * mins`` per sub-block (asymmetric types) or ``d * scales * q``.
    """

    ktype: str  # a key of KTYPES
    q: Tensor  # (rows, cols) int8 weight codes in [qmin, qmax]
    scales: Tensor  # (rows, cols // sub) int16 sub-block scale codes in [smin, smax]
    mins: Tensor | None  # (rows, cols // sub) int16 sub-block minimum codes in [0, smax]; None when symmetric
    d: Tensor  # (rows, cols // 256) float16 super-block scale
    dmin: Tensor | None  # (rows, cols // 256) float16 super-block scale of the minimums; None when symmetric

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]


def ktype(name: str) -> KType:
    """The :class:`KType` named ``name`` (``"q4_k"``, case-insensitive)."""
    t = KTYPES.get(name.lower())
    if t is None:
        raise ValueError(f"unknown K type {name!r}: expected one of {', '.join(KTYPES)}")
    return t


def check_weight(w: Tensor, imp: Tensor | None, block: int, who: str, plural: bool = True) -> None:
    """Refuse what ``who`` (K-quants, legacy quants, IQ4_NL...) cannot quantize: a weight that is not ``(rows,
    cols)`` with ``cols`` whole blocks of ``block``, non-finite values, an importance unlike :func:`check_imp`'s."""
    take, need = ("take", "need") if plural else ("takes", "needs")
    if w.ndim != 2 or w.shape[1] % block:
        raise ValueError(f"{who} {take} a weight (rows, cols) with cols a multiple of {block}, got {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"the weight holds inf or NaN: {who} {need} finite values")
    check_imp(imp, w.shape[1])


def _check(w: Tensor, imp: Tensor | None) -> None:
    check_weight(w, imp, QK_K, "K-quants")


def check_imp(imp: Tensor | None, cols: int) -> None:
    """Refuse a per-column importance ``imp`` that is not ``(cols,)``, finite, non-negative and somewhere positive."""
    if imp is not None:
        if imp.shape != (cols,):
            raise ValueError(f"imp must have one value per column, shape ({cols},), got {tuple(imp.shape)}")
        if not torch.isfinite(imp).all() or (imp < 0).any():
            raise ValueError("imp must be finite and non-negative (a diagonal of X^T X)")
        if not (imp > 0).any():
            raise ValueError("imp is all zeros: no column was ever active in calibration (pass None instead)")


def silent_floor(imp: Tensor) -> Tensor:
    """``imp: (cols,)`` with the columns below ``1e-6`` of its mean (never active in calibration) raised to that."""
    return imp.clamp_min(_SILENT * float(imp.mean()))  # (cols,)


def element_weights(w: Tensor, name: str, imp: Tensor | None = None, rule: Rule = "llama") -> Tensor:
    """The per-element weights ``v: (rows, cols)`` float64 of the error each K type minimises.

    ``rule="llama"``, with ``imp`` (llama.cpp's imatrix rule): ``imp_j * sqrt(s2 + w_ij**2)`` with ``s2`` the
    super-block's mean square (twice it for Q3_K..Q5_K), and plain ``imp_j`` for Q6_K. Without ``imp``, 1 (with
    ``rule="llama"`` :func:`quantize_k` runs llama.cpp's reference routines instead,
    :mod:`sparsify.algorithms.kquants_ref`). ``rule="plain"``: ``imp_j``, exactly the diagonal proxy of the output
    error (:func:`weighted_error`), which it lowers by 1-12% more than llama.cpp's rule at 2-4 bits on heavy-tailed test
    weights (at 5 bits either may win; Q6_K's rules are the same); which gives the better model is for perplexity
    to tell. Columns of ``imp`` below ``1e-6`` of its mean (never active in calibration) count as that much, so
    that a super-block whose columns were all silent is still fitted (llama.cpp would write it as zeros).
    """
    t = ktype(name)
    _check(w, imp)
    if rule not in ("llama", "plain"):
        raise ValueError(f"rule must be 'llama' or 'plain', got {rule!r}")
    x = w.to(F64)  # (rows, cols)
    rows, cols = x.shape
    if imp is None:
        return torch.ones_like(x)
    v = silent_floor(imp.to(device=x.device, dtype=F64)).expand(rows, cols)  # (rows, cols)
    if rule == "plain" or t.name == "q6_k":
        return v.clone()
    xb = x.reshape(rows, -1, QK_K)  # (rows, super-blocks, 256)
    s2 = xb.square().mean(-1, keepdim=True) * (1 if t.name == "q2_k" else 2)  # (rows, super-blocks, 1)
    return v * (s2 + xb.square()).sqrt().reshape(rows, cols)


# ---- the three fits, each over a batch of (sub-)blocks ---------------------------------------------------------------
# Inside, a batch is laid out (n, B): a per-block value (B,) then broadcasts along the contiguous last dim, and the
# sums over a block are sums over dim 0; both many times faster than over a short last dim.


def fit_affine(
    x: Tensor, v: Tensor, nmax: int, rmin: float = -0.9, rdelta: float = 0.05, nstep: int = 36, passes: int = 2
) -> tuple[Tensor, Tensor, Tensor]:
    """``(scale, the_min, q)`` minimising ``sum v * (scale * q - the_min - x) ** 2`` per row of ``x: (B, n)``.

    ``q: (B, n)`` in ``[0, nmax]`` (float, integral), ``scale >= 0`` and ``the_min >= 0`` of shape ``(B,)``.
    llama.cpp's ``make_qkx3_quants``: starting from the range (its minimum taken at most 0), candidate roundings
    ``q = round(iscale * (x - lo))`` with ``iscale = (nmax + rmin + rdelta * i) / (max - lo)``, ``i = 0..nstep``,
    ``lo`` the offset of the best fit so far, are each refitted by weighted least squares (the offset ``-the_min``
    kept at or below 0) and kept when their weighted error is smaller. llama.cpp sweeps the candidates once;
    ``passes=2`` sweeps them again from the fit the first sweep ends on.
    """
    x, v = x.T.contiguous(), v.T.contiguous()  # (n, B)
    sum_w = v.sum(0)  # (B,)
    sum_x = (v * x).sum(0)  # (B,)
    sum_x2 = (v * x * x).sum(0)  # (B,)
    hi = x.amax(0)  # (B,)
    lo = x.amin(0).clamp(max=0)  # (B,): the offset is never above 0
    span = hi - lo  # (B,)
    flat = span <= 0  # constant blocks at or below 0: scale 0, minimum -x
    iscale = torch.where(flat, 0.0, nmax / torch.where(flat, 1.0, span))  # (B,)
    q = (iscale * (x - lo)).round().clamp(0, nmax)  # (n, B)
    scale = torch.where(flat, 0.0, 1 / torch.where(flat, 1.0, iscale))  # (B,)
    offset = lo.clone()  # (B,), <= 0
    err = (v * (scale * q + offset - x).square()).sum(0)  # (B,)
    tol = TIE * sum_x2  # (B,)
    for _ in range(passes):
        for i in range(nstep + 1):
            den = hi - offset  # (B,): from the best offset so far, block by block
            ok = den > 0
            isc = (nmax + rmin + rdelta * i) / torch.where(ok, den, 1.0)  # (B,)
            qc = (isc * (x - offset)).clamp(0, nmax).round()  # (n, B): 0 where x is at or below the offset
            vq = v * qc  # (n, B)
            sum_l, sum_l2, sum_xl = vq.sum(0), (vq * qc).sum(0), (vq * x).sum(0)  # (B,) each
            det = sum_w * sum_l2 - sum_l * sum_l  # (B,)
            good = ok & (det > 0)
            det = torch.where(good, det, 1.0)
            s = (sum_w * sum_xl - sum_x * sum_l) / det  # (B,)
            m = (sum_l2 * sum_x - sum_l * sum_xl) / det  # (B,)
            above = m > 0  # the offset may not be positive: refit the scale alone with offset 0
            s = torch.where(above, sum_xl / torch.where(sum_l2 > 0, sum_l2, 1.0), s)
            m = torch.where(above, 0.0, m)
            # sum v (s q + m - x)^2, expanded over the sums above: (B,)
            e = s * s * sum_l2 + 2 * s * m * sum_l + m * m * sum_w - 2 * s * sum_xl - 2 * m * sum_x + sum_x2
            better = good & (s > 0) & (e < err - tol)  # (B,)
            err = torch.where(better, e, err)
            scale = torch.where(better, s, scale)
            offset = torch.where(better, m, offset)
            q = torch.where(better, qc, q)
    return scale, -offset, q.T


def _descend(x: Tensor, v: Tensor, q: Tensor, qmin: int, qmax: int, sweeps: int) -> tuple[Tensor, Tensor, Tensor]:
    """Coordinate descent on the codes ``q: (n, B)`` of ``x: (n, B)`` (weights ``v``) for ``scale * q`` with the
    weighted least-squares scale: each code in turn set to ``round(x / scale)`` of the others' fit, kept when that
    raises ``sum(v x q)**2 / sum(v q**2)`` (lowers the error); ``sweeps`` passes over the block, in place.

    Returns ``(q, sum(v x q), sum(v q q))``, the sums ``(B,)``. A sweep that changes nothing leaves the next
    unchanged, so no early exit is needed to agree with a loop that stops there.
    """
    sumlx = (v * x * q).sum(0)  # (B,)
    suml2 = (v * q * q).sum(0)  # (B,)
    for _ in range(sweeps):
        for j in range(x.shape[0]):
            vj, xj, qj = v[j], x[j], q[j]  # (B,)
            slx = sumlx - vj * xj * qj  # (B,): the sums without code j
            sl2 = suml2 - vj * qj * qj
            can = (slx != 0) & (sl2 > 0)
            new = (xj * sl2 / torch.where(can, slx, 1.0)).round().clamp(qmin, qmax)  # (B,)
            slx = slx + vj * xj * new
            sl2 = sl2 + vj * new * new
            take = can & (new != qj) & (slx * slx * suml2 > (1 + TIE) * sumlx * sumlx * sl2)
            q[j] = torch.where(take, new, qj)
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
    return q, sumlx, suml2


def fit_levels(x: Tensor, v: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """``(d, q)``: non-negative ``x: (B, S)`` as ``d * q`` with ``q`` in ``[0, nmax]``, weighted by ``v: (B, S)``.

    llama.cpp's ``make_qp_quants``: the best of the inverse scales ``(nmax + 0.1 * i) / max(x)``, ``i = -4..4``,
    then coordinate descent (5 sweeps) on each ``q`` with ``d`` the weighted least-squares fit; ``d: (B,)``.
    """
    x, v = x.T.contiguous(), v.T.contiguous()  # (S, B)
    mx = x.amax(0)  # (B,)
    zero = mx < EPS
    mx = torch.where(zero, 1.0, mx)
    tol = TIE * (v * x * x).sum(0)  # (B,)

    def candidate(i: int) -> tuple[Tensor, Tensor]:
        isc = (nmax + 0.1 * i) / mx  # (B,)
        qc = (isc * x).round().clamp(0, nmax)  # (S, B)
        return qc, (v * (x - qc / isc).square()).sum(0)  # (S, B), (B,): codes and their weighted error

    q, err = candidate(0)
    for i in (-4, -3, -2, -1, 1, 2, 3, 4):  # llama.cpp's order: the first of equal errors stands
        qc, e = candidate(i)
        take = e < err - tol  # (B,)
        q = torch.where(take, qc, q)
        err = torch.where(take, e, err)
    q, sumlx, suml2 = _descend(x, v, q, 0, nmax, sweeps=5)
    d = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)  # (B,)
    d = torch.where(zero, 0.0, d)
    q = torch.where(zero, 0.0, q)
    return d, q.T


def fit_symmetric(x: Tensor, v: Tensor, nmax: int, sweeps: int = 0) -> tuple[Tensor, Tensor]:
    """``(scale, q)``: ``x: (B, n)`` as ``scale * q`` with ``q`` in ``[-nmax, nmax - 1]``, weighted by ``v``.

    llama.cpp's ``make_qx_quants``: the value of largest magnitude lands on ``-nmax`` (the end with one more
    level); inverse scales ``-(nmax + 0.1 * i) / extreme``, ``i = -9..9``, are tried, each scale refitted by
    weighted least squares, and the one with the smallest weighted error kept; then ``sweeps`` passes of coordinate
    descent on the codes (llama.cpp: none). ``scale: (B,)`` may be negative.
    """
    at = x.abs().argmax(-1, keepdim=True)  # (B, 1): the first largest magnitude
    ext = x.gather(-1, at)[:, 0]  # (B,), signed
    x, v = x.T.contiguous(), v.T.contiguous()  # (n, B)
    zero = ext.abs() < EPS
    ext = torch.where(zero, 1.0, ext)

    def candidate(i: int) -> tuple[Tensor, Tensor]:
        isc = -(nmax + 0.1 * i) / ext  # (B,)
        qc = (isc * x).round().clamp(-nmax, nmax - 1)  # (n, B)
        vq = v * qc  # (n, B)
        slx, sl2 = (vq * x).sum(0), (vq * qc).sum(0)  # (B,) each
        pos = sl2 > 0
        return qc, torch.where(pos, slx * slx / torch.where(pos, sl2, 1.0), 0.0)  # (n, B), (B,): the error removed

    q, gain = candidate(0)
    for i in (*range(-9, 0), *range(1, 10)):  # llama.cpp's order: the first of equal gains stands
        qc, g = candidate(i)
        take = g > (1 + TIE) * gain  # (B,)
        q = torch.where(take, qc, q)
        gain = torch.where(take, g, gain)
    q, lx, l2 = _descend(x, v, q, -nmax, nmax - 1, sweeps)  # (n, B), (B,), (B,)
    scale = torch.where(l2 > 0, lx / torch.where(l2 > 0, l2, 1.0), 0.0)  # (B,)
    scale = torch.where(zero, 0.0, scale)
    q = torch.where(zero, 0.0, q)
    return scale, q.T


# ---- whole tensors ----------------------------------------------------------------------------------------------------


def fp16_block(x: Tensor, what: str) -> Tensor:
    """``x`` rounded to the fp16 a (legacy or IQ4) block holds; refused where it overflows."""
    h = x.to(torch.float16)
    if not torch.isfinite(h).all():
        raise ValueError(f"a block {what} ({float(x.abs().max()):.3g}) overflows fp16: the weights are too large")
    return h


def _round_to(x: Tensor, dl: Tensor, ml: Tensor | None, t: KType) -> Tensor:
    """Codes of ``x: (N, S, n)`` rounded to the sub-block scales the file holds, ``dl, ml: (N, S)`` (exact float64
    products of the fp16 super-block scale and the integer codes); 0 where a sub-block's scale is 0 (it then decodes
    to ``-ml`` whatever its codes)."""
    live = (dl != 0)[..., None]  # (N, S, 1)
    shifted = x if ml is None else x + ml[..., None]  # (N, S, n)
    raw = shifted / torch.where(live, dl[..., None], 1.0)  # (N, S, n)
    return torch.where(live, raw.round().clamp(t.qmin, t.qmax), 0.0)


def _quantize_blocks(x: Tensor, v: Tensor, t: KType) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
    """``(q, sc, mc, d, dmin)`` of ``N`` super-blocks ``x, v: (N, S, n)`` float64: codes ``(N, S, n)``, scale and
    minimum codes ``(N, S)`` (float64, integral), fp16 ``d`` and ``dmin`` ``(N,)``."""
    N, S, n = x.shape
    sw = v.sum(-1)  # (N, S): each sub-block's weight, for the fit of its scale
    if t.asymmetric:
        scale, the_min, _ = fit_affine(x.reshape(-1, n), v.reshape(-1, n), t.qmax)  # (N * S,) each
        d, sc = fit_levels(scale.reshape(N, S), sw, t.smax)  # (N,), (N, S)
        dm, mc = fit_levels(the_min.reshape(N, S), sw, t.smax)
        d, dmin = fp16_scale(d, "scale"), fp16_scale(dm, "minimum scale")
        q = _round_to(x, d.to(F64)[:, None] * sc, dmin.to(F64)[:, None] * mc, t)  # (N, S, n)
        return q, sc, mc, d, dmin
    scale, _ = fit_symmetric(x.reshape(-1, n), v.reshape(-1, n), -t.qmin, sweeps=5)  # (N * S,)
    scale = scale.reshape(N, S)
    if t.name == "q3_k":  # 6-bit signed sub-block scales, fitted as the codes are
        d, sc = fit_symmetric(scale, sw, -t.smin)  # (N,), (N, S)
    else:  # q6_k: 8-bit sub-block scales, the largest magnitude on -128 (llama.cpp's rule)
        ext = scale.gather(-1, scale.abs().argmax(-1, keepdim=True))[:, 0]  # (N,), signed
        zero = ext.abs() < EPS
        isc = torch.where(zero, 0.0, t.smin / torch.where(zero, 1.0, ext))  # (N,)
        d = torch.where(zero, 0.0, 1 / torch.where(zero, 1.0, isc))
        sc = (isc[:, None] * scale).round().clamp(t.smin, t.smax)  # (N, S)
    d = fp16_scale(d, "scale")
    return _round_to(x, d.to(F64)[:, None] * sc, None, t), sc, None, d, None


CHUNK = 8192  # super-blocks quantized at once: a few hundred MB of float64 temporaries


def quantize_k(w: Tensor, name: str, imp: Tensor | None = None, rule: Rule = "llama") -> KQuant:
    """Quantize ``w: (rows, cols)`` (cols a multiple of 256) to the K type ``name`` (``"q4_k"``...).

    ``imp: (cols,)`` is a per-column importance (the diagonal of ``X^T X`` over calibration inputs, llama.cpp's
    imatrix); ``None`` gives llama.cpp's reference rounding (``llama-quantize`` without ``--imatrix``, its bytes);
    ``rule`` as :func:`element_weights`. The search runs on ``w``'s device in float64, :data:`CHUNK` super-blocks
    at a time; the reference rounding in float32 on the CPU.
    """
    t = ktype(name)
    if imp is None and rule == "llama":  # llama-quantize's own rounding without an imatrix: its very bytes
        _check(w, imp)
        q, sc, mc, d, dmin = quantize_k_ref(w, t.name)
        return KQuant(t.name, q.to(torch.int8), sc.to(torch.int16), None if mc is None else mc.to(torch.int16), d, dmin)
    v = element_weights(w, t.name, imp, rule)  # (rows, cols), checks w and imp
    rows, cols = w.shape
    x = w.to(F64).reshape(-1, t.subs, t.sub)  # (rows * cols // 256, S, n): super-blocks in row order
    v = v.reshape(x.shape)
    parts = [_quantize_blocks(x[i : i + CHUNK], v[i : i + CHUNK], t) for i in range(0, x.shape[0], CHUNK)]
    q, sc, mc, d, dmin = (None if p[0] is None else torch.cat(p) for p in zip(*parts, strict=True))
    assert q is not None and sc is not None and d is not None
    return KQuant(
        ktype=t.name,
        q=q.reshape(rows, cols).to(torch.int8),
        scales=sc.reshape(rows, -1).to(torch.int16),
        mins=None if mc is None else mc.reshape(rows, -1).to(torch.int16),
        d=d.reshape(rows, -1),
        dmin=None if dmin is None else dmin.reshape(rows, -1),
    )


def dequantize_k(kq: KQuant) -> Tensor:
    """The float32 weight ``(rows, cols)`` that ``kq``'s packed blocks decode to in ggml, bit for bit.

    ``(d * sc) * q - dmin * m`` as ggml computes it: every product is exact in float32 (an fp16 significand times
    integers of at most 13 significant bits), so only the subtraction rounds, once; the result depends neither on
    the order of the products nor on a fused multiply-add, and is the same on any device.
    """
    t = ktype(kq.ktype)
    rows, cols = kq.q.shape
    nb = cols // QK_K
    q = kq.q.to(torch.float32).reshape(rows, nb, t.subs, t.sub)  # (rows, nb, S, n)
    dl = kq.d.to(torch.float32)[..., None] * kq.scales.to(torch.float32).reshape(rows, nb, t.subs)  # (rows, nb, S)
    out = dl[..., None] * q  # (rows, nb, S, n)
    if t.asymmetric:
        assert kq.dmin is not None and kq.mins is not None
        ml = kq.dmin.to(torch.float32)[..., None] * kq.mins.to(torch.float32).reshape(rows, nb, t.subs)
        out = out - ml[..., None]
    return out.reshape(rows, cols)


def weighted_error(w: Tensor, w_hat: Tensor, imp: Tensor | None = None) -> float:
    """``sum_ij imp_j * (w_ij - ŵ_ij) ** 2`` (``imp = 1`` when None), in float64: the proxy of the output error
    ``||X (W - Ŵ)^T||²`` that a diagonal ``X^T X`` gives."""
    e = (w.to(F64) - w_hat.to(F64)).square()  # (rows, cols)
    if imp is not None:
        e = e * imp.to(device=e.device, dtype=F64)
    return float(e.sum())
