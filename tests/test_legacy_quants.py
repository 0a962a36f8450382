"""Legacy block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): without importance our bytes are gguf-py's (llama.cpp's
reference rule) byte for byte; packed blocks decode through gguf-py to our own decoding bit for bit; the importance
fit lowers the importance-weighted error and equals a block-by-block loop written from llama.cpp's code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from sparsify.algorithms.kquants import weighted_error
from sparsify.algorithms.legacy_quants import (
    LEGACY,
    LEGACY_TYPES,
    QK_LEGACY,
    LegacyQuant,
    dequantize_legacy,
    legacy_weights,
    quantize_legacy,
)
from sparsify.export.ggml_blocks import LEGACY_TYPE_SIZE, pack_legacy

WEIGHTED = ["q4_0", "q4_1", "q5_0", "q5_1"]  # the types llama.cpp fits to an imatrix (Q8_0 ignores it)


def _weights(seed: int, rows: int = 12, cols: int = 256) -> torch.Tensor:
    """Rows of various scales with the awkward ones: all zeros, constants of either sign, huge outliers, scales near
    fp16's subnormals, values on a grid, all positive, a zero block beside live ones."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 0.05  # (rows, cols)
    w[0] = 0
    w[1] = 0.37
    w[2] = -1.5
    w[3, [5, cols - 50]] = torch.tensor([40.0, -65.0])  # outliers ~1000x the row
    w[4] *= 1e-4  # block scales near fp16's subnormals
    w[5] = torch.randint(-8, 8, (cols,), generator=g).float() * 0.01  # on Q4_0's grid
    w[6] = torch.randn(cols, generator=g).abs() * 0.02 + 0.01  # all positive: the minimum clamps at 0
    w[7, 32:64] = 0  # one zero block beside live ones
    return w


def _skewed_importance(cols: int, seed: int) -> torch.Tensor:
    """A diagonal of X^T X as activations give it: log-normal, a few columns hundreds of times the rest."""
    g = torch.Generator().manual_seed(seed + 1000)
    imp = torch.exp(torch.randn(cols, generator=g) * 1.5)
    imp[torch.randperm(cols, generator=g)[: cols // 16]] *= 100
    return imp


def _gguf_type(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name.upper()]


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))
    )


# ---- bytes: gguf-py's, and read back by gguf-py ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", LEGACY)
def test_unweighted_bytes_equal_gguf_quantize(name, seed):
    g = torch.Generator().manual_seed(seed)
    tiny = (torch.rand(1, 256, generator=g) - 0.5) * 2e-40  # float32 subnormals: 1 / d overflows to inf
    w = torch.cat([_weights(seed), tiny])
    ours = pack_legacy(quantize_legacy(w, name))
    with np.errstate(over="ignore", invalid="ignore"):  # gguf-py's inf * 0 and casts of inf and NaN (to 0)
        theirs = gguf_quantize(w.numpy(), _gguf_type(name))  # llama.cpp's quantize_row_*_ref, as gguf-py writes it
    assert ours.dtype == theirs.dtype == np.uint8 and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs), (name, int((ours != theirs).sum()))


@pytest.mark.parametrize("name", LEGACY)
def test_half_precision_input_is_quantized_as_its_float32_values(name):
    w = _weights(2, rows=10).to(torch.bfloat16)
    ours = pack_legacy(quantize_legacy(w, name))
    assert np.array_equal(ours, gguf_quantize(w.to(torch.float32).numpy(), _gguf_type(name)))


