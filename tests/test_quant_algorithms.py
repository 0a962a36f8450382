"""Quantization math (quant, GPTQ, SmoothQuant) against naive loops and compressed-tensors, exactly or tightly."""

from __future__ import annotations

import itertools

import pytest
import torch

from sparsify.algorithms.gptq import gptq_quantize
from sparsify.algorithms.quant import (
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    QuantArgs,
    choose_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_ste,
    minmax,
    observe,
    qparams,
    quantize,
)
from sparsify.algorithms.smoothquant import smooth_norm, smooth_weights, smoothing_scales

F32 = torch.float32
EXACT = {"rtol": 0, "atol": 0}
BITS_SYM = list(itertools.product([4, 8], [True, False]))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sample(granularity, seed: int = 0, dtype: torch.dtype = F32) -> torch.Tensor:
    """A weight (6, 32), or for PerToken an activation (2, 3, 32), off-centre so asymmetric ranges matter."""
    shape = (2, 3, 32) if isinstance(granularity, PerToken) else (6, 32)
    x = torch.randn(shape, generator=_gen(seed)) * 2 + 0.7
    x.view(-1, 32)[1] = x.view(-1, 32)[1].abs()  # an all-positive slice: the range is widened to include 0
    return x.to(dtype)


def _slice_key(granularity, idx: tuple[int, ...]) -> tuple[int, ...]:
    """Which scale element ``x[idx]`` uses, written out per granularity."""
    if isinstance(granularity, PerTensor):
        return (0,)
    if isinstance(granularity, PerChannel):
        return (idx[0], 0)
    if isinstance(granularity, PerGroup):
        return (*idx[:-1], idx[-1] // granularity.size)
    return (*idx[:-1], 0)  # PerToken


GRANULARITIES = [PerTensor(), PerChannel(), PerGroup(8), PerToken()]


# ---- quant: against explicit loops ----------------------------------------------------------------------------------


def _f32(v) -> torch.Tensor:
    return torch.tensor(v, dtype=F32)


def _naive_quant(x: torch.Tensor, args: QuantArgs):
    """Min/max, scale, zero point, codes and decoded values, one element at a time in float32 scalars."""
    lo: dict[tuple, float] = {}
    hi: dict[tuple, float] = {}
    for idx in itertools.product(*map(range, x.shape)):
        k, v = _slice_key(args.granularity, idx), float(x[idx])
        lo[k], hi[k] = min(lo.get(k, v), v), max(hi.get(k, v), v)
    scale, zp = {}, {}
    for k in lo:
        a, b = min(lo[k], 0.0), max(hi[k], 0.0)
        if args.symmetric:
            s = _f32(max(-a, b)) / _f32((2**args.bits - 1) / 2)
            z = 0
        else:
            s = (_f32(b) - _f32(a)) / _f32(2**args.bits - 1)
            z = None
        if float(s) == 0.0:
            s, z = _f32(torch.finfo(F32).eps), 0
        if z is None:
            z = round(min(max(float(_f32(args.qmin) - _f32(a) / s), args.qmin), args.qmax))
        scale[k], zp[k] = s, z
    q = torch.empty(x.shape, dtype=torch.int8)
    deq = torch.empty(x.shape, dtype=F32)
    for idx in itertools.product(*map(range, x.shape)):
        k = _slice_key(args.granularity, idx)
        v = float(x[idx] / scale[k] + zp[k])  # float32 ops
        q[idx] = min(max(round(v), args.qmin), args.qmax)  # Python's round: half to even, as torch.round
        deq[idx] = (_f32(int(q[idx]) - zp[k])) * scale[k]
    keys = sorted(lo)  # the slices in row-major order, as the scale tensor holds them
    shape = minmax(x, args.granularity)[0].shape

    def as_tensor(d: dict, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([float(d[k]) for k in keys], dtype=dtype).reshape(shape)

    return {
        "min": as_tensor(lo, F32),
        "max": as_tensor(hi, F32),
        "scale": as_tensor(scale, F32),
        "zp": as_tensor(zp, torch.int8),
        "q": q,
        "deq": deq,
    }


@pytest.mark.parametrize(("bits", "symmetric"), BITS_SYM)
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=repr)
def test_qparams_quantize_dequantize_match_loops(granularity, bits, symmetric):
    args = QuantArgs(bits, symmetric, granularity)
    x = _sample(granularity)
    ref = _naive_quant(x, args)
    lo, hi = minmax(x, granularity)
    torch.testing.assert_close(lo, ref["min"], **EXACT)
    torch.testing.assert_close(hi, ref["max"], **EXACT)
    scale, zp = qparams(lo, hi, args)
    assert zp.dtype == torch.int8 and zp.shape == scale.shape == lo.shape
    torch.testing.assert_close(scale, ref["scale"], **EXACT)
    torch.testing.assert_close(zp, ref["zp"], **EXACT)
    q = quantize(x, scale, zp, args)
    assert q.dtype == torch.int8 and q.shape == x.shape
    torch.testing.assert_close(q, ref["q"], **EXACT)
    assert int(q.min()) >= args.qmin and int(q.max()) <= args.qmax
    torch.testing.assert_close(dequantize(q, scale, zp, args), ref["deq"], **EXACT)
    torch.testing.assert_close(fake_quantize(x, scale, zp, args), ref["deq"], **EXACT)
    s2, z2 = choose_qparams(x, args)
    assert torch.equal(s2, scale) and torch.equal(z2, zp)


@pytest.mark.parametrize("bits", [4, 8])
def test_signed_scale_puts_each_groups_extreme_on_qmin(bits):
    """llama.cpp's Q4_0 rule: the largest |w| of each group, with its sign, is exactly level qmin; no clipping."""
    args = QuantArgs(bits, True, PerGroup(8), signed_scale=True)
    W = torch.randn(16, 64, generator=_gen(5))
    W[0, :8] = torch.tensor([0.1, -0.2, 3.0, 0.0, 0.5, -2.9, 1.0, 0.2])  # a positive extreme: negative scale
    W[1, :8] = 0.0  # an all-zero group
    scale, zp = choose_qparams(W, args)
    assert torch.equal(zp, torch.zeros_like(zp))
    groups = W.reshape(16, 8, 8)  # (out, in // g, g)
    extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))[..., 0]  # (out, in // g) signed
    for r in range(16):
        for k in range(8):
            e = float(extreme[r, k])
            want = e / args.qmin if e != 0 else torch.finfo(F32).eps
            assert float(scale[r, k]) == pytest.approx(want, rel=1e-7, abs=0)
    assert float(scale[0, 0]) < 0 < float(scale[2, 0]) or float(scale[2, 0]) < 0
    q = quantize(W, scale, zp, args)
    at_extreme = q.reshape(16, 8, 8).gather(-1, groups.abs().argmax(-1, keepdim=True))[..., 0]
    assert torch.equal(at_extreme[extreme != 0], torch.full_like(at_extreme[extreme != 0], args.qmin))
    deq = dequantize(q, scale, zp, args)
    assert torch.equal(deq.reshape(16, 8, 8).gather(-1, groups.abs().argmax(-1, keepdim=True))[..., 0], extreme)
    assert torch.equal(deq[1, :8], torch.zeros(8))
    # Gaussian groups: a finer step and nothing clipped, so less squared error than abs-max (max|w| / 7.5 at 4 bits)
    absmax = QuantArgs(bits, True, PerGroup(8))
    err = lambda a: float((fake_quantize(W, *choose_qparams(W, a), a) - W).pow(2).sum())  # noqa: E731
    assert err(args) < err(absmax)


