"""llama.cpp's K-quant rounding without an importance matrix, operation for operation: ``llama-quantize``'s bytes.

Without an imatrix ``llama-quantize`` quantizes the K types with ggml's reference routines
(``quantize_row_q{2..6}_K_ref`` in ``ggml/src/ggml-quants.c``, through ``make_qkx2_quants``, ``make_q3_quants`` and
``make_qx_quants``). They live in ggml's base library, which is built without ``-march``: plain float32 arithmetic,
no fused multiply-add, every sum in order. Written again here for whole tensors — every loop of the C code over
positions within a (sub-)block runs once for all blocks at once, in float32, each operation in the C code's order —
so that ``sparsify export gguf --type q4_k --importance none`` writes the very blocks ``llama-quantize`` writes
(``benchmarks/bench_llamacpp_blocks.py`` compares them block by block).

The functions return the integers and fp16 scales of :class:`sparsify.algorithms.kquants.KQuant` (codes of a
sub-block whose scale is 0 are kept as the search left them: they are in the file, though they decode the same
whatever they are). With an importance sparsify runs its own weighted search instead
(:mod:`sparsify.algorithms.kquants`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

F32 = torch.float32
_EPS = torch.tensor(1e-15, dtype=F32)  # GROUP_MAX_EPS, the float32 1e-15f


def _f32(x: float) -> Tensor:
    """A float32 constant, as C's ``0.1f``."""
    return torch.tensor(np.float32(x), dtype=F32)


def _div(x: Tensor, c: float) -> Tensor:
    """``x / c`` in float32, rounded once: torch turns a division by a scalar into a product with its reciprocal."""
    return x / torch.full_like(x, c)


def _sqrt(x: Tensor) -> Tensor:
    """``sqrtf``, correctly rounded: torch's float32 square root is not on every CPU (AVX-512's is off by an ulp);
    the float64 root rounded to float32 is."""
    return x.double().sqrt().float()


def nearest_int(f: Tensor) -> Tensor:
    """ggml's ``nearest_int``: add ``1.5 * 2**23`` in float32 and read the low mantissa bits (ties to even; the same
    bits as there for any input, large ones included). ``f: float32`` -> int32 of its shape."""
    val = (f + _f32(12582912.0)).contiguous()
    return (val.view(torch.int32) & 0x007FFFFF) - 0x00400000


