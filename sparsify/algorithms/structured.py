"""Structured pruning maths: importance of FFN channels, attention head groups and whole layers.

Channels are the FFN's intermediate neurons; a neuron ``j`` is row ``j`` of each input projection
(gate/up, fc1) and column ``j`` of the output projection (down, fc2), whose input feature ``j`` is the
neuron's activation ``x_j``. A head group is one KV head with the query heads that share it (one head
under multi-head attention): rows of q/k/v, and a block of ``head_dim`` columns of the output projection.

- ``magnitude``: the squared weights of the channel's (group's) rows and columns (LLM-Pruner's element
  magnitude, Ma et al. 2023).
- ``wanda``: ``sum_i |W_out[i, j]| * ||x_j||`` (Wanda's score, Sun et al. 2024, summed over the channel).
- ``flap``: the fluctuation ``Var(x_j) * ||W_out[:, j]||^2`` (FLAP, An et al. 2024): a channel whose
  input barely varies carries information that a bias can replace — :func:`bias_compensation`.
- layers: ShortGPT's block influence ``1 - E[cos(h_in, h_out)]`` (Men et al. 2024) and the angular
  distance ``arccos(cos(h_l, h_{l+n})) / pi`` between a block of ``n`` layers' input and output
  (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def channel_scores(
    metric: str,
    W_in: list[Tensor],
    W_out: Tensor,
    sq_mean: Tensor | None = None,
    mean: Tensor | None = None,
) -> Tensor:
    """Importance of each of ``I`` channels, ``(I,)``, by a metric of :data:`CHANNEL_METRICS`.

    ``W_in``: the input projections, each ``(I, hidden)``; ``W_out``: the output projection ``(hidden, I)``;
    ``sq_mean``/``mean``: ``E[x_j^2]`` and ``E[x_j]`` of the output projection's inputs (data metrics).
    """
    if metric not in CHANNEL_METRICS:
        raise ValueError(f"unknown channel metric {metric!r}")
    return CHANNEL_METRICS[metric](W_in, W_out.float(), sq_mean, mean)


def magnitude_channels(W_in: list[Tensor], W_out: Tensor, sq_mean: Tensor | None, mean: Tensor | None) -> Tensor:
    """The squared weights of each channel's rows and column, ``(I,)``."""
    return sum(W.float().pow(2).sum(1) for W in W_in) + W_out.pow(2).sum(0)


def wanda_channels(W_in: list[Tensor], W_out: Tensor, sq_mean: Tensor | None, mean: Tensor | None) -> Tensor:
    """``sum_i |W_out[i, j]| * ||x_j||``, ``(I,)``."""
    if sq_mean is None:
        raise ValueError("metric wanda needs calibration statistics")
    return (W_out.abs() * sq_mean.float().clamp(min=0).sqrt()).sum(0)


def flap_channels(W_in: list[Tensor], W_out: Tensor, sq_mean: Tensor | None, mean: Tensor | None) -> Tensor:
    """FLAP's fluctuation ``Var(x_j) * ||W_out[:, j]||^2``, ``(I,)``."""
    if sq_mean is None:
        raise ValueError("metric flap needs calibration statistics")
    if mean is None:
        raise ValueError("metric flap needs the mean input")
    var = (sq_mean.float() - mean.float().pow(2)).clamp(min=0)  # (I,)
    return var * W_out.pow(2).sum(0)


ChannelMetric = Callable[[list[Tensor], Tensor, Tensor | None, Tensor | None], Tensor]
CHANNEL_METRICS: dict[str, ChannelMetric] = {  # name -> (W_in, W_out (float), sq_mean, mean) -> (I,)
    "magnitude": magnitude_channels,
    "wanda": wanda_channels,
    "flap": flap_channels,
}
LAYER_METRICS = ("block-influence", "angular")  # whole layers: see :func:`layers_to_remove`


def group_scores(channel: Tensor, group_size: int) -> Tensor:
    """Sum channel scores ``(G * group_size,)`` over consecutive groups: ``(G,)``."""
    return channel.reshape(-1, group_size).sum(1)