def test_minmax_shapes_and_torch_reductions():
    W = torch.randn(6, 32, generator=_gen(1))
    X = torch.randn(2, 3, 32, generator=_gen(2))
    lo, hi = minmax(W, PerTensor())
    assert lo.shape == (1,) and lo.item() == W.min().item() and hi.item() == W.max().item()
    lo, hi = minmax(W, PerChannel())
    assert torch.equal(lo, W.amin(1, keepdim=True)) and torch.equal(hi, W.amax(1, keepdim=True))
    lo, hi = minmax(W, PerGroup(8))
    assert torch.equal(hi, W.reshape(6, 4, 8).amax(-1)) and lo.shape == (6, 4)
    lo, hi = minmax(X, PerToken())
    assert torch.equal(lo, X.amin(-1, keepdim=True)) and torch.equal(hi, X.amax(-1, keepdim=True))


def test_rounding_is_half_to_even_and_zero_is_exact():
    args = QuantArgs(8, True, PerTensor())
    scale, zp = torch.tensor([1.0]), torch.zeros(1, dtype=torch.int8)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 127.5, 300.0, -300.0])
    assert quantize(x, scale, zp, args).tolist() == [0, 2, 2, 0, -2, 126, 127, 127, -128]
    asym = QuantArgs(4, False, PerChannel())
    W = torch.tensor([[0.3, 0.9, 2.0], [-5.0, -1.0, 0.0], [0.0, 0.0, 0.0]])  # the last row all zero
    s, z = choose_qparams(W, asym)
    assert s[2].item() == torch.finfo(F32).eps and z[2].item() == 0
    out = fake_quantize(torch.tensor([[0.0, 0.0, 0.0]] * 3), s, z, asym)
    assert torch.equal(out, torch.zeros(3, 3))  # 0 decodes to exactly 0 in every row, the zero row too


