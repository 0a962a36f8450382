"""Without an importance, K-quants follow llama.cpp's reference routines (``quantize_row_q*_K_ref``) exactly.

The reference below is ggml-quants.c read line by line: one super-block at a time, every value a numpy float32
scalar and every operation in C's order, so that it is what the C code computes (ggml's base library is built
without ``-march``: no fused multiply-add). ``quantize_k(w, name)`` must give its integers and fp16 scales exactly.
That these are ``llama-quantize``'s bytes is measured against the built llama.cpp in
``benchmarks/bench_llamacpp_blocks.py`` (CI cannot build it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsify.algorithms.kquants import KTYPES, dequantize_k, quantize_k, weighted_error
from sparsify.algorithms.kquants_ref import nearest_int

f = np.float32


def _ni(v) -> int:
    """ggml's nearest_int on one float32."""
    val = np.array([f(f(v) + f(12582912.0))], dtype=np.float32)
    return int((val.view(np.int32)[0] & 0x007FFFFF) - 0x00400000)


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


def _qkx2(x, w, nmax, rmin, rdelta, nstep, mad):
    """make_qkx2_quants: (scale, the_min, L)."""
    n = len(x)
    mn, mx, sum_w = x[0], x[0], w[0]
    sum_x = f(sum_w * x[0])
    for i in range(1, n):
        mn = x[i] if x[i] < mn else mn
        mx = x[i] if x[i] > mx else mx
        sum_w = f(sum_w + w[i])
        sum_x = f(sum_x + f(w[i] * x[i]))
    if mn > 0:
        mn = f(0)
    if mx == mn:
        return f(0), f(-mn), [0] * n

    def err(scale, the_min, q):
        e = f(0)
        for i in range(n):
            diff = f(f(f(scale * f(q[i])) + the_min) - x[i])
            e = f(e + f(w[i] * (abs(diff) if mad else f(diff * diff))))
        return e

    iscale = f(f(nmax) / f(mx - mn))
    scale = f(f(1) / iscale)
    L = [_clamp(_ni(f(iscale * f(x[i] - mn))), 0, nmax) for i in range(n)]
    best = err(scale, mn, L)
    for step in range(nstep + 1):
        iscale = f(f(f(f(rmin) + f(f(rdelta) * f(step))) + f(nmax)) / f(mx - mn))
        q = [_clamp(_ni(f(iscale * f(x[i] - mn))), 0, nmax) for i in range(n)]
        sl = sl2 = sxl = f(0)
        for i in range(n):
            wl = f(w[i] * f(q[i]))
            sl, sl2, sxl = f(sl + wl), f(sl2 + f(wl * f(q[i]))), f(sxl + f(wl * x[i]))
        D = f(f(sum_w * sl2) - f(sl * sl))
        if D > 0:
            this_scale = f(f(f(sum_w * sxl) - f(sum_x * sl)) / D)
            this_min = f(f(f(sl2 * sum_x) - f(sl * sxl)) / D)
            if this_min > 0:
                this_min, this_scale = f(0), f(sxl / sl2)
            cur = err(this_scale, this_min, q)
            if cur < best:
                L, best, scale, mn = q, cur, this_scale, this_min
    return scale, f(-mn), L


