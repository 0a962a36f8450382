"""Integer affine quantization: granularities, quantization parameters, (fake) quantization and range observers.

The conventions are compressed-tensors' (the format vLLM loads), so a scale and zero point computed here
decode the same way there: the observed range is widened to include 0; a symmetric scale is
``max(|min|, |max|) / ((qmax - qmin) / 2)`` with zero point 0; an asymmetric one is
``(max - min) / (qmax - qmin)`` with ``zp = round(clamp(qmin - min / scale, qmin, qmax))``; quantization is
``clamp(round(x / scale + zp), qmin, qmax)`` with ``torch.round`` (half to even) and dequantization
``(q - zp) * scale``. Weights are ``W: (out, in)``; activations ``X: (..., in)``.

``QuantArgs(signed_scale=True)`` is llama.cpp's Q4_0 rule for a symmetric grid instead: each slice's
largest-magnitude value, with its sign, lands exactly on ``qmin`` (scale = extreme / qmin, negative when the
extreme is positive), so all ``2**bits`` levels are in use and nothing is clipped; compressed-tensors and
vLLM decode it unchanged (``q * scale``). At 4 bits the step is 7.5/8 of the abs-max rule's.

The straight-through fake quantization for training learns the scale as LSQ does (Esser et al. 2020,
"Learned Step Size Quantization", arXiv:1902.08153).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor: ``scale: (1,)``."""


@dataclass(frozen=True)
class PerChannel:
    """One scale per output row of ``W: (out, in)``: ``scale: (out, 1)``."""


@dataclass(frozen=True)
class PerGroup:
    """One scale per row and per ``size`` consecutive input columns: ``scale: (out, in // size)``."""

    size: int

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"group size must be a positive number of columns, got {self.size}")


@dataclass(frozen=True)
class PerToken:
    """One scale per row of an activation ``X: (..., in)``, reduced over the last dim: ``scale: (..., 1)``."""


Granularity = PerTensor | PerChannel | PerGroup | PerToken


@dataclass(frozen=True)
class QuantArgs:
    """Integer quantization: ``bits`` wide, signed range ``[qmin, qmax]``, symmetric or with a zero point."""

    bits: int = 8  # 2..8: the codes are stored as int8
    symmetric: bool = True  # zero point 0 (what int8 GEMM kernels want); False adds an int8 zero point
    granularity: Granularity = PerChannel()  # one scale per output row: the usual weight choice
    # symmetric only: the slice's extreme lands exactly on qmin, scale = extreme / qmin (negative when the extreme
    # is positive), so all 2**bits levels are in use; llama.cpp's Q4_0 rule. False: compressed-tensors' max|x| / 7.5
    signed_scale: bool = False

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8 (codes are stored as int8), got {self.bits}")
        if not isinstance(self.granularity, PerTensor | PerChannel | PerGroup | PerToken):
            raise ValueError(
                f"granularity must be PerTensor(), PerChannel(), PerGroup(size) or PerToken(), got {self.granularity!r}"
            )

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


def _check_groups(n_in: int, size: int) -> None:
    if n_in % size:
        raise ValueError(f"{n_in} input columns are not a multiple of the group size {size}")