def test_args_are_validated():
    with pytest.raises(ValueError, match=r"2\.\.8"):
        QuantArgs(bits=9)
    with pytest.raises(ValueError, match=r"2\.\.8"):
        QuantArgs(bits=1)
    with pytest.raises(ValueError, match="positive"):
        PerGroup(0)
    with pytest.raises(ValueError, match="granularity"):
        QuantArgs(granularity="channel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"30 .*group size 8"):
        minmax(torch.zeros(4, 30), PerGroup(8))
    with pytest.raises(ValueError, match=r"30 .*group size 8"):
        quantize(
            torch.zeros(4, 30), torch.ones(4, 3), torch.zeros(4, 3, dtype=torch.int8), QuantArgs(4, True, PerGroup(8))
        )
    a = QuantArgs(4)
    assert (a.qmin, a.qmax) == (-8, 7) and (QuantArgs().qmin, QuantArgs().qmax) == (-128, 127)
    assert QuantArgs().granularity == PerChannel() and PerGroup(8) == PerGroup(8)


# ---- quant: against compressed-tensors ------------------------------------------------------------------------------


def _ct_args(args: QuantArgs):
    from compressed_tensors.quantization import QuantizationArgs

    g = args.granularity
    if isinstance(g, PerGroup):
        kw = {"strategy": "group", "group_size": g.size}
    elif isinstance(g, PerToken):
        kw = {"strategy": "token", "dynamic": True}
    else:
        kw = {"strategy": "tensor" if isinstance(g, PerTensor) else "channel"}
    return QuantizationArgs(num_bits=args.bits, symmetric=args.symmetric, type="int", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("bits", "symmetric"), BITS_SYM)
@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(), PerGroup(8)], ids=repr)
def test_matches_compressed_tensors(granularity, bits, symmetric, dtype):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization.lifecycle import forward as ct
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantArgs(bits, symmetric, granularity)
    ct_args = _ct_args(args)
    W = _sample(granularity, seed=3, dtype=dtype)
    W[0, :8] = 0.0  # an all-zero group
    lo, hi = minmax(W, granularity)
    scale, zp = qparams(lo, hi, args)
    ct_scale, ct_zp = calculate_qparams(lo, hi, ct_args)
    torch.testing.assert_close(scale, ct_scale, **EXACT)
    torch.testing.assert_close(zp, ct_zp, **EXACT)
    q = quantize(W, scale, zp, args)
    torch.testing.assert_close(q, ct.quantize(W, scale, zp, ct_args, dtype=torch.int8), **EXACT)
    torch.testing.assert_close(dequantize(q, scale, zp, args), ct.dequantize(q, scale, zp, ct_args), **EXACT)
    torch.testing.assert_close(fake_quantize(W, scale, zp, args), ct.fake_quantize(W, scale, zp, ct_args), **EXACT)


@pytest.mark.parametrize(("bits", "symmetric"), BITS_SYM)
def test_per_token_dynamic_matches_compressed_tensors(bits, symmetric):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization.lifecycle import forward as ct
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    args = QuantArgs(bits, symmetric, PerToken())
    ct_args = _ct_args(args)
    X = torch.randn(2, 5, 48, generator=_gen(4)) * torch.linspace(0.1, 4.0, 48) + 0.3  # (batch, tokens, in)
    scale, zp = choose_qparams(X, args)
    assert scale.shape == (2, 5, 1)
    ct_scale, ct_zp = compute_dynamic_scales_and_zp(X, ct_args, module=None)
    torch.testing.assert_close(scale, ct_scale, **EXACT)
    torch.testing.assert_close(zp, ct_zp, **EXACT)
    torch.testing.assert_close(fake_quantize(X, scale, zp, args), ct.fake_quantize(X, scale, zp, ct_args), **EXACT)


