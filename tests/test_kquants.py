"""K-quants (Q2_K..Q6_K): our packed blocks decoded by gguf-py equal our own decoding bit for bit; the vectorised
choice equals a block-by-block loop; importance weighting and more bits lower the error."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from sparsify.algorithms.kquants import (
    KTYPES,
    QK_K,
    KQuant,
    KType,
    dequantize_k,
    element_weights,
    quantize_k,
    weighted_error,
)
from sparsify.export.kquant_blocks import TYPE_SIZE, pack

TYPES = list(KTYPES)  # q2_k .. q6_k, fewest bits first


def _weights(seed: int, rows: int = 12, cols: int = 512) -> torch.Tensor:
    """Heavy-tailed rows with the awkward ones: all zeros, constants of either sign, huge outliers, a tiny row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 0.05  # (rows, cols)
    w[0] = 0
    w[1] = 0.37
    w[2] = -1.5
    w[3, [5, 300]] = torch.tensor([40.0, -65.0])  # outliers ~1000x the row
    w[4] *= 1e-4  # scales near fp16's subnormals
    w[5, :256] = 0  # one zero super-block beside a live one
    w[6] = torch.randn(cols, generator=g).abs() * 0.02 + 0.01  # all positive: the minimum clamps at 0
    return w


def _skewed_importance(cols: int, seed: int) -> torch.Tensor:
    """A diagonal of X^T X as activations give it: log-normal, a few columns hundreds of times the rest."""
    g = torch.Generator().manual_seed(seed + 1000)
    imp = torch.exp(torch.randn(cols, generator=g) * 1.5)
    imp[torch.randperm(cols, generator=g)[: cols // 16]] *= 100
    return imp


def _gguf_type(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name.upper()]


# ---- packed bytes, read back by gguf-py ---------------------------------------------------------------------------


@pytest.mark.parametrize("with_imp", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", TYPES)
def test_packed_blocks_decode_to_our_weights_bit_for_bit(name, seed, with_imp):
    w = _weights(seed)
    imp = _skewed_importance(w.shape[1], seed) if with_imp else None
    kq = quantize_k(w, name, imp)
    t = KTYPES[name]
    assert int(kq.q.min()) >= t.qmin and int(kq.q.max()) <= t.qmax
    assert int(kq.scales.min()) >= t.smin and int(kq.scales.max()) <= t.smax
    if t.asymmetric:
        assert kq.mins is not None and int(kq.mins.min()) >= 0 and int(kq.mins.max()) <= t.smax

    data = pack(kq)
    block, size = GGML_QUANT_SIZES[_gguf_type(name)]
    assert (block, size) == (QK_K, TYPE_SIZE[name])
    assert data.shape == (w.shape[0], w.shape[1] // QK_K * size) and data.dtype == np.uint8

    theirs = gguf_dequantize(data, _gguf_type(name))  # (rows, cols) float32, gguf-py's reading of ggml's layout
    ours = dequantize_k(kq).numpy()
    assert theirs.dtype == ours.dtype == np.float32 and theirs.shape == ours.shape
    assert np.array_equal(theirs.view(np.uint32), ours.view(np.uint32))  # bit for bit, signed zeros included
    assert not ours[0].any() and not ours[5, :256].any()  # zeros stay zeros
    assert np.abs(ours[2] + 1.5).max() < 1.5e-3  # a constant row stays (near) constant
    assert np.abs(ours[3, [5, 300]] - [40.0, -65.0]).max() < 1.0  # outliers survive


def test_every_bit_position_is_read_where_we_write_it():
    """Codes, scales and minimums set one at a time to their largest value land on exactly that weight in
    gguf-py's reading (a transposed nibble or a shifted bit would move it)."""
    rows, cols = 1, 2 * QK_K
    for name, t in KTYPES.items():
        base = quantize_k(torch.zeros(rows, cols), name)
        ones = torch.full((rows, cols // QK_K), 1.0, dtype=torch.float16)
        for j in range(0, cols, 7):
            q = torch.full((rows, cols), 0 if t.asymmetric else -1, dtype=torch.int8)  # the smallest magnitude
            q[0, j] = t.qmax if t.asymmetric else t.qmin
            sc = torch.ones_like(base.scales)
            kq = KQuant(name, q, sc, None if base.mins is None else torch.zeros_like(sc), ones, base.dmin)
            theirs = gguf_dequantize(pack(kq), _gguf_type(name))
            np.testing.assert_array_equal(theirs, dequantize_k(kq).numpy())
        for s in range(cols // t.sub):
            sc = torch.zeros_like(base.scales)
            sc[0, s] = t.smax if t.asymmetric else t.smin
            mins = None if base.mins is None else torch.zeros_like(sc)
            if mins is not None:
                mins[0, (s + 3) % mins.shape[1]] = t.smax
            kq = KQuant(name, torch.ones(rows, cols, dtype=torch.int8), sc, mins, ones, None if mins is None else ones)
            theirs = gguf_dequantize(pack(kq), _gguf_type(name))
            np.testing.assert_array_equal(theirs, dequantize_k(kq).numpy())


# ---- what the choice achieves ---------------------------------------------------------------------------------------


def _heavy(seed: int) -> torch.Tensor:
    """(32, 1024) heavy-tailed weights (a Gaussian over the square root of a uniform), as trained matrices are."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 1024, generator=g) * 0.02 / torch.rand(32, 1024, generator=g).clamp_min(0.05).sqrt()


@pytest.mark.parametrize("name", TYPES)
def test_importance_lowers_the_importance_weighted_error(name):
    w = _heavy(3)
    imp = _skewed_importance(w.shape[1], 3)
    plain = weighted_error(w, dequantize_k(quantize_k(w, name)), imp)
    weighted = weighted_error(w, dequantize_k(quantize_k(w, name, imp)), imp)
    assert weighted < 0.5 * plain, (name, weighted / plain)  # 0.16-0.35 measured


@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k"])
def test_plain_rule_lowers_the_weighted_error_further(name):
    w = _heavy(4)
    imp = _skewed_importance(w.shape[1], 4)
    llama = weighted_error(w, dequantize_k(quantize_k(w, name, imp)), imp)
    plain = weighted_error(w, dequantize_k(quantize_k(w, name, imp, rule="plain")), imp)
    assert plain < llama, (name, plain / llama)


@pytest.mark.parametrize("with_imp", [False, True])
def test_error_falls_with_every_bit(with_imp):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 1024, generator=g) * 0.02
    imp = _skewed_importance(w.shape[1], 5) if with_imp else None
    errs = [weighted_error(w, dequantize_k(quantize_k(w, name, imp)), imp) for name in TYPES]
    assert all(a > 1.5 * b for a, b in itertools.pairwise(errs)), errs  # each bit at least a third off


@pytest.mark.parametrize("name", TYPES)
def test_a_super_block_of_silent_columns_is_still_fitted(name):
    w = _heavy(6)[:4]
    imp = _skewed_importance(w.shape[1], 6)
    imp[:256] = 0  # the first super-block's inputs never fired in calibration
    got = dequantize_k(quantize_k(w, name, imp))
    rel = (got[:, :256] - w[:, :256]).norm() / w[:, :256].norm()
    assert rel < 0.6, (name, float(rel))  # fitted (Q2_K ~0.4), not written as zeros (1.0)


def test_rejects_what_it_cannot_quantize():
    w = torch.randn(2, 512)
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_k(torch.randn(2, 300), "q4_k")
    with pytest.raises(ValueError, match="unknown K type"):
        quantize_k(w, "q7_k")
    with pytest.raises(ValueError, match="one value per column"):
        quantize_k(w, "q4_k", torch.ones(256))
    with pytest.raises(ValueError, match="non-negative"):
        quantize_k(w, "q4_k", -torch.ones(512))
    with pytest.raises(ValueError, match="all zeros"):
        quantize_k(w, "q4_k", torch.zeros(512))
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_k(torch.full((2, 512), float("nan")), "q6_k")
    with pytest.raises(ValueError, match="overflows fp16"):
        quantize_k(w * 1e9, "q4_k")
    with pytest.raises(ValueError, match="rule"):
        quantize_k(w, "q4_k", rule="mse")  # type: ignore[arg-type]
    kq = quantize_k(w, "q4_k")
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        pack(KQuant("q4_k", kq.q + 1, kq.scales, kq.mins, kq.d, kq.dmin))  # a 16 would wrap into the next nibble


# ---- the vectorised choice against a block-by-block loop --------------------------------------------------------------
# Plain Python floats (float64), one super-block and one sub-block at a time, written from the method's description
# (llama.cpp's make_qkx3_quants / make_qp_quants / make_qx_quants with our candidate order and tie rule).

_TIE = 1e-12


def _clamp(v: int, lo: int, hi: int) -> int:
    return min(max(v, lo), hi)


def _loop_affine(x, v, nmax, rmin=-0.9, rdelta=0.05, nstep=36, passes=2):
    sw = sum(v)
    sx = sum(a * b for a, b in zip(v, x, strict=True))
    sx2 = sum(a * b * b for a, b in zip(v, x, strict=True))
    hi, lo = max(x), min(min(x), 0.0)
    if hi - lo <= 0:
        return 0.0, -lo
    iscale = nmax / (hi - lo)
    scale, offset = 1 / iscale, lo
    q = [_clamp(round(iscale * (a - lo)), 0, nmax) for a in x]
    err = sum(c * (scale * k + offset - a) ** 2 for c, k, a in zip(v, q, x, strict=True))
    for _ in range(passes):
        for i in range(nstep + 1):
            den = hi - offset
            if den <= 0:
                continue
            isc = (nmax + rmin + rdelta * i) / den
            qc = [round(min(max(isc * (a - offset), 0.0), nmax)) for a in x]
            sl = sum(c * k for c, k in zip(v, qc, strict=True))
            sl2 = sum(c * k * k for c, k in zip(v, qc, strict=True))
            sxl = sum(c * k * a for c, k, a in zip(v, qc, x, strict=True))
            det = sw * sl2 - sl * sl
            if det <= 0:
                continue
            s, m = (sw * sxl - sx * sl) / det, (sl2 * sx - sl * sxl) / det
            if m > 0:
                s, m = sxl / sl2, 0.0
            if s <= 0:
                continue
            e = sum(c * (s * k + m - a) ** 2 for c, k, a in zip(v, qc, x, strict=True))
            if e < err - _TIE * sx2:
                err, scale, offset = e, s, m
    return scale, -offset


def _loop_descend(x, v, q, lo, hi, sweeps):
    lx = sum(c * a * k for c, a, k in zip(v, x, q, strict=True))
    l2 = sum(c * k * k for c, k in zip(v, q, strict=True))
    for _ in range(sweeps):
        changed = False
        for j in range(len(x)):
            slx, sl2 = lx - v[j] * x[j] * q[j], l2 - v[j] * q[j] * q[j]
            if slx == 0 or sl2 <= 0:
                continue
            new = _clamp(round(x[j] * sl2 / slx), lo, hi)
            if new == q[j]:
                continue
            slx, sl2 = slx + v[j] * x[j] * new, sl2 + v[j] * new * new
            if slx * slx * l2 > (1 + _TIE) * lx * lx * sl2:
                q[j], lx, l2, changed = new, slx, sl2, True
        if not changed:
            break
    return q, lx, l2


def _loop_levels(x, v, nmax):
    mx = max(x)
    if mx < 1e-15:
        return 0.0, [0] * len(x)
    tol = _TIE * sum(c * a * a for c, a in zip(v, x, strict=True))

    def candidate(i):
        isc = (nmax + 0.1 * i) / mx
        qc = [_clamp(round(isc * a), 0, nmax) for a in x]
        return qc, sum(c * (a - k / isc) ** 2 for c, a, k in zip(v, x, qc, strict=True))

    q, err = candidate(0)
    for i in (-4, -3, -2, -1, 1, 2, 3, 4):
        qc, e = candidate(i)
        if e < err - tol:
            q, err = qc, e
    q, lx, l2 = _loop_descend(x, v, q, 0, nmax, 5)
    return (lx / l2 if l2 > 0 else 0.0), q


def _loop_symmetric(x, v, nmax, sweeps):
    ext = x[max(range(len(x)), key=lambda k: abs(x[k]))]
    if abs(ext) < 1e-15:
        return 0.0, [0] * len(x)

    def candidate(i):
        isc = -(nmax + 0.1 * i) / ext
        qc = [_clamp(round(isc * a), -nmax, nmax - 1) for a in x]
        lx = sum(c * k * a for c, k, a in zip(v, qc, x, strict=True))
        l2 = sum(c * k * k for c, k in zip(v, qc, strict=True))
        return qc, (lx * lx / l2 if l2 > 0 else 0.0)

    q, gain = candidate(0)
    for i in (*range(-9, 0), *range(1, 10)):
        qc, g = candidate(i)
        if g > (1 + _TIE) * gain:
            q, gain = qc, g
    q, lx, l2 = _loop_descend(x, v, q, -nmax, nmax - 1, sweeps)
    return (lx / l2 if l2 > 0 else 0.0), q


def _fp16(v: float) -> float:
    return float(np.float16(v))


def _loop_element_weights(x, imp, name):
    """llama.cpp's rules for one super-block ``x`` (256 floats) and its columns' importance (or None)."""
    if imp is None:
        return [1.0] * len(x)
    if name == "q6_k":
        return list(imp)
    s2 = sum(a * a for a in x) / QK_K * (1 if name == "q2_k" else 2)
    return [c * math.sqrt(s2 + a * a) for c, a in zip(imp, x, strict=True)]


def _loop_superblock(x, v, t: KType):
    """``(q, sc, mc, d, dmin)`` of one super-block, sub-block by sub-block."""
    xs = [x[k : k + t.sub] for k in range(0, QK_K, t.sub)]
    vs = [v[k : k + t.sub] for k in range(0, QK_K, t.sub)]
    sw = [sum(c) for c in vs]
    if t.asymmetric:
        fits = [_loop_affine(a, c, t.qmax) for a, c in zip(xs, vs, strict=True)]
        d, sc = _loop_levels([f[0] for f in fits], sw, t.smax)
        dmin, mc = _loop_levels([f[1] for f in fits], sw, t.smax)
        d, dmin = _fp16(d), _fp16(dmin)
        q = []
        for a, s, m in zip(xs, sc, mc, strict=True):
            dl, ml = d * s, dmin * m
            q += [0] * t.sub if dl == 0 else [_clamp(round((b + ml) / dl), 0, t.qmax) for b in a]
        return q, sc, mc, d, dmin
    scales = [_loop_symmetric(a, c, -t.qmin, 5)[0] for a, c in zip(xs, vs, strict=True)]
    if t.name == "q3_k":
        d, sc = _loop_symmetric(scales, sw, -t.smin, 0)
    else:  # q6_k
        ext = scales[max(range(len(scales)), key=lambda k: abs(scales[k]))]
        if abs(ext) < 1e-15:
            d, sc = 0.0, [0] * len(scales)
        else:
            isc = t.smin / ext
            d, sc = 1 / isc, [_clamp(round(isc * s), t.smin, t.smax) for s in scales]
    d = _fp16(d)
    q = []
    for a, s in zip(xs, sc, strict=True):
        dl = d * s
        q += [0] * t.sub if dl == 0 else [_clamp(round(b / dl), t.qmin, t.qmax) for b in a]
    return q, sc, None, d, None


@pytest.mark.parametrize("with_imp", [False, True])
@pytest.mark.parametrize("name", TYPES)
def test_vectorised_choice_equals_a_block_by_block_loop(name, with_imp):
    t = KTYPES[name]
    w = _weights(7, rows=8, cols=512)[[3, 2, 7, 5]]  # outliers, a constant, a plain row, a half-zero row
    imp = _skewed_importance(512, 7) if with_imp else None
    rule = "llama" if with_imp else "plain"  # without, rule "llama" is llama.cpp's reference (test_kquants_ref.py)
    kq = quantize_k(w, name, imp, rule)
    v = element_weights(w, name, imp, rule)
    for r in range(w.shape[0]):
        for b in range(w.shape[1] // QK_K):
            cols = slice(b * QK_K, (b + 1) * QK_K)
            x = [float(a) for a in w[r, cols].to(torch.float64)]
            imp_b = None if imp is None else [float(a) for a in imp[cols].to(torch.float64)]
            v_loop = _loop_element_weights(x, imp_b, name)
            np.testing.assert_allclose(v_loop, v[r, cols].numpy(), rtol=1e-13, atol=0)
            q, sc, mc, d, dmin = _loop_superblock(x, v_loop, t)
            subs = slice(b * t.subs, (b + 1) * t.subs)
            where = f"{name} row {r} block {b}"
            assert kq.q[r, cols].tolist() == q, where
            assert kq.scales[r, subs].tolist() == sc, where
            assert float(kq.d[r, b]) == d, where
            if t.asymmetric:
                assert kq.mins is not None and kq.dmin is not None
                assert kq.mins[r, subs].tolist() == mc, where
                assert float(kq.dmin[r, b]) == dmin, where