def _slices(x: Tensor, granularity: Granularity) -> tuple[Tensor, tuple[int, ...]]:
    """``x`` as ``(slices, elements)``, one row per scale, and the shape the per-slice results take."""
    if isinstance(granularity, PerTensor):
        return x.reshape(1, -1), (1,)
    if isinstance(granularity, PerChannel):
        if x.ndim != 2:
            raise ValueError(f"PerChannel expects a weight (out, in), got shape {tuple(x.shape)}")
        return x, (x.shape[0], 1)
    if isinstance(granularity, PerGroup):
        g = granularity.size
        _check_groups(x.shape[-1], g)
        return x.reshape(-1, g), (*x.shape[:-1], x.shape[-1] // g)
    return x.reshape(-1, x.shape[-1]), (*x.shape[:-1], 1)  # PerToken


def _apply(
    fn: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor, scale: Tensor, zero_point: Tensor, args: QuantArgs
) -> Tensor:
    """``fn(x, scale, zp)`` elementwise with the scale broadcast over its slice."""
    if isinstance(args.granularity, PerGroup):
        g = args.granularity.size
        _check_groups(x.shape[-1], g)
        xg = x.unflatten(-1, (x.shape[-1] // g, g))  # (..., in // g, g)
        return fn(xg, scale.unsqueeze(-1), zero_point.unsqueeze(-1)).flatten(-2)  # (..., in)
    return fn(x, scale, zero_point)  # (out, 1), (..., 1) and (1,) broadcast as they are


def minmax(x: Tensor, granularity: Granularity) -> tuple[Tensor, Tensor]:
    """Per-slice ``(min, max)`` of ``x``: ``(1,)`` per tensor, ``(out, 1)`` per channel, ``(out, in // g)`` per
    group, ``x.shape[:-1] + (1,)`` per token."""
    flat, shape = _slices(x, granularity)  # (slices, elements)
    lo, hi = torch.aminmax(flat, dim=1)  # (slices,)
    return lo.reshape(shape), hi.reshape(shape)


def qparams(min_val: Tensor, max_val: Tensor, args: QuantArgs) -> tuple[Tensor, Tensor]:
    """``(scale, zero_point)`` for an observed range, as compressed-tensors' ``calculate_qparams``.

    The scale has ``min_val``'s dtype and shape; the zero point is int8 of the same shape. A zero scale
    (an all-zero slice) becomes ``finfo(dtype).eps`` and its zero point 0 (compressed-tensors casts the
    ``0 / 0`` it computes there to int8, which gives 0 on common hardware).
    """
    zeros = torch.zeros_like(min_val)
    lo = torch.minimum(min_val, zeros)  # 0 must be exactly representable
    hi = torch.maximum(max_val, zeros)
    levels = args.qmax - args.qmin  # 2**bits - 1
    if args.symmetric and args.signed_scale:
        extreme = torch.where(hi > lo.abs(), hi, lo)  # the larger magnitude, with its sign (ties: the negative end)
        scale = _nonzero(extreme / args.qmin)  # extreme / scale == qmin exactly
        zero_point = torch.zeros(scale.shape, dtype=torch.int8, device=scale.device)
    elif args.symmetric:
        scale = _nonzero(torch.maximum(lo.abs(), hi.abs()) / (levels / 2))
        zero_point = torch.zeros(scale.shape, dtype=torch.int8, device=scale.device)
    else:
        scale = _nonzero((hi - lo) / levels)
        zero_point = torch.clamp(args.qmin - lo / scale, args.qmin, args.qmax).round().to(torch.int8)
        zero_point[lo == hi] = 0  # an all-zero slice (lo = hi = 0 after widening)
    return scale, zero_point


def _nonzero(scale: Tensor) -> Tensor:
    """A zero scale replaced by the dtype's eps, so that ``x / scale`` never divides by zero."""
    return torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)


def choose_qparams(x: Tensor, args: QuantArgs) -> tuple[Tensor, Tensor]:
    """Min-max ``(scale, zero_point)`` of ``x`` under ``args.granularity``."""
    return qparams(*minmax(x, args.granularity), args)


def _quantize(x: Tensor, scale: Tensor, zp: Tensor, qmin: int, qmax: int) -> Tensor:
    v = x / scale  # promoted dtype of x and scale, as compressed-tensors
    v += zp.to(x.dtype)
    return v.clamp_(qmin, qmax).round_().to(torch.int8)


def _dequantize(q: Tensor, scale: Tensor, zp: Tensor) -> Tensor:
    return (q.to(scale.dtype) - zp.to(scale.dtype)) * scale


def _fake_quantize(x: Tensor, scale: Tensor, zp: Tensor, qmin: int, qmax: int) -> Tensor:
    v = x / scale
    v += zp.to(x.dtype)
    v = v.clamp_(qmin, qmax).round_()  # stays float: integers, exact
    return (v.to(scale.dtype) - zp.to(scale.dtype)) * scale


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, args: QuantArgs) -> Tensor:
    """int8 codes ``clamp(round(x / scale + zp), qmin, qmax)``; ``scale`` and ``zero_point`` shaped as by ``minmax``."""
    return _apply(lambda v, s, z: _quantize(v, s, z, args.qmin, args.qmax), x, scale, zero_point, args)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, args: QuantArgs) -> Tensor:
    """``(q - zp) * scale`` in ``scale.dtype``."""
    return _apply(_dequantize, q, scale, zero_point, args)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, args: QuantArgs) -> Tensor:
    """``dequantize(quantize(x))`` without the int8 intermediate, as compressed-tensors' fused quantize-dequantize.

    The arithmetic runs in the promoted dtype of ``x`` and ``scale`` (as compressed-tensors); the result is
    cast to ``x.dtype``.
    """
    out = _apply(lambda v, s, z: _fake_quantize(v, s, z, args.qmin, args.qmax), x, scale, zero_point, args)
    return out.to(x.dtype)