# ---- quant: straight-through fake quantization ----------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "symmetric"), BITS_SYM)
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=repr)
def test_fake_quantize_ste_forward_is_fake_quantize_exactly(granularity, bits, symmetric):
    args = QuantArgs(bits, symmetric, granularity)
    x = _sample(granularity, seed=5)
    scale, zp = choose_qparams(x, args)
    scale = scale * 0.7  # some values fall outside the range
    expected = fake_quantize(x, scale, zp, args)
    x_, s_ = x.clone().requires_grad_(), scale.clone().requires_grad_()
    torch.testing.assert_close(fake_quantize_ste(x_, s_, zp, args), expected, **EXACT)
    torch.testing.assert_close(fake_quantize_ste(x_, s_, zp, args, grad_scale=0.1), expected, **EXACT)


@pytest.mark.parametrize(("zero_point", "symmetric"), [(0, True), (2, False)])
def test_fake_quantize_ste_gradients_are_lsq(zero_point, symmetric):
    args = QuantArgs(4, symmetric, PerTensor())  # qmin -8, qmax 7
    x = torch.tensor([-2.3, 0.4, 1.6, 9.0, -11.0, 0.0], requires_grad=True)
    s = torch.tensor([0.5], requires_grad=True)
    zp = torch.tensor([zero_point], dtype=torch.int8)
    fake_quantize_ste(x, s, zp, args).sum().backward()
    v = [xi / 0.5 + zero_point for xi in x.tolist()]
    inside = [args.qmin <= vi <= args.qmax for vi in v]
    assert x.grad.tolist() == [1.0 if i else 0.0 for i in inside]
    expected = 0.0  # LSQ: round(v) - v inside (with the zero point taken out), the clamp bound - zp outside
    for vi, xi, i in zip(v, x.tolist(), inside, strict=True):
        if i:
            expected += (round(vi) - zero_point) - xi / 0.5
        else:
            expected += (args.qmax if vi > args.qmax else args.qmin) - zero_point
    assert s.grad.item() == pytest.approx(expected, abs=1e-5)
    s.grad = None
    fake_quantize_ste(x, s, zp, args, grad_scale=0.25).sum().backward()
    assert s.grad.item() == pytest.approx(0.25 * expected, abs=1e-5)


def test_fake_quantize_ste_per_group_scale_gradient_is_per_group():
    args = QuantArgs(4, True, PerGroup(4))
    x = torch.randn(3, 8, generator=_gen(6))
    scale, zp = choose_qparams(x, args)
    s = scale.clone().requires_grad_()
    fake_quantize_ste(x, s, zp, args).sum().backward()
    v = x.reshape(3, 2, 4) / scale.unsqueeze(-1)
    inside = (v >= args.qmin) & (v <= args.qmax)
    expected = torch.where(inside, v.round() - v, v.clamp(args.qmin, args.qmax)).sum(-1)  # (3, 2)
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-5)


# ---- quant: observers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=repr)
def test_observers_return_minmax_shapes(granularity):
    x = _sample(granularity, seed=7)
    args = QuantArgs(4, False, granularity)
    lo, hi = minmax(x, granularity)
    for method in ("minmax", "percentile", "mse"):
        o_lo, o_hi = observe(x, args, method)
        assert o_lo.shape == lo.shape and o_hi.shape == hi.shape
        assert (o_lo.clamp(max=0) >= lo.clamp(max=0)).all() and (o_hi.clamp(min=0) <= hi.clamp(min=0)).all()
    torch.testing.assert_close(observe(x, args, "minmax"), (lo, hi), **EXACT)
    with pytest.raises(ValueError, match="unknown observer"):
        observe(x, args, "histogram")  # type: ignore[arg-type]