@pytest.mark.parametrize("name", LEGACY)
def test_signed_zeros_follow_llama_cpp_and_decode_as_gguf_py(name):
    """Blocks holding both +0.0 and -0.0 (as pruning leaves them): numpy's reductions pick a zero extreme's sign by
    their SIMD order, llama.cpp's loops take the first met, and so do we; the decoded values agree as numbers."""
    g = torch.Generator().manual_seed(11)
    w = torch.rand(4, 128, generator=g) * 0.1  # (4, 128) non-negative: the smallest value of a block is a zero
    signs = torch.where(torch.rand(4, 128, generator=g) < 0.5, -1.0, 1.0)
    w = torch.where(torch.rand(4, 128, generator=g) < 0.4, signs * 0.0, w)  # zeros of either sign
    w[0, :32] = 0.0
    w[0, 1] = -0.0  # an all-zero block, +0.0 first
    w[1, :32] = -0.0
    w[1, 5] = 0.0  # an all-zero block, -0.0 first
    t = LEGACY_TYPES[name]
    lq = quantize_legacy(w, name)
    theirs = gguf_dequantize(gguf_quantize(w.numpy(), _gguf_type(name)), _gguf_type(name))
    assert np.array_equal(dequantize_legacy(lq).numpy(), theirs)  # as numbers: -0.0 == 0.0
    assert np.array_equal(gguf_dequantize(pack_legacy(lq), _gguf_type(name)), theirs)
    for r in range(w.shape[0]):
        for b in range(w.shape[1] // QK_LEGACY):
            xb = w[r, b * QK_LEGACY : (b + 1) * QK_LEGACY].tolist()
            if t.affine:  # quantize_row_q4_1_ref: if (v < min) min = v; if (v > max) max = v
                lo, hi = math.inf, -math.inf
                for v in xb:
                    lo, hi = v if v < lo else lo, v if v > hi else hi
                assert lq.m is not None and math.copysign(1, float(lq.m[r, b])) == math.copysign(1, lo), (r, b)
                d = (hi - lo) / t.qmax
            elif name == "q8_0":  # amax = MAX(amax, fabsf(v)) from 0.0f
                d = max(abs(v) for v in xb) / 127
            else:  # quantize_row_q4_0_ref: if (amax < fabsf(v)) { amax = fabsf(v); max = v; } from 0.0f
                amax = mx = 0.0
                for v in xb:
                    amax, mx = (abs(v), v) if amax < abs(v) else (amax, mx)
                d = mx / -t.zero
            assert math.copysign(1, float(lq.d[r, b])) == math.copysign(1, d), (r, b)


@pytest.mark.parametrize("with_imp", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", LEGACY)
def test_packed_blocks_decode_to_our_weights_bit_for_bit(name, seed, with_imp):
    w = _weights(seed)
    imp = _skewed_importance(w.shape[1], seed) if with_imp else None
    lq = quantize_legacy(w, name, imp)
    t = LEGACY_TYPES[name]
    rows, cols = w.shape
    assert lq.q.dtype == torch.int8 and lq.q.shape == w.shape
    assert int(lq.q.min()) >= t.qmin and int(lq.q.max()) <= t.qmax
    assert lq.d.dtype == torch.float16 and lq.d.shape == (rows, cols // QK_LEGACY)
    assert (lq.m is not None) == t.affine
    if lq.m is not None:
        assert lq.m.dtype == torch.float16 and lq.m.shape == lq.d.shape

    data = pack_legacy(lq)
    block, size = GGML_QUANT_SIZES[_gguf_type(name)]
    assert (block, size) == (QK_LEGACY, LEGACY_TYPE_SIZE[name])
    assert data.shape == (rows, cols // QK_LEGACY * size) and data.dtype == np.uint8

    theirs = gguf_dequantize(data, _gguf_type(name))  # (rows, cols) float32, gguf-py's reading of ggml's layout
    ours = dequantize_legacy(lq).numpy()
    assert _same_bits(theirs, ours)  # bit for bit, signed zeros included
    assert not ours[0].any() and not ours[7, 32:64].any()  # zeros stay zeros
    assert np.abs(ours[2] + 1.5).max() < 1e-3  # a constant row stays (near) constant
    assert np.abs(ours[3, [5, cols - 50]] - [40.0, -65.0]).max() < 2.0  # outliers survive
    rel = np.linalg.norm(ours[8:] - w[8:].numpy()) / np.linalg.norm(w[8:].numpy())
    bound = {"q4_0": 0.13, "q4_1": 0.12, "q5_0": 0.065, "q5_1": 0.06, "q8_0": 0.008}[name]  # 0.6-0.8 of it measured
    assert rel < bound, (name, rel)


def test_every_bit_position_is_read_where_we_write_it():
    """Codes set one at a time to their largest value (Q5's fifth bit included) land on exactly that weight in
    gguf-py's reading; a minimum or scale set in one block lands on that block only."""
    rows, cols = 1, 4 * QK_LEGACY
    for name, t in LEGACY_TYPES.items():
        ones = torch.ones(rows, cols // QK_LEGACY, dtype=torch.float16)
        m = torch.zeros_like(ones) if t.affine else None
        for j in range(0, cols, 3):
            q = torch.full((rows, cols), t.zero, dtype=torch.int8)
            q[0, j] = t.qmax
            lq = LegacyQuant(name, q, ones, m)
            got = gguf_dequantize(pack_legacy(lq), _gguf_type(name))
            assert _same_bits(got, dequantize_legacy(lq).numpy()), (name, j)
            assert np.flatnonzero(got[0]).tolist() == [j], (name, j)
        for b in range(cols // QK_LEGACY):
            d = torch.zeros_like(ones)
            d[0, b] = -0.5
            mins = None if m is None else torch.full_like(ones, 0.25).index_fill_(1, torch.tensor([b]), -3.0)
            lq = LegacyQuant(name, torch.full((rows, cols), t.qmin, dtype=torch.int8), d, mins)
            got = gguf_dequantize(pack_legacy(lq), _gguf_type(name))
            assert _same_bits(got, dequantize_legacy(lq).numpy()), (name, b)


# ---- what the importance fit achieves --------------------------------------------------------------------------------


def _heavy(seed: int) -> torch.Tensor:
    """(16, 512) heavy-tailed weights (a Gaussian over the square root of a uniform), as trained matrices are."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 512, generator=g) * 0.02 / torch.rand(16, 512, generator=g).clamp_min(0.05).sqrt()


@pytest.mark.parametrize("name", WEIGHTED)
def test_importance_lowers_the_importance_weighted_error(name):
    w = _heavy(3)
    imp = _skewed_importance(w.shape[1], 3)
    plain = weighted_error(w, dequantize_legacy(quantize_legacy(w, name)), imp)
    weighted = weighted_error(w, dequantize_legacy(quantize_legacy(w, name, imp)), imp)
    assert weighted < 0.65 * plain, (name, weighted / plain)  # 0.14-0.50 measured


def test_q8_0_ignores_importance_as_llama_cpp_does():
    w = _heavy(4)
    a, b = quantize_legacy(w, "q8_0"), quantize_legacy(w, "q8_0", _skewed_importance(w.shape[1], 4))
    assert torch.equal(a.q, b.q) and torch.equal(a.d, b.d) and a.m is None and b.m is None


@pytest.mark.parametrize("name", WEIGHTED)
def test_a_block_of_silent_columns_is_still_fitted(name):
    w = _heavy(6)[:4]
    imp = _skewed_importance(w.shape[1], 6)
    imp[:64] = 0  # the first two blocks' inputs never fired in calibration
    got = dequantize_legacy(quantize_legacy(w, name, imp))
    rel = (got[:, :64] - w[:, :64]).norm() / w[:, :64].norm()
    assert rel < 0.3, (name, float(rel))  # fitted, not written as zeros (1.0)


def test_rejects_what_it_cannot_quantize():
    w = torch.randn(2, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_legacy(torch.randn(2, 48), "q4_0")
    with pytest.raises(ValueError, match="unknown legacy type"):
        quantize_legacy(w, "q6_0")
    with pytest.raises(ValueError, match="one value per column"):
        quantize_legacy(w, "q4_0", torch.ones(32))
    with pytest.raises(ValueError, match="non-negative"):
        quantize_legacy(w, "q4_1", -torch.ones(64))
    with pytest.raises(ValueError, match="all zeros"):
        quantize_legacy(w, "q5_0", torch.zeros(64))
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_legacy(torch.full((2, 64), float("nan")), "q8_0")
    for name in LEGACY:
        with pytest.raises(ValueError, match="overflows fp16"):
            quantize_legacy(w * 1e9, name)
        with pytest.raises(ValueError, match="overflows fp16"):
            quantize_legacy(w * 1e9, name, torch.ones(64))
    lq = quantize_legacy(w, "q4_1")
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        pack_legacy(LegacyQuant("q4_1", lq.q + 1, lq.d, lq.m))  # a 16 would carry into the next nibble
    with pytest.raises(ValueError, match="needs block minimum"):
        pack_legacy(LegacyQuant("q4_1", lq.q, lq.d, None))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 31\]"):
        pack_legacy(LegacyQuant("q5_0", lq.q - 1, lq.d, None))


# ---- the vectorised importance fit against a block-by-block loop ------------------------------------------------------
# Plain Python floats (float64), one row and one block at a time, written from llama.cpp's quantize_row_q4_0_impl,
# make_qx_quants and make_qkx3_quants (with our tie rule, the scale kept positive, and the codes rounded again to the
# fp16 scale and minimum as the module docstring says).

_TIE = 1e-12


def _clamp(v: int, lo: int, hi: int) -> int:
    return min(max(v, lo), hi)


def _make_qx_quants(x, w, nmax):
    """make_qx_quants(32, nmax, x, L, rmse_type=1, qw=w): the scale (codes in [-nmax, nmax - 1] for ``-scale``...)."""
    amax = mx = 0.0
    for a in x:
        if abs(a) > amax:
            amax, mx = abs(a), a
    if amax < 1e-15:
        return 0.0

    def candidate(iscale):
        ls = [_clamp(round(iscale * a), -nmax, nmax - 1) for a in x]
        sumlx = sum(c * a * k for c, a, k in zip(w, x, ls, strict=True))
        suml2 = sum(c * k * k for c, k in zip(w, ls, strict=True))
        return sumlx, suml2

    sumlx, suml2 = candidate(-(nmax + 0.1 * 0) / mx)
    scale = sumlx / suml2 if suml2 > 0 else 0.0
    best = sumlx * sumlx / suml2 if suml2 > 0 else 0.0
    for i in range(-9, 10):
        if i == 0:
            continue
        sumlx, suml2 = candidate(-(nmax + 0.1 * i) / mx)
        if suml2 > 0 and sumlx * sumlx / suml2 > (1 + _TIE) * best:
            scale, best = sumlx / suml2, sumlx * sumlx / suml2
    return scale


def _make_qkx3_quants(x, w, nmax, rmin=-0.9, rdelta=0.05, nstep=36):
    """make_qkx3_quants(32, nmax, x, w, L, &the_min, Laux, -0.9, 0.05, 36, false): ``(scale, the_min)``."""
    sum_w = sum(w)
    sum_x = sum(c * a for c, a in zip(w, x, strict=True))
    sum_x2 = sum(c * a * a for c, a in zip(w, x, strict=True))
    lo, hi = min(min(x), 0.0), max(x)
    if hi <= lo:
        return 0.0, -lo
    iscale = nmax / (hi - lo)
    scale, lo_best = 1 / iscale, lo
    ls = [_clamp(round(iscale * (a - lo)), 0, nmax) for a in x]
    best = sum(c * (scale * k + lo - a) ** 2 for c, k, a in zip(w, ls, x, strict=True))
    for i in range(nstep + 1):
        if hi - lo_best <= 0:
            continue
        iscale = (nmax + rmin + rdelta * i) / (hi - lo_best)
        ls = [round(min(max(iscale * (a - lo_best), 0.0), nmax)) for a in x]
        sum_l = sum(c * k for c, k in zip(w, ls, strict=True))
        sum_l2 = sum(c * k * k for c, k in zip(w, ls, strict=True))
        sum_xl = sum(c * k * a for c, k, a in zip(w, ls, x, strict=True))
        det = sum_w * sum_l2 - sum_l * sum_l
        if det <= 0:
            continue
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        if this_min > 0:
            this_min, this_scale = 0.0, sum_xl / sum_l2
        if this_scale <= 0:
            continue
        mad = sum(c * (this_scale * k + this_min - a) ** 2 for c, k, a in zip(w, ls, x, strict=True))
        if mad < best - _TIE * sum_x2:
            best, scale, lo_best = mad, this_scale, this_min
    return scale, -lo_best


def _fp16(v: float) -> float:
    return float(np.float16(v))


def _loop_row(x, imp, name):
    """``(codes, d, m, weights)`` of one row ``x`` by quantize_row_<name>_impl, block by block."""
    t = LEGACY_TYPES[name]
    mean = sum(imp) / len(imp)
    imp = [max(a, 1e-6 * mean) for a in imp]  # silent columns count a little (ours; llama.cpp: as 0)
    sigma2 = sum(a * a for a in x) / len(x)
    weights = [c * math.sqrt(sigma2 + a * a) for c, a in zip(imp, x, strict=True)]
    codes, ds, ms = [], [], []
    for b in range(0, len(x), QK_LEGACY):
        xb, wb = x[b : b + QK_LEGACY], weights[b : b + QK_LEGACY]
        if not t.affine:
            d = _fp16(_make_qx_quants(xb, wb, t.zero))
            codes += [t.zero + (_clamp(round(a / d), -t.zero, t.zero - 1) if d else 0) for a in xb]
            ds.append(d)
        else:
            scale, the_min = _make_qkx3_quants(xb, wb, t.qmax)
            d, m = _fp16(scale), _fp16(-the_min)
            codes += [_clamp(round((a - m) / d), 0, t.qmax) if d else 0 for a in xb]
            ds.append(d)
            ms.append(m)
    return codes, ds, ms, weights


@pytest.mark.parametrize("name", WEIGHTED)
def test_vectorised_importance_fit_equals_a_block_by_block_loop(name):
    w = _weights(7, rows=10, cols=128)[[1, 2, 3, 4, 5, 6, 7, 9]]  # constants, outliers, tiny, grid, positive, plain
    imp = _skewed_importance(w.shape[1], 7)
    imp[:32] = 0  # one silent block
    lq = quantize_legacy(w, name, imp)
    v = legacy_weights(w, imp)
    imp_list = [float(a) for a in imp.to(torch.float64)]
    for r in range(w.shape[0]):
        x = [float(a) for a in w[r].to(torch.float64)]
        codes, ds, ms, weights = _loop_row(x, imp_list, name)
        np.testing.assert_allclose(weights, v[r].numpy(), rtol=1e-13, atol=0)
        where = f"{name} row {r}"
        assert lq.q[r].tolist() == codes, where
        assert [float(a) for a in lq.d[r]] == ds, where
        if ms:
            assert lq.m is not None and [float(a) for a in lq.m[r]] == ms, where