def round_ste(v: Tensor) -> Tensor:
    """``round(v)`` forward, identity backward (the straight-through estimator). Exact: for ``|v - round(v)| <= 1/2``
    the difference ``round(v) - v`` is exact (Sterbenz), so ``v + (round(v) - v) == round(v)``."""
    return v + (v.round() - v).detach()


def fake_quantize_ste(
    x: Tensor, scale: Tensor, zero_point: Tensor, args: QuantArgs, grad_scale: float | None = None
) -> Tensor:
    """Differentiable ``fake_quantize`` for quantization-aware training (LSQ, Esser et al. 2020, arXiv:1902.08153).

    The forward value equals ``fake_quantize`` exactly. Rounding passes gradients straight through; clamping
    passes none outside ``[qmin, qmax]``. So ``d out / d x`` is 1 inside the range and 0 outside, and
    ``d out / d scale`` is LSQ's ``(q - zp) - x / scale`` inside and ``qmin - zp`` / ``qmax - zp`` outside, summed
    over the scale's slice. ``grad_scale`` multiplies the scale's gradient (LSQ uses
    ``1 / sqrt(elements per scale * qmax)``); None leaves it as is. The zero point gets no gradient.
    """
    if grad_scale is not None:
        scale = scale.detach() + (scale - scale.detach()) * grad_scale  # value unchanged (+0), gradient * grad_scale

    def fq(v: Tensor, s: Tensor, z: Tensor) -> Tensor:
        u = v / s + z.to(v.dtype)
        q = round_ste(torch.clamp(u, args.qmin, args.qmax))
        return (q.to(s.dtype) - z.to(s.dtype)) * s

    return _apply(fq, x, scale, zero_point, args).to(x.dtype)


Observer = Literal["minmax", "percentile", "mse", "weighted-mse"]


def _quantile(flat: Tensor, q: float) -> Tensor:
    """Per-row ``q``-quantile of ``flat: (slices, n)`` with linear interpolation (``torch.quantile``'s default),
    from two ``kthvalue`` selections: no size limit (``torch.quantile`` refuses more than 2**24 values)."""
    n = flat.shape[1]
    pos = q * (n - 1)
    k = min(int(pos), n - 1)
    lo = torch.kthvalue(flat, k + 1, dim=1).values  # (slices,)
    if k + 1 == n or pos == k:
        return lo
    hi = torch.kthvalue(flat, k + 2, dim=1).values  # (slices,)
    return torch.lerp(lo, hi, pos - k)


