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
with a per-column importance ``imp`` (the diagonal of ``X^T X``, llama.cpp's imatrix) llama.cpp's imatrix rule,
without it llama.cpp's rule for no imatrix. Where this differs from llama.cpp:

- without an imatrix llama.cpp runs older routines (``quantize_row_q*_K_ref``: a coarser search, sub-block scales
  rounded against the largest, Q2_K fitted to absolute errors, Q3_K by ``make_q3_quants``); here the imatrix path
  runs with the no-imatrix weights;
- the affine search sweeps its candidates twice (llama.cpp: once), Q3_K's and Q6_K's codes get 5 sweeps of
  coordinate descent (llama.cpp: none on that path), and a candidate must win by a relative 1e-12 (ties go to
  the first, whatever the last bits of a sum);
- float64 throughout; codes of a sub-block whose scale rounds to 0 are 0 (they decode the same whatever they are);
  columns that were never active count a little (see :func:`element_weights`).

Against ggml's own ``ggml_quantize_chunk`` on the same Gaussian, Student-t and SmolLM2 matrices: with the same
importance the weighted error comes out 0-5% lower (Q6_K and Q3_K gain most, from the descent); without, the RMSE
is 0-5% lower except Q3_K's, 1-2% higher (llama.cpp weights Q3_K's errors by ``w**2`` there and so do we; we fit
that objective 13-16% better, which costs plain RMSE). The float32 values of :func:`dequantize_k` are bit for bit
what ggml (and ``gguf.quants``) decode from the packed blocks (``sparsify.export.kquant_blocks``).

The legacy block types Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 (blocks of 32, one fp16 scale each) are at the end of the
module (:func:`quantize_legacy`, :func:`dequantize_legacy`): llama.cpp's reference rule without an importance,
its imatrix rule (with the fits above) with one; packed by ``sparsify.export.ggml_blocks.pack_legacy``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

QK_K = 256  # weights per super-block, in every K type
_EPS = 1e-15  # llama.cpp's GROUP_MAX_EPS: a (sub-)block whose largest value is below this is all zeros
# a candidate replaces the one kept only when better by more than this (relative to the block's weighted energy or
# gain): candidates equal in exact arithmetic (a constant block, values already on a grid) are then decided by
# their order, not by the last bits of a sum, so that a block-by-block loop picks the same ones
_TIE = 1e-12
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