def _extreme(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(amax, max)`` per row of ``x: (B, n)``: the largest magnitude and the first value that has it (the C loop's
    ``if (ax > amax)``); ``(0, 0)`` for a row of zeros."""
    a = x.abs()  # (B, n)
    i = a.argmax(-1, keepdim=True)  # (B, 1): the first index of the largest
    return a.gather(-1, i)[:, 0], x.gather(-1, i)[:, 0]


def _running_max(v: Tensor) -> Tensor:
    """``(N,)``: the C loop's ``m = 0; if (v > m) m = v`` over each row of ``v: (N, S)`` (+0.0 when none is above)."""
    m = v.amax(-1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def make_qkx2(
    x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, mad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``make_qkx2_quants`` for every row of ``x, w: (B, n)`` float32: ``(scale, the_min, L)``, ``(B,)``, ``(B,)`` and
    codes ``(B, n)`` float32 in ``[0, nmax]``; a row ``x ≈ scale * L - the_min``."""
    n = x.shape[1]
    x, w = x.t().contiguous(), w.t().contiguous()  # (n, B): a position of every block is contiguous
    mn, mx = x[0].clone(), x[0].clone()  # (B,)
    sum_w = w[0].clone()
    sum_x = sum_w * x[0]
    for i in range(1, n):
        mn = torch.where(x[i] < mn, x[i], mn)
        mx = torch.where(x[i] > mx, x[i], mx)
        sum_w = sum_w + w[i]
        sum_x = sum_x + w[i] * x[i]
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx == mn  # (B,): all codes 0, scale 0
    span = torch.where(flat, torch.ones_like(mx), mx - mn)  # (B,)

    def codes(iscale: Tensor) -> Tensor:  # (n, B) in [0, nmax]
        return nearest_int(iscale[None, :] * (x - mn[None, :])).clamp(0, nmax).to(F32)

    def error(scale: Tensor, the_min: Tensor, q: Tensor) -> Tensor:  # (B,): sum_i w_i * |diff| or diff ** 2, in order
        err = torch.zeros_like(scale)
        for i in range(n):
            diff = scale * q[i] + the_min - x[i]
            err = err + w[i] * (diff.abs() if mad else diff * diff)
        return err

    iscale = _f32(nmax) / span  # (B,)
    scale = _f32(1.0) / iscale  # one rounded division (torch runs 1 / t as reciprocal(t) * 1)
    L = codes(iscale)  # (n, B)
    best = error(scale, mn, L)
    for step in range(nstep + 1):
        num = np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)
        span = torch.where(flat, torch.ones_like(mx), mx - mn)  # from the minimum kept so far, as in C
        q = codes(torch.tensor(num, dtype=F32) / span)  # (n, B)
        sum_l = torch.zeros_like(scale)
        sum_l2 = torch.zeros_like(scale)
        sum_xl = torch.zeros_like(scale)
        for i in range(n):
            wl = w[i] * q[i]
            sum_l = sum_l + wl
            sum_l2 = sum_l2 + wl * q[i]
            sum_xl = sum_xl + wl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l  # (B,)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, this_min, q)
        take = (D > 0) & (cur < best)  # (B,); the next candidates are measured from the new minimum, as in C
        L = torch.where(take[None, :], q, L)
        best = torch.where(take, cur, best)
        scale = torch.where(take, this_scale, scale)
        mn = torch.where(take, this_min, mn)
    zero = torch.zeros_like(scale)
    return (
        torch.where(flat, zero, scale),
        torch.where(flat, -x[0].clamp(max=0), -mn),
        torch.where(flat[None, :], 0.0, L).t(),
    )


def _symmetric_fit(x: Tensor, iscale: Tensor, nmax: int) -> tuple[Tensor, Tensor, Tensor]:
    """The codes of ``x: (n, B)`` at inverse scales ``iscale: (B,)``, signed in ``[-nmax, nmax - 1]`` ``(n, B)``,
    and the sums ``sum w x l``, ``sum w l**2`` ``(B,)`` with ``w = x**2``, in order: the first loop of
    ``make_q3_quants`` and of ``make_qx_quants(rmse_type=1)``."""
    q = nearest_int(iscale[None, :] * x).clamp(-nmax, nmax - 1).to(F32)
    sumlx = torch.zeros_like(iscale)
    suml2 = torch.zeros_like(iscale)
    for i in range(x.shape[0]):
        wi = x[i] * x[i]
        sumlx = sumlx + wi * x[i] * q[i]
        suml2 = suml2 + wi * q[i] * q[i]
    return q, sumlx, suml2


def make_q3(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)`` for every row of ``x: (B, n)``: ``(scale, L)``, codes ``(B, n)``
    float32 in ``[0, 2 nmax - 1]`` (the signed code plus ``nmax``); a row ``x ≈ scale * (L - nmax)``."""
    n = x.shape[1]
    amax, mx = _extreme(x)
    x = x.t().contiguous()  # (n, B)
    zero = amax < _EPS  # (B,)
    L, sumlx, suml2 = _symmetric_fit(x, _f32(-nmax) / torch.where(zero, torch.ones_like(mx), mx), nmax)
    live = ~zero
    for _ in range(5):
        changed = torch.zeros_like(live)
        for i in range(n):
            xi, li = x[i], L[i]
            wi = xi * xi
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new = nearest_int(xi * sl2 / slx).clamp(-nmax, nmax - 1).to(F32)
            slx_new = slx + wi * xi * new
            sl2_new = sl2 + wi * new * new
            take = (
                live & (slx > 0) & (new != li) & (sl2_new > 0) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            )
            L[i] = torch.where(take, new, li)
            sumlx = torch.where(take, slx_new, sumlx)
            suml2 = torch.where(take, sl2_new, suml2)
            changed |= take
        live &= changed  # a block whose pass changed nothing stops (the C loop's break)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    return torch.where(zero, 0.0, scale), torch.where(zero[None, :], 0.0, L + nmax).t()


def make_qx(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)`` (weights ``x**2``) for every row of ``x: (B, n)``:
    ``(scale, L)``, codes ``(B, n)`` float32 in ``[0, 2 nmax - 1]``; a row ``x ≈ scale * (L - nmax)``."""
    amax, mx = _extreme(x)
    x = x.t().contiguous()  # (n, B)
    zero = amax < _EPS  # (B,)
    mx = torch.where(zero, torch.ones_like(mx), mx)

    L, sumlx, suml2 = _symmetric_fit(x, _f32(-nmax) / mx, nmax)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        num = -(np.float32(nmax) + np.float32(0.1) * np.float32(step))
        q, sumlx, suml2 = _symmetric_fit(x, torch.tensor(num, dtype=F32) / mx, nmax)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(take[None, :], q, L)
        scale = torch.where(take, sumlx / suml2, scale)
        best = torch.where(take, scale * sumlx, best)
    return torch.where(zero, 0.0, scale), torch.where(zero[None, :], 0.0, L + nmax).t()


def fp16_scale(x: Tensor, what: str) -> Tensor:
    """``x`` rounded to the fp16 a super-block holds (its ``d`` or ``dmin``); refused where it overflows."""
    h = x.to(torch.float16)
    if not torch.isfinite(h).all():
        raise ValueError(f"a super-block {what} ({float(x.abs().max()):.3g}) overflows fp16: the weights are too large")
    return h


def _requantize(x: Tensor, fit: Tensor, dl: Tensor, ml: Tensor | None, lo: int, hi: int) -> Tensor:
    """Codes of ``x: (N, S, n)`` against the scales the file holds, ``dl, ml: (N, S)`` float32; where ``dl`` is 0
    the search's codes ``fit`` stay (the C loop's ``if (!d) continue``)."""
    live = dl != 0
    shifted = x if ml is None else x + ml[..., None]
    q = nearest_int(shifted / torch.where(live, dl, torch.ones_like(dl))[..., None]).clamp(lo, hi).to(F32)
    return torch.where(live[..., None], q, fit)


def _affine(x: Tensor, name: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Q2_K, Q4_K, Q5_K of super-blocks ``x: (N, 256)``: ``(q, sc, mc, d, dmin)``."""
    N = x.shape[0]
    if name == "q2_k":
        sub, nmax, levels, search = 16, 3, 15, (-0.5, 0.1, 15, True)
        xs = x.reshape(-1, sub)  # (N * 16, 16)
        w = xs.abs()
    else:
        sub, nmax, levels = 32, (15 if name == "q4_k" else 31), 63
        search = (-1.0, 0.1, 20, False) if name == "q4_k" else (-0.5, 0.1, 15, False)
        xs = x.reshape(-1, sub)  # (N * 8, 32)
        sum_x2 = torch.zeros_like(xs[:, 0])
        for i in range(sub):
            sum_x2 = sum_x2 + xs[:, i] * xs[:, i]
        w = _sqrt(_div(sum_x2, sub))[:, None] + xs.abs()  # (N * 8, 32)
    scale, the_min, L = make_qkx2(xs, w, nmax, *search)
    S = 256 // sub
    scale, the_min, L = scale.reshape(N, S), the_min.reshape(N, S), L.reshape(N, S, sub)
    max_scale, max_min = _running_max(scale), _running_max(the_min)  # (N,)

    def levels_of(v: Tensor, top: Tensor) -> Tensor:  # (N, S) integer codes as the C code stores them, int64
        inv = torch.where(top > 0, _f32(levels) / torch.where(top > 0, top, 1.0), 0.0)
        return nearest_int(inv[:, None] * v).to(torch.int64) & 0xFF  # the uint8 the C code assigns

    sc, mc = levels_of(scale, max_scale), levels_of(the_min, max_min)
    if name == "q2_k":  # one byte: scale | min << 4, each from a nibble
        byte = sc | ((mc << 4) & 0xFF)
        sc, mc = byte & 0xF, byte >> 4
        d = torch.where(max_scale > 0, _div(max_scale, levels), 0.0)
        dmin = torch.where(max_min > 0, _div(max_min, levels), 0.0)
    else:
        sc, mc = sc.clamp(max=63), mc.clamp(max=63)
        d, dmin = _div(max_scale, levels), _div(max_min, levels)
    d, dmin = fp16_scale(d, "scale"), fp16_scale(dmin, "minimum scale")
    dl = d.to(F32)[:, None] * sc.to(F32)  # (N, S)
    ml = dmin.to(F32)[:, None] * mc.to(F32)
    q = _requantize(x.reshape(N, S, sub), L, dl, ml, 0, nmax)
    return q, sc, mc, d, dmin


def _symmetric(x: Tensor, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """Q3_K, Q6_K of super-blocks ``x: (N, 256)``: ``(q, sc, d)``, signed codes and scales."""
    N = x.shape[0]
    nmax, smin = (4, -32) if name == "q3_k" else (32, -128)
    scale, L = (make_q3 if name == "q3_k" else make_qx)(x.reshape(-1, 16), nmax)  # (N * 16,), (N * 16, 16)
    scale, L = scale.reshape(N, 16), L.reshape(N, 16, 16) - nmax  # signed codes
    amax, max_scale = _extreme(scale)  # (N,)
    # a block with no scale is written as zero bytes: Q3_K's scale byte 0 decodes to -32, Q6_K's to 0
    live, blank = (max_scale != 0, -32) if name == "q3_k" else (amax >= _EPS, 0)  # (N,)
    iscale = torch.where(live, _f32(smin) / torch.where(live, max_scale, 1.0), 0.0)  # (N,)
    codes = nearest_int(iscale[:, None] * scale)  # (N, 16)
    sc = codes.clamp(smin, -smin - 1) if name == "q3_k" else codes.clamp(max=-smin - 1)
    sc = torch.where(live[:, None], sc, blank)
    d = fp16_scale(torch.where(live, _f32(1.0) / torch.where(live, iscale, 1.0), 0.0), "scale")
    if name == "q6_k":  # the memset block: its codes are 0, that is -32
        L = torch.where(live[:, None, None], L, float(-nmax))
    dl = d.to(F32)[:, None] * sc.to(F32)  # (N, 16)
    q = _requantize(x.reshape(N, 16, 16), L, dl, None, -nmax, nmax - 1)
    return q, sc.to(torch.int64), d


CHUNK = 4096  # super-blocks at once: the loops are over positions and candidates, the work over blocks


def quantize_k_ref(w: Tensor, name: str) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
    """``w: (rows, cols)`` (checked by the caller) as ``quantize_row_{name}_ref`` quantizes it:
    ``(q (rows, cols), sc (rows, cols // sub), mc or None, d (rows, cols // 256), dmin or None)``."""
    rows, cols = w.shape
    x = w.detach().to(device="cpu", dtype=F32).reshape(-1, 256)  # (N, 256): super-blocks in row order
    parts = []
    for i in range(0, x.shape[0], CHUNK):
        xb = x[i : i + CHUNK]
        if name in ("q2_k", "q4_k", "q5_k"):
            parts.append(_affine(xb, name))
        else:
            q, sc, d = _symmetric(xb, name)
            parts.append((q, sc, None, d, None))
    q, sc, mc, d, dmin = (None if p[0] is None else torch.cat(p) for p in zip(*parts, strict=True))
    assert q is not None and sc is not None and d is not None
    return (
        q.reshape(rows, cols),
        sc.reshape(rows, -1),
        None if mc is None else mc.reshape(rows, -1),
        d.reshape(rows, -1),
        None if dmin is None else dmin.reshape(rows, -1),
    )