def _extreme(x):
    mx = amax = f(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    return amax, mx


def _q3(x, nmax):
    """make_q3_quants(..., do_rmse=true): (scale, L in [0, 2 nmax))."""
    n = len(x)
    amax, mx = _extreme(x)
    if amax < f(1e-15):
        return f(0), [0] * n
    iscale = f(f(-nmax) / mx)
    L = [_clamp(_ni(f(iscale * x[i])), -nmax, nmax - 1) for i in range(n)]
    sumlx = suml2 = f(0)
    for i in range(n):
        w = f(x[i] * x[i])
        sumlx = f(sumlx + f(f(w * x[i]) * f(L[i])))
        suml2 = f(suml2 + f(f(w * f(L[i])) * f(L[i])))
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = f(x[i] * x[i])
            slx = f(sumlx - f(f(w * x[i]) * f(L[i])))
            if slx > 0:
                sl2 = f(suml2 - f(f(w * f(L[i])) * f(L[i])))
                new = _clamp(_ni(f(f(x[i] * sl2) / slx)), -nmax, nmax - 1)
                if new != L[i]:
                    slx = f(slx + f(f(w * x[i]) * f(new)))
                    sl2 = f(sl2 + f(f(w * f(new)) * f(new)))
                    if sl2 > 0 and f(f(slx * slx) * suml2) > f(f(sumlx * sumlx) * sl2):
                        L[i], sumlx, suml2 = new, slx, sl2
                        changed += 1
        if not changed:
            break
    return (f(sumlx / suml2) if suml2 > 0 else f(0)), [v + nmax for v in L]


def _qx(x, nmax):
    """make_qx_quants(..., rmse_type=1, NULL): (scale, L in [0, 2 nmax))."""
    n = len(x)
    amax, mx = _extreme(x)
    if amax < f(1e-15):
        return f(0), [0] * n

    def fit(iscale):
        q = [_clamp(_ni(f(iscale * x[i])), -nmax, nmax - 1) for i in range(n)]
        lx = l2 = f(0)
        for i in range(n):
            w = f(x[i] * x[i])
            lx, l2 = f(lx + f(f(w * x[i]) * f(q[i]))), f(l2 + f(f(w * f(q[i])) * f(q[i])))
        return q, lx, l2

    L, lx, l2 = fit(f(f(-nmax) / mx))
    scale = f(lx / l2) if l2 != 0 else f(0)
    best = f(scale * lx)
    for step in [*range(-9, 0), *range(1, 10)]:
        q, lx, l2 = fit(f(f(-f(f(nmax) + f(f(0.1) * f(step)))) / mx))
        if l2 > 0 and f(lx * lx) > f(best * l2):
            L, scale = q, f(lx / l2)
            best = f(scale * lx)
    return scale, [v + nmax for v in L]


def _h(v) -> np.float16:
    return np.float16(v)


def _superblock(x, name):
    """quantize_row_{name}_ref of one super-block: (q, sc, mc, d, dmin) as KQuant holds them."""
    if name in ("q2_k", "q4_k", "q5_k"):
        sub, nmax, levels = (16, 3, 15) if name == "q2_k" else (32, 15 if name == "q4_k" else 31, 63)
        search = {"q2_k": (-0.5, 0.1, 15, True), "q4_k": (-1.0, 0.1, 20, False), "q5_k": (-0.5, 0.1, 15, False)}[name]
        fits = []
        for k in range(0, 256, sub):
            xs = x[k : k + sub]
            if name == "q2_k":
                w = [abs(v) for v in xs]
            else:
                s2 = f(0)
                for v in xs:
                    s2 = f(s2 + f(v * v))
                av = f(np.sqrt(f(s2 / f(32))))
                w = [f(av + abs(v)) for v in xs]
            fits.append(_qkx2(xs, w, nmax, *search))
        max_scale = max_min = f(0)
        for s, m, _ in fits:
            max_scale = s if s > max_scale else max_scale
            max_min = m if m > max_min else max_min
        inv_s = f(f(levels) / max_scale) if max_scale > 0 else f(0)
        inv_m = f(f(levels) / max_min) if max_min > 0 else f(0)
        sc = [_ni(f(inv_s * s)) & 0xFF for s, _, _ in fits]
        mc = [_ni(f(inv_m * m)) & 0xFF for _, m, _ in fits]
        if name == "q2_k":
            byte = [s | ((m << 4) & 0xFF) for s, m in zip(sc, mc, strict=True)]
            sc, mc = [b & 0xF for b in byte], [b >> 4 for b in byte]
            d = _h(f(max_scale / f(15))) if max_scale > 0 else _h(0)
            dmin = _h(f(max_min / f(15))) if max_min > 0 else _h(0)
        else:
            sc, mc = [min(63, s) for s in sc], [min(63, m) for m in mc]
            d, dmin = _h(f(max_scale / f(63))), _h(f(max_min / f(63)))
        q = []
        for (_, _, L), s, m, k in zip(fits, sc, mc, range(0, 256, sub), strict=True):
            dl, ml = f(f(d) * f(s)), f(f(dmin) * f(m))
            q += list(L) if not dl else [_clamp(_ni(f(f(v + ml) / dl)), 0, nmax) for v in x[k : k + sub]]
        return q, sc, mc, d, dmin
    nmax, smin = (4, -32) if name == "q3_k" else (32, -128)
    fits = [(_q3 if name == "q3_k" else _qx)(x[k : k + 16], nmax) for k in range(0, 256, 16)]
    amax, max_scale = _extreme([s for s, _ in fits])
    live = bool(max_scale) if name == "q3_k" else amax >= f(1e-15)
    if live:
        iscale = f(f(smin) / max_scale)
        codes = [_ni(f(iscale * s)) for s, _ in fits]
        sc = [_clamp(c, -32, 31) for c in codes] if name == "q3_k" else [min(127, c) for c in codes]
        d = _h(f(f(1) / iscale))
    else:
        sc, d = [-32 if name == "q3_k" else 0] * 16, _h(0)
    q = []
    for (_, L), s, k in zip(fits, sc, range(0, 256, 16), strict=True):
        dl = f(f(d) * f(s))
        if name == "q6_k" and not live:
            q += [-nmax] * 16
        elif not dl:
            q += [v - nmax for v in L]
        else:
            q += [_clamp(_ni(f(v / dl)), -nmax, nmax - 1) for v in x[k : k + 16]]
    return q, sc, None, d, None


def _weights(seed: int) -> torch.Tensor:
    """Rows of two super-blocks: zeros, constants, outliers, tiny values, all positive, a zero block beside a live one."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(7, 512, generator=g) * torch.rand(7, 1, generator=g) * 0.05  # (7, 512)
    w[0] = 0
    w[1] = -0.37
    w[2, [5, 300]] = torch.tensor([40.0, -65.0])
    w[3] *= 1e-4
    w[4, :256] = 0
    w[5] = torch.randn(512, generator=g).abs() * 0.02 + 0.01
    w[6] = (w[6] * 20).half().float()
    return w


@pytest.mark.parametrize("name", list(KTYPES))
def test_without_importance_every_block_is_llama_cpps_reference_rounding(name):
    w = _weights(3)
    kq = quantize_k(w, name)
    t = KTYPES[name]
    for r in range(w.shape[0]):
        for b in range(2):
            x = [f(v) for v in w[r, 256 * b : 256 * (b + 1)].tolist()]
            q, sc, mc, d, dmin = _superblock(x, name)
            where = f"{name} row {r} block {b}"
            subs = slice(b * t.subs, (b + 1) * t.subs)
            assert kq.q[r, 256 * b : 256 * (b + 1)].tolist() == q, where
            assert kq.scales[r, subs].tolist() == sc, where
            assert kq.d[r, b].numpy().tobytes() == d.tobytes(), where
            if t.asymmetric:
                assert kq.mins is not None and kq.dmin is not None
                assert kq.mins[r, subs].tolist() == mc, where
                assert kq.dmin[r, b].numpy().tobytes() == dmin.tobytes(), where


def test_nearest_int_is_ggmls_for_ties_and_large_values():
    v = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 3.49999, 1e6, -4194303.0, 5e6, -0.0], dtype=torch.float32)
    assert nearest_int(v).tolist() == [_ni(a) for a in v.numpy()]
    assert nearest_int(v)[:6].tolist() == [0, 2, 2, 0, -2, 3]  # ties to even


@pytest.mark.parametrize("name", list(KTYPES))
def test_the_importance_still_lowers_the_weighted_error_below_the_reference(name):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 512, generator=g) * 0.02
    imp = torch.exp(torch.randn(512, generator=g) * 1.5)
    plain = weighted_error(w, dequantize_k(quantize_k(w, name)), imp)
    fitted = weighted_error(w, dequantize_k(quantize_k(w, name, imp)), imp)
    assert fitted < plain
