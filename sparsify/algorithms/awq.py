"""AWQ: activation-aware per-channel scales searched so that rounding hurts the salient input channels less.

Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"
(arXiv:2306.00978). For Linears ``W_i`` fed the same input ``X`` (the outputs of one norm, or of one Linear),
multiplying input channel ``c`` of every ``W_i`` by ``s_c`` and dividing the producer's output by ``s_c`` leaves
the float model unchanged, while the rounding of ``W_i * s`` then spends finer steps on the channels with large
``s``. The scales are ``s = mean|x|^a / mean|w|^(1 - a)`` (``duo``: the weights' magnitude too, normalised per group, as
llm-compressor's ``duo_scaling``; else ``mean|x|^a``), normalised so that ``max(s) * min(s) = 1``, for ``a`` on a
grid over [0, 1); the one of least output error ``sum_i ||X (Q(W_i s) / s)^T - X W_i^T||^2`` on calibration
inputs is kept. ``s = 1`` (plain rounding) is a candidate too, so the search never does worse than it on ``X``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AwqScales:
    scales: Tensor  # (in,): multiply the consumers' input channels by it, divide the producer's output by it
    ratio: float | None  # the grid's exponent chosen (None: plain rounding, s = 1, was best)
    error: float  # the chosen scales' output error, summed over the consumers (squared, on X)
    plain_error: float  # plain rounding's


def weight_magnitude(weights: list[Tensor], group: int | None = None) -> Tensor:
    """``(in,)``: each input channel's mean ``|w|``, every group of ``group`` weights along a row (None: the row)
    first divided by its largest ``|w|``, as the grid it is rounded on sees it."""
    rows = []
    for w in weights:
        a = w.float().abs()  # (out, in)
        g = group or a.shape[1]
        chunks = a.reshape(a.shape[0], -1, g)  # (out, in / g, g)
        rows.append((chunks / chunks.amax(-1, keepdim=True).clamp_min(1e-12)).reshape(a.shape))
    return torch.cat(rows).mean(0)  # (in,)


def output_error(X: Tensor, weights: list[Tensor], scales: Tensor, fake_quantize: Callable[[Tensor], Tensor]) -> float:
    """``sum_i ||X (Q(W_i s) / s)^T - X W_i^T||^2``: the consumers' output error with ``scales`` folded in."""
    total = 0.0
    for W in weights:
        Wq = fake_quantize(W.float() * scales) / scales  # (out, in): what the folded, rounded Linear computes
        total += float((X @ (Wq - W.float()).T).square().sum())  # (n, out)
    return total


def awq_search(
    X: Tensor, weights: list[Tensor], fake_quantize: Callable[[Tensor], Tensor], grid: int = 20, duo: bool = True,
    group: int | None = None,
) -> AwqScales:  # fmt: skip
    """The scales of least output error (see the module docstring). ``X: (n, in)`` calibration inputs of the
    consumers ``weights: [(out_i, in)]``; ``fake_quantize``: a weight matrix rounded on the grid it will be written
    in (quantized and dequantized), ``group`` that grid's group size (None: per channel)."""
    X = X.float()
    x_mean = X.abs().mean(0)  # (in,)
    w_mean = weight_magnitude(weights, group) if duo else None  # (in,)
    plain = output_error(X, weights, torch.ones_like(x_mean), fake_quantize)
    best = AwqScales(torch.ones_like(x_mean), None, plain, plain)
    for i in range(grid):
        ratio = i / grid
        s = x_mean.pow(ratio)
        if w_mean is not None:
            s = s / w_mean.pow(1 - ratio).clamp_min(1e-4)
        s = s.clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()  # (in,)
        error = output_error(X, weights, s, fake_quantize)
        if error < best.error:
            best = AwqScales(s, ratio, error, plain)
    return best