def keep_top(scores: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` highest scores, in ascending index order (the kept layout stays in order)."""
    if not 0 < keep <= scores.numel():
        raise ValueError(f"cannot keep {keep} of {scores.numel()}")
    return torch.topk(scores.float(), keep).indices.sort().values


def kept_width(width: int, ratio: float, multiple_of: int) -> int:
    """``width * (1 - ratio)`` rounded to the nearest multiple of ``multiple_of`` (at least one multiple, at most ``width``)."""
    target = width * (1.0 - ratio)
    rounded = round(target / multiple_of) * multiple_of
    return max(min(rounded, width), min(multiple_of, width))


def bias_compensation(W_out: Tensor, mean: Tensor, removed: Tensor) -> Tensor:
    """What the removed inputs contributed on average: ``W_out[:, removed] @ E[x_removed]``, ``(hidden,)``.

    Added to the output projection's bias it keeps the layer's mean output (exactly, for inputs that are
    constant over the calibration data).
    """
    return W_out.float()[:, removed] @ mean.float()[removed]


def refit_output(
    W_out: Tensor, H: Tensor, kept: Tensor, mean: Tensor | None = None, dampening: float = 1e-4
) -> tuple[Tensor, Tensor | None]:
    """The output projection over the kept inputs that best reproduces the full one on the calibration inputs.

    Least squares ``min E || W' x_kept (+ b) - W x ||^2`` with ``H = E[x x^T]: (n, n)``: ``W' = W H[:, k]
    H[k, k]^-1`` (dampened by ``dampening * mean(diag H[k, k])``), so what the removed inputs carried is moved
    onto the kept ones they correlate with (the structured counterpart of SparseGPT's update; SlimGPT,
    Ling et al. 2024, ZipLM, Kurtic et al. 2023). With ``mean = E[x]: (n,)`` a constant input joins the fit
    and its weight ``b: (out,)`` is returned (the bias compensation, fitted jointly). ``W_out: (out, n)``;
    returns ``(W': (out, k), b or None)``.
    """
    W = W_out.double()
    H = H.double()
    k = kept.numel()
    G = H[kept][:, kept].clone()  # (k, k)
    rhs = W @ H[:, kept]  # (out, k)
    if mean is not None:
        m = mean.double()
        G = torch.cat([torch.cat([G, m[kept, None]], 1), torch.cat([m[kept], m.new_ones(1)])[None]], 0)  # (k+1, k+1)
        rhs = torch.cat([rhs, (W @ m)[:, None]], 1)  # (out, k+1)
    G.diagonal()[:k] += dampening * H[kept, kept].mean()
    L, info = torch.linalg.cholesky_ex(G)
    if info:
        raise ValueError("the calibration Hessian of the kept inputs is not positive definite; increase dampening")
    sol = torch.cholesky_solve(rhs.T, L).T  # (out, k[+1])
    dtype = W_out.dtype if W_out.is_floating_point() else torch.float32
    if mean is None:
        return sol.to(dtype), None
    return sol[:, :k].to(dtype), sol[:, k].to(dtype)


def block_influence(h_in: Tensor, h_out: Tensor, mean: Callable[[Tensor], Tensor] = torch.mean) -> float:
    """ShortGPT's BI of a layer: ``1 - mean_t cos(h_in_t, h_out_t)``; ``h: (tokens, hidden)``. ``mean`` of the
    per-token values (data-parallel: over every process's tokens)."""
    return float(1.0 - mean(torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)))


def angular_distance(h_a: Tensor, h_b: Tensor, mean: Callable[[Tensor], Tensor] = torch.mean) -> float:
    """Mean angular distance ``arccos(cos(h_a, h_b)) / pi`` over tokens; ``h: (tokens, hidden)``."""
    cos = torch.nn.functional.cosine_similarity(h_a.float(), h_b.float(), dim=-1).clamp(-1.0, 1.0)
    return float(mean(torch.arccos(cos)) / math.pi)


def layers_to_remove(metric: str, scores: list[float], n: int) -> list[int]:
    """``block-influence``: the ``n`` layers of least influence (``scores[l]`` = BI of layer ``l``).
    ``angular``: the block of ``n`` consecutive layers starting where ``scores[l]`` (the distance between
    layer ``l``'s input and layer ``l + n - 1``'s output) is smallest."""
    if metric == "block-influence":
        return sorted(sorted(range(len(scores)), key=lambda i: scores[i])[:n])
    if metric == "angular":
        start = min(range(len(scores)), key=lambda i: scores[i])
        return list(range(start, start + n))
    raise ValueError(f"unknown layer metric {metric!r}")