def test_percentile_equals_torch_quantile_and_ignores_an_outlier():
    W = torch.randn(4, 999, generator=_gen(8))
    for q in (0.9, 0.99, 0.9999):
        lo, hi = observe(W, QuantArgs(8, False, PerChannel()), "percentile", q=q)
        torch.testing.assert_close(hi[:, 0], torch.quantile(W, q, dim=1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lo[:, 0], torch.quantile(W, 1 - q, dim=1), rtol=1e-6, atol=1e-6)
        _, a = observe(W, QuantArgs(8, True, PerChannel()), "percentile", q=q)
        torch.testing.assert_close(a[:, 0], torch.quantile(W.abs(), q, dim=1), rtol=1e-6, atol=1e-6)
    x = torch.randn(100_000, generator=_gen(9))
    x[123] = 1000.0
    x[456] = -800.0
    for symmetric in (True, False):
        lo, hi = observe(x, QuantArgs(8, symmetric, PerTensor()), "percentile")
        assert 3.0 < hi.item() < 6.0 and -6.0 < lo.item() < -3.0
    assert minmax(x, PerTensor())[1].item() == 1000.0


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_observer_shrinks_heavy_tails_and_never_loses_to_minmax(symmetric):
    args = QuantArgs(4, symmetric, PerChannel())
    g = _gen(10)
    W = torch.randn(16, 256, generator=g) / torch.rand(16, 256, generator=g).add(0.05).sqrt()  # heavy-tailed
    lo, hi = minmax(W, PerChannel())
    m_lo, m_hi = observe(W, args, "mse")

    def row_err(a, b):
        s, z = qparams(a, b, args)
        return (fake_quantize(W, s, z, args) - W).pow(2).sum(1)  # (out,)

    e_minmax, e_mse = row_err(lo, hi), row_err(m_lo, m_hi)
    assert (e_mse <= e_minmax * (1 + 1e-6)).all()
    shrunk = (m_hi - m_lo) < (hi - lo) * 0.999
    assert shrunk.float().mean() > 0.9  # heavy tails: clipping pays in (nearly) every row
    assert e_mse.sum() < 0.9 * e_minmax.sum()
    p = ((m_hi - m_lo) / (hi - lo)).squeeze(1)
    assert (p >= 0.2 - 1e-6).all()


@pytest.mark.parametrize("granularity", [PerChannel(), PerGroup(8), PerTensor()], ids=repr)
def test_weighted_mse_picks_the_range_of_least_input_weighted_error(granularity):
    """Against a naive search, slice by slice; uniform importance is the plain mse observer."""
    g = _gen(11)
    W = torch.randn(6, 32, generator=g) / torch.rand(6, 32, generator=g).add(0.05).sqrt()  # (out, in), heavy tails
    imp = torch.rand(32, generator=g) ** 4 * 10  # (in,): a few inputs matter most
    args = QuantArgs(4, True, granularity, signed_scale=True)
    _, hi = observe(W, args, "weighted-mse", importance=imp, grid=20, min_p=0.5)
    rows = W.reshape(-1, granularity.size) if isinstance(granularity, PerGroup) else W  # one slice per row
    cols = torch.arange(32).reshape(-1, granularity.size) if isinstance(granularity, PerGroup) else None
    if isinstance(granularity, PerTensor):
        rows, cols = W.reshape(1, -1), torch.arange(32).repeat(6).reshape(1, -1)
    for r, x in enumerate(rows):
        w = imp[cols[r % cols.shape[0]]] if cols is not None else imp
        best = None
        for p in torch.linspace(1.0, 0.5, 20).tolist():
            a, b = x.min().clamp(max=0) * p, x.max().clamp(min=0) * p
            sc, z = qparams(a.reshape(1), b.reshape(1), QuantArgs(4, True, PerTensor(), signed_scale=True))
            err = float(((fake_quantize(x, sc, z, QuantArgs(4, True, PerTensor())) - x) ** 2 * w).sum())
            if best is None or err < best[0]:
                best = (err, b)
        assert hi.reshape(-1)[r] == pytest.approx(float(best[1]), rel=1e-6)
    uniform = observe(W, args, "weighted-mse", importance=torch.ones(32))
    torch.testing.assert_close(uniform, observe(W, args, "mse"), **EXACT)
    with pytest.raises(ValueError, match=r"weighted-mse needs importance of shape \(32,\)"):
        observe(W, args, "weighted-mse")


# ---- GPTQ -----------------------------------------------------------------------------------------------------------


def _uneven_inputs(seed: int, out_f: int = 16, in_f: int = 64, n: int = 256):
    """``W: (out, in)`` and calibration inputs ``X: (n, in)`` with correlated features of uneven scale."""
    g = _gen(seed)
    scales = torch.exp(0.75 * torch.randn(in_f, generator=g))  # (in,)
    mix = torch.eye(in_f) + torch.randn(in_f, in_f, generator=g) / in_f**0.5  # (in, in)
    X = (torch.randn(n, in_f, generator=g) @ mix) * scales  # (n, in)
    W = torch.randn(out_f, in_f, generator=g)  # (out, in)
    return W, X


TIE = 1e-3  # a rounding this close to a half step may go either way between float32 and float64


def _naive_gptq(W, H, args: QuantArgs, act_order: bool, dampening: float, follow):
    """GPTQ one column at a time with an explicit float64 inverse, no blocks, no Cholesky factor.

    ``follow`` (the GPTQResult under test) settles near-ties only: a rounding within ``TIE`` of a half step
    takes the code (or zero point) ``follow`` has; every other decision is the reference's own.
    Returns ``(weight, q, scale, zp, ties)``.
    """
    n_out, n_in = W.shape
    group = args.granularity.size if isinstance(args.granularity, PerGroup) else None
    col_args = QuantArgs(args.bits, args.symmetric, PerChannel(), signed_scale=args.signed_scale)
    static = group is None or act_order
    if static:
        scale, zp = choose_qparams(W.float(), args)  # from the original W
    else:
        scale = torch.zeros(n_out, n_in // group, dtype=torch.float64)
        zp = torch.zeros(n_out, n_in // group, dtype=torch.int8)
    W = W.double().clone()
    H = H.double().clone()
    dead = H.diag() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    order = torch.argsort(H.diag(), descending=True, stable=True) if act_order else torch.arange(n_in)
    W, H, follow_q = W[:, order], H[order][:, order], follow.q[:, order]
    H += dampening * H.diag().mean() * torch.eye(n_in, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros(n_out, n_in, dtype=torch.int8)
    ties = 0
    for j in range(n_in):
        if group is None:
            s, z = scale.double().expand(n_out, 1), zp.expand(n_out, 1)
        elif static:
            k = int(order[j]) // group
            s, z = scale[:, k : k + 1].double(), zp[:, k : k + 1]
        else:
            k = j // group
            if j % group == 0:
                lo, hi = minmax(W[:, j : j + group], PerChannel())
                s, z = qparams(lo, hi, col_args)
                if not args.symmetric:  # the zero point is a rounding too
                    raw = args.qmin - torch.minimum(lo, torch.zeros_like(lo)) / s
                    near = ((raw - raw.floor() - 0.5).abs() < TIE) & (raw > args.qmin) & (raw < args.qmax)
                    z = torch.where(near, follow.zero_point[:, k : k + 1], z)
                    ties += int(near.sum())
                scale[:, k : k + 1], zp[:, k : k + 1] = s, z
            s, z = scale[:, k : k + 1], zp[:, k : k + 1]
        w = W[:, j : j + 1]  # (out, 1)
        v = w / s + z.double()
        near = ((v - v.floor() - 0.5).abs() < TIE) & (v > args.qmin) & (v < args.qmax)
        q = v.clamp(args.qmin, args.qmax).round()
        q = torch.where(near, follow_q[:, j : j + 1].double(), q)
        ties += int(near.sum())
        Q[:, j] = q[:, 0].to(torch.int8)
        dq = (q - z.double()) * s
        err = (w - dq)[:, 0] / Hinv[j, j]  # (out,)
        W[:, j:] -= torch.outer(err, Hinv[j, j:])
        W[:, j] = dq[:, 0]
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    inv = torch.argsort(order)
    return W[:, inv].float(), Q[:, inv], scale.float(), zp, ties


GPTQ_CASES = {
    "4bit-channel": (QuantArgs(4, True, PerChannel()), False),
    "4bit-tensor": (QuantArgs(4, True, PerTensor()), False),
    "4bit-g16": (QuantArgs(4, True, PerGroup(16)), False),
    "4bit-g16-asym": (QuantArgs(4, False, PerGroup(16)), False),
    "3bit-g16-actorder": (QuantArgs(3, True, PerGroup(16)), True),
    "4bit-g16-signed": (QuantArgs(4, True, PerGroup(16), signed_scale=True), False),
    "4bit-g16-signed-actorder": (QuantArgs(4, True, PerGroup(16), signed_scale=True), True),
    "8bit-channel-asym-actorder": (QuantArgs(8, False, PerChannel()), True),
}


@pytest.mark.parametrize("blocksize", [1, 8, 128])
@pytest.mark.parametrize("case", list(GPTQ_CASES))
def test_gptq_equals_naive_reference(case, blocksize):
    args, act_order = GPTQ_CASES[case]
    W, X = _uneven_inputs(11)
    H = X.T @ X / X.shape[0]
    got = gptq_quantize(W, H, args, blocksize=blocksize, dampening=0.01, act_order=act_order)
    ref_w, ref_q, ref_s, ref_z, ties = _naive_gptq(W, H, args, act_order, 0.01, follow=got)
    assert ties <= 0.01 * W.numel()
    torch.testing.assert_close(got.q, ref_q, **EXACT)
    torch.testing.assert_close(got.zero_point, ref_z, **EXACT)
    torch.testing.assert_close(got.scale, ref_s, rtol=1e-5, atol=0)
    torch.testing.assert_close(got.weight, ref_w, rtol=1e-5, atol=1e-6)


def _layer_error(W, W_q, H):
    D = (W - W_q).double()  # (out, in)
    return torch.trace(D @ H.double() @ D.T).item()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("args", "act_order"),
    [
        (QuantArgs(4, True, PerChannel()), False),
        (QuantArgs(4, True, PerChannel()), True),
        (QuantArgs(4, True, PerGroup(32)), False),
        (QuantArgs(4, True, PerGroup(32)), True),
        (QuantArgs(4, False, PerChannel()), False),
        (QuantArgs(4, False, PerGroup(32)), True),
    ],
    ids=["chan", "chan-act", "g32", "g32-act", "chan-asym", "g32-asym-act"],
)
def test_gptq_beats_round_to_nearest(args, act_order, seed):
    W, X = _uneven_inputs(seed, out_f=32, in_f=64, n=512)
    H = X.T @ X / X.shape[0]
    got = gptq_quantize(W, H, args, act_order=act_order)
    rtn = fake_quantize(W, *choose_qparams(W, args), args)
    ratio = _layer_error(W, got.weight, H) / _layer_error(W, rtn, H)
    assert ratio < (0.5 if act_order else 0.85)  # here ~0.6-0.78 in input order, ~0.3-0.39 by activation order


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("granularity", [PerChannel(), PerGroup(16)], ids=repr)
def test_gptq_outputs_decode_exactly_in_original_order(granularity, act_order):
    args = QuantArgs(4, False, granularity)
    W, X = _uneven_inputs(12)
    H = X.T @ X / X.shape[0]
    got = gptq_quantize(W, H, args, act_order=act_order)
    assert got.q.dtype == torch.int8 and got.q.shape == W.shape and got.weight.dtype == F32
    assert got.scale.shape == minmax(W, granularity)[0].shape == got.zero_point.shape
    torch.testing.assert_close(got.weight, dequantize(got.q, got.scale, got.zero_point, args), **EXACT)
    if act_order:
        assert torch.equal(got.perm, torch.argsort(H.diag(), descending=True, stable=True))
    else:
        assert got.perm is None
    # A diagonal Hessian feeds no error forward: GPTQ is then round-to-nearest, in any visiting order.
    D = torch.diag(torch.rand(64, generator=_gen(13)) + 0.1)
    diag = gptq_quantize(W, D, args, act_order=act_order)
    assert torch.equal(diag.q, quantize(W, *choose_qparams(W, args), args))
    torch.testing.assert_close(diag.weight, fake_quantize(W, *choose_qparams(W, args), args), **EXACT)


def test_gptq_dead_inputs_refusals_and_inplace():
    W, X = _uneven_inputs(14)
    X[:, 3] = 0.0  # a feature never active in calibration
    H = X.T @ X / X.shape[0]
    got = gptq_quantize(W, H, QuantArgs(4, True, PerGroup(16)))
    assert torch.isfinite(got.weight).all() and (got.weight[:, 3] == 0).all()
    H2 = H.clone()
    same = gptq_quantize(W, H2, QuantArgs(4, True, PerGroup(16)), inplace=True)
    assert torch.equal(same.q, got.q) and not torch.equal(H2, H)  # H2's memory was used
    with pytest.raises(ValueError, match="dampening"):
        gptq_quantize(W, -torch.eye(64), QuantArgs(4))
    with pytest.raises(ValueError, match="PerToken"):
        gptq_quantize(W, H, QuantArgs(8, True, PerToken()))
    with pytest.raises(ValueError, match="group size 24"):
        gptq_quantize(W, H, QuantArgs(4, True, PerGroup(24)))


# ---- SmoothQuant ----------------------------------------------------------------------------------------------------


def _outlier_activations(seed: int = 15, n: int = 64, in_f: int = 32):
    g = _gen(seed)
    X = torch.randn(n, in_f, generator=g)
    X[:, [3, 17]] *= 40.0  # outlier channels, as in LLM activations
    return X, [torch.randn(24, in_f, generator=g), torch.randn(8, in_f, generator=g) * 3]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_smoothing_keeps_the_float_model_and_matches_loops(alpha):
    X, weights = _outlier_activations()
    a = X.abs().amax(0)
    s = smoothing_scales(a, weights, alpha)
    assert s.shape == (32,) and s.dtype == F32
    for j in range(32):
        w = max(abs(float(W[k, j])) for W in weights for k in range(W.shape[0]))
        assert s[j].item() == pytest.approx(max(float(a[j]) ** alpha / w ** (1 - alpha), 1e-5), rel=1e-6)
    Xd = X.double()
    for W in weights:
        out = (Xd / s.double()) @ smooth_weights(W.double(), s).T
        torch.testing.assert_close(out, Xd @ W.double().T, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(X / s @ smooth_weights(W, s).T, X @ W.T, rtol=1e-5, atol=1e-4)
    w_max = torch.stack([W.abs().amax(0) for W in weights]).amax(0)
    if alpha == 0.0:
        torch.testing.assert_close(s, 1 / w_max, rtol=1e-6, atol=0)
    if alpha == 1.0:
        torch.testing.assert_close(s, a, **EXACT)
    if alpha == 0.5:  # the difficulty is split evenly: the activation's and the weights' maxima meet
        torch.testing.assert_close((X / s).abs().amax(0), w_max * s, rtol=1e-5, atol=0)


def test_smoothing_zero_channels_and_refusals():
    X, weights = _outlier_activations()
    a = X.abs().amax(0)
    a[5] = 0.0  # a channel never active
    weights[0][:, 9] = 0.0
    weights[1][:, 9] = 0.0  # a channel no weight reads
    for alpha in (0.0, 0.5, 1.0):
        s = smoothing_scales(a, weights, alpha)
        assert s[5].item() == 1.0 and s[9].item() == 1.0 and torch.isfinite(s).all()
    s = smoothing_scales(torch.full((32,), 1e-12), weights, 1.0, min_scale=1e-5)
    assert s[9].item() == 1.0 and (s[torch.arange(32) != 9] == 1e-5).all()  # clamped at min_scale
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            smoothing_scales(a, weights, alpha)
    with pytest.raises(ValueError, match="input columns"):
        smoothing_scales(a[:16], weights)
    assert smooth_weights(weights[0].bfloat16(), torch.ones(32)).dtype == torch.bfloat16


@pytest.mark.parametrize("offset", [0.0, 1.0])  # Llama's w * x_hat; Gemma's (1 + w) * x_hat
def test_smooth_norm_divides_the_norm_output_by_s(offset):
    g = _gen(3)
    x_hat = torch.randn(4, 16, generator=g, dtype=torch.float64)  # the normalized input
    w, b = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    s = torch.rand(16, generator=g, dtype=torch.float64) + 0.5
    w2, b2 = smooth_norm(w, b, s, offset)
    torch.testing.assert_close((offset + w2) * x_hat + b2, ((offset + w) * x_hat + b) / s, rtol=1e-12, atol=1e-12)
    w3, none = smooth_norm(w.bfloat16(), None, s, offset)
    assert none is None and w3.dtype == torch.bfloat16