def _check(w: Tensor, imp: Tensor | None) -> None:
    if w.ndim != 2 or w.shape[1] % QK_K:
        raise ValueError(f"K-quants take a weight (rows, cols) with cols a multiple of {QK_K}, got {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("the weight holds inf or NaN: K-quants need finite values")
    _check_imp(imp, w.shape[1])


def _check_imp(imp: Tensor | None, cols: int) -> None:
    if imp is not None:
        if imp.shape != (cols,):
            raise ValueError(f"imp must have one value per column, shape ({cols},), got {tuple(imp.shape)}")
        if not torch.isfinite(imp).all() or (imp < 0).any():
            raise ValueError("imp must be finite and non-negative (a diagonal of X^T X)")
        if not (imp > 0).any():
            raise ValueError("imp is all zeros: no column was ever active in calibration (pass None instead)")


def element_weights(w: Tensor, name: str, imp: Tensor | None = None, rule: Rule = "llama") -> Tensor:
    """The per-element weights ``v: (rows, cols)`` float64 of the error each K type minimises.

    ``rule="llama"``, with ``imp`` (llama.cpp's imatrix rule): ``imp_j * sqrt(s2 + w_ij**2)`` with ``s2`` the
    super-block's mean square (twice it for Q3_K..Q5_K), and plain ``imp_j`` for Q6_K; without (llama.cpp's rule
    for no imatrix): ``|w|`` for Q2_K, ``w**2`` for Q3_K and Q6_K, the sub-block's RMS plus ``|w|`` for Q4_K and
    Q5_K. ``rule="plain"``: ``imp_j`` (1 without ``imp``), exactly the diagonal proxy of the output error
    (:func:`weighted_error`), which it lowers by 1-12% more than llama.cpp's rule at 2-4 bits on heavy-tailed test
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
    if imp is not None:
        imp = imp.to(device=x.device, dtype=F64)
        imp = imp.clamp_min(_SILENT * float(imp.mean()))  # (cols,)
    if rule == "plain":
        return torch.ones_like(x) if imp is None else imp.expand(rows, cols).clone()
    if imp is None:
        if t.name == "q2_k":
            return x.abs()
        if t.name in ("q3_k", "q6_k"):
            return x * x
        xs = x.reshape(rows, -1, t.sub)  # (rows, cols // sub, sub)
        rms = xs.square().mean(-1, keepdim=True).sqrt()  # (rows, cols // sub, 1)
        return (rms + xs.abs()).reshape(rows, cols)
    v = imp.expand(rows, cols)  # (rows, cols)
    if t.name == "q6_k":
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
    tol = _TIE * sum_x2  # (B,)
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
            take = can & (new != qj) & (slx * slx * suml2 > (1 + _TIE) * sumlx * sumlx * sl2)
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
    zero = mx < _EPS
    mx = torch.where(zero, 1.0, mx)
    tol = _TIE * (v * x * x).sum(0)  # (B,)

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
    zero = ext.abs() < _EPS
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
        take = g > (1 + _TIE) * gain  # (B,)
        q = torch.where(take, qc, q)
        gain = torch.where(take, g, gain)
    q, lx, l2 = _descend(x, v, q, -nmax, nmax - 1, sweeps)  # (n, B), (B,), (B,)
    scale = torch.where(l2 > 0, lx / torch.where(l2 > 0, l2, 1.0), 0.0)  # (B,)
    scale = torch.where(zero, 0.0, scale)
    q = torch.where(zero, 0.0, q)
    return scale, q.T


# ---- whole tensors ----------------------------------------------------------------------------------------------------


def _fp16(x: Tensor, what: str) -> Tensor:
    h = x.to(torch.float16)
    if not torch.isfinite(h).all():
        raise ValueError(f"a super-block {what} ({float(x.abs().max()):.3g}) overflows fp16: the weights are too large")
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
        d, dmin = _fp16(d, "scale"), _fp16(dm, "minimum scale")
        q = _round_to(x, d.to(F64)[:, None] * sc, dmin.to(F64)[:, None] * mc, t)  # (N, S, n)
        return q, sc, mc, d, dmin
    scale, _ = fit_symmetric(x.reshape(-1, n), v.reshape(-1, n), -t.qmin, sweeps=5)  # (N * S,)
    scale = scale.reshape(N, S)
    if t.name == "q3_k":  # 6-bit signed sub-block scales, fitted as the codes are
        d, sc = fit_symmetric(scale, sw, -t.smin)  # (N,), (N, S)
    else:  # q6_k: 8-bit sub-block scales, the largest magnitude on -128 (llama.cpp's rule)
        ext = scale.gather(-1, scale.abs().argmax(-1, keepdim=True))[:, 0]  # (N,), signed
        zero = ext.abs() < _EPS
        isc = torch.where(zero, 0.0, t.smin / torch.where(zero, 1.0, ext))  # (N,)
        d = torch.where(zero, 0.0, 1 / torch.where(zero, 1.0, isc))
        sc = (isc[:, None] * scale).round().clamp(t.smin, t.smax)  # (N, S)
    d = _fp16(d, "scale")
    return _round_to(x, d.to(F64)[:, None] * sc, None, t), sc, None, d, None


CHUNK = 8192  # super-blocks quantized at once: a few hundred MB of float64 temporaries


def quantize_k(w: Tensor, name: str, imp: Tensor | None = None, rule: Rule = "llama") -> KQuant:
    """Quantize ``w: (rows, cols)`` (cols a multiple of 256) to the K type ``name`` (``"q4_k"``...).

    ``imp: (cols,)`` is a per-column importance (the diagonal of ``X^T X`` over calibration inputs, llama.cpp's
    imatrix); ``None`` uses llama.cpp's weighting for no imatrix; ``rule`` as :func:`element_weights`. Runs on
    ``w``'s device in float64, :data:`CHUNK` super-blocks at a time.
    """
    t = ktype(name)
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


# ---- llama.cpp's legacy block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 -----------------------------------------------------
# A block is 32 consecutive weights of a row with an fp16 scale ``d`` (and for Q4_1/Q5_1 an fp16 minimum ``m``); the
# codes held are unsigned for the 4- and 5-bit types and decode as ``(q - 8) * d`` (Q4_0), ``(q - 16) * d`` (Q5_0),
# ``q * d + m`` (Q4_1, Q5_1), and signed ``q * d`` for Q8_0.
#
# Without an importance the choice is llama.cpp's ``quantize_row_q*_ref`` (what ``llama-quantize`` runs without an
# imatrix, and gguf-py's ``gguf.quants.quantize`` reimplements), in float32, operation for operation: Q4_0/Q5_0 put
# the value of largest magnitude on the code 0 (``d = max / -8``, ``/ -16``) and truncate ``x / d + 8.5``
# (``+ 16.5``); Q4_1/Q5_1 span ``[min, max]`` (``d = (max - min) / 15``, ``/ 31``, ``m = min``) and truncate
# ``(x - min) / d + 0.5``; Q8_0 rounds ``x / d`` half away from zero with ``d = amax / 127``; where ``1 / d``
# overflows (a block of float32 subnormals) the codes are 0, as the casts of inf and NaN give there. The bytes are
# gguf-py's, bit for bit, with one exception: where a block's smallest or largest value is a zero and the block holds
# zeros of both signs, numpy's reductions pick a sign by their SIMD order, llama.cpp's loops (and this) the first
# met; the stored ``d`` or ``m`` may then be the other zero, and the decoded values differ at most in a zero's sign.
#
# With an importance ``imp`` (llama.cpp's imatrix) the choice follows ``quantize_row_q4_0_impl`` and its siblings:
# per-element weights ``imp_j * sqrt(s2 + w_ij ** 2)`` with ``s2`` the row's mean square (:func:`legacy_weights`),
# then per block :func:`fit_symmetric` (``make_qx_quants(32, 8 or 16, ...)``) for Q4_0/Q5_0 and :func:`fit_affine`
# (``make_qkx3_quants(32, 15 or 31, ..., -0.9, 0.05, 36)``, one sweep as llama.cpp) for Q4_1/Q5_1. Where this differs
# from llama.cpp: float64 throughout, the tie rule of the fits above (and Q4_1/Q5_1's candidate scales kept
# positive); the codes are rounded again to the fp16 ``d`` and ``m`` the file holds (llama.cpp keeps the fit's codes;
# rounding to the stored grid can only lower the weighted error, element by element: 1.5-4% measured); columns of
# ``imp`` below 1e-6 of its mean count as that much (llama.cpp writes a block whose columns were all silent as zeros).
# llama.cpp ignores the imatrix for Q8_0 (its ``quantize_q8_0``), and so does this: Q8_0 is the reference rule
# whatever ``imp``.

LEGACY = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
# the types whose block scales take an importance (Q8_0: none); IQ4_NL and IQ4_XS are sparsify.algorithms.iq4's
WEIGHTED = (*KTYPES, "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "iq4_xs")
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
    if w.ndim != 2 or w.shape[1] % QK_LEGACY:
        raise ValueError(
            f"legacy quants take a weight (rows, cols) with cols a multiple of {QK_LEGACY}, got {tuple(w.shape)}"
        )
    if not torch.isfinite(w).all():
        raise ValueError("the weight holds inf or NaN: legacy quants need finite values")
    _check_imp(imp, w.shape[1])


def _fp16_block(x: Tensor, what: str) -> Tensor:
    h = x.to(torch.float16)
    if not torch.isfinite(h).all():
        raise ValueError(f"a block {what} ({float(x.abs().max()):.3g}) overflows fp16: the weights are too large")
    return h


def legacy_weights(w: Tensor, imp: Tensor) -> Tensor:
    """The per-element weights ``v: (rows, cols)`` float64 of llama.cpp's legacy types with an imatrix:
    ``imp_j * sqrt(s2_i + w_ij ** 2)``, ``s2_i`` the mean square of row ``i`` (``quantize_row_q4_0_impl``'s
    ``sigma2 = sum_x2 / n_per_row``). Columns of ``imp`` below ``1e-6`` of its mean count as that much."""
    _check_legacy(w, imp)
    x = w.to(F64)  # (rows, cols)
    return _legacy_weights(x, _silent_floor(imp.to(device=x.device, dtype=F64)))


def _silent_floor(imp: Tensor) -> Tensor:
    return imp.clamp_min(_SILENT * float(imp.mean()))  # (cols,)


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
        d = _fp16_block(scale, "scale")
        dd = d.to(F64)[:, None]  # (B, 1)
        live = dd != 0
        q = torch.where(live, (x / torch.where(live, dd, 1.0)).round().clamp(-t.zero, t.zero - 1), 0.0)  # (B, 32)
        return q + t.zero, d, None
    scale, the_min, _ = fit_affine(x, v, t.qmax, passes=1)  # (B,) each: make_qkx3_quants(32, qmax, ...)
    d, m = _fp16_block(scale, "scale"), _fp16_block(-the_min + 0.0, "minimum")  # + 0.0: a zero minimum is +0.0
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
        imp = _silent_floor(imp.to(device=w.device, dtype=F64))  # (cols,)
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
        d=_fp16_block(d, "scale").reshape(rows, cols // QK_LEGACY),
        m=None if m is None else _fp16_block(m, "minimum").reshape(rows, cols // QK_LEGACY),
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