def observe(
    x: Tensor,
    args: QuantArgs,
    method: Observer = "minmax",
    *,
    q: float = 0.9999,
    grid: int = 80,
    min_p: float = 0.2,
    importance: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The range ``(min, max)`` to quantize ``x`` with, shaped as ``minmax(x, args.granularity)``.

    - ``"minmax"``: the observed extremes.
    - ``"percentile"``: per slice, the ``q`` and ``1 - q`` quantiles of ``x`` (asymmetric) or ``±`` the
      ``q``-quantile of ``|x|`` (symmetric), so that a few outliers do not stretch the scale.
    - ``"mse"``: per slice, the min-max range shrunk by the factor ``p`` among ``linspace(1, min_p, grid)`` that minimises the squared error ``sum (fake_quantize(x) - x)^2`` of the slice (llm-compressor's
      MSE observer in spirit; squared error, not its ``|.|^2.4``). ``p = 1`` wins ties, so the error never
      exceeds min-max's. One fake-quantized copy of ``x`` is alive at a time.
    - ``"weighted-mse"``: the same search, each element's squared error weighted by ``importance: (in,)``, its
      input's mean square ``E[x_j^2]`` (the diagonal of ``X^T X / N``): the output error a weight's rounding
      causes, without the cross terms (AWQ's clipping search and llama.cpp's importance matrix, in spirit).
    """
    if method == "minmax":
        return minmax(x, args.granularity)
    flat, shape = _slices(x, args.granularity)  # (slices, elements)
    if method == "percentile":
        if not 0.5 < q <= 1.0:
            raise ValueError(f"percentile q must be in (0.5, 1], got {q}")
        if args.symmetric:
            hi = _quantile(flat.abs(), q)  # (slices,)
            lo = -hi
        else:
            lo, hi = _quantile(flat, 1.0 - q), _quantile(flat, q)
        return lo.reshape(shape), hi.reshape(shape)
    if method in ("mse", "weighted-mse"):
        if not 0.0 < min_p <= 1.0 or grid < 1:
            raise ValueError(f"mse needs grid >= 1 and min_p in (0, 1], got grid={grid}, min_p={min_p}")
        weight = None
        if method == "weighted-mse":
            if importance is None or importance.shape != (x.shape[-1],):
                got = None if importance is None else tuple(importance.shape)
                raise ValueError(f"weighted-mse needs importance of shape ({x.shape[-1]},), got {got}")
            weight = _tile(importance.to(flat.dtype), x, args.granularity)  # (slices, elements) or broadcastable
        lo, hi = torch.aminmax(flat, dim=1, keepdim=True)  # (slices, 1)
        best_err = torch.full_like(lo, float("inf"))  # (slices, 1)
        best_p = torch.ones_like(lo)  # (slices, 1)
        for p in torch.linspace(1.0, min_p, grid).tolist():
            scale, zp = qparams(lo * p, hi * p, args)  # (slices, 1)
            err = (_fake_quantize(flat, scale, zp, args.qmin, args.qmax) - flat).pow_(2)  # (slices, elements)
            err = (err if weight is None else err.mul_(weight)).sum(1, keepdim=True)
            better = err < best_err  # (slices, 1)
            best_err = torch.where(better, err, best_err)
            best_p = torch.where(better, p, best_p)
        return (lo * best_p).reshape(shape), (hi * best_p).reshape(shape)
    raise ValueError(f"unknown observer {method!r}: use 'minmax', 'percentile', 'mse' or 'weighted-mse'")


def _tile(per_column: Tensor, x: Tensor, granularity: Granularity) -> Tensor:
    """``per_column: (in,)`` laid out as ``_slices(x, granularity)``'s rows (broadcastable where it can be)."""
    if isinstance(granularity, PerGroup):
        g = granularity.size
        return per_column.reshape(-1, g).repeat(x.numel() // x.shape[-1], 1)  # (slices, g)
    if isinstance(granularity, PerTensor):
        return per_column.repeat(x.numel() // x.shape[-1]).reshape(1, -1)  # (1, numel)
    return per_column.reshape(1, -1)  # per channel / token: (1, in) broadcasts over the rows
