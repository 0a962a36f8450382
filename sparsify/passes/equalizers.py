"""Equalizers: per-channel scales moved from the Linears' inputs into their producer before rounding, the float
model unchanged (``x W^T = (x / s)(W s)^T``). A quantize step's ``smoothquant:`` or ``awq:`` key turns one on;
each is an entry here, its maths in :mod:`sparsify.algorithms`, imported when it runs (the table loads without
torch)::

    @equalizer("mine", title="My scales", needs={"abs_max"})
    def _mine(pair, config):  # pair.weights: the consumers' (out_i, in); -> (s (in,), report info)
        ...

The pairs are the family table's (:mod:`sparsify.arch`): ``norm_feeds`` (a norm and the Linears it feeds:
SmoothQuant's and AWQ's) and, for equalizers with ``linear_pairs``, ``linear_feeds`` (a Linear whose outputs are
another's inputs channel for channel: ``v_proj -> o_proj`` without grouped KV heads, ``up_proj -> down_proj``).
The producer's output is divided by ``s`` (a norm's weight and bias, a Linear's rows and bias), the consumers'
input columns multiplied by it. Papers: SmoothQuant (arXiv:2211.10438), AWQ (arXiv:2306.00978).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import Tensor, nn

    from sparsify.arch import Arch


@dataclass
class Pair:
    """One producer and the Linears it feeds, in a layer, with what the equalizer reads."""

    producer: str  # relative to the layer
    kind: Literal["norm", "linear"]
    consumers: tuple[str, ...]  # relative to the layer
    weights: list[Tensor] = field(default_factory=list)  # the consumers' (out_i, in), float
    stats: dict[str, Tensor] = field(default_factory=dict)  # the first consumer's input statistics (shared input)
    fake_quantize: Callable[[Tensor], Tensor] | None = None  # a weight rounded on its grid and dequantized
    group: int | None = None  # that grid's group size (None: per channel)


ScaleFn = Callable[[Pair, Any], "tuple[Tensor, dict[str, Any]]"]


@dataclass(frozen=True)
class Equalizer:
    name: str  # also the quantize config's key that turns it on (its settings)
    title: str
    needs: frozenset[str]  # statistics of the consumers' inputs (sparsify.statistics.STATS)
    samples: bool  # reads a sample of the consumers' input rows
    linear_pairs: bool  # also Linear -> Linear pairs (linear_feeds)
    scales: ScaleFn


EQUALIZERS: dict[str, Equalizer] = {}


def equalizer(
    name: str, title: str, needs: set[str] | frozenset[str] = frozenset(), samples: bool = False,
    linear_pairs: bool = False,
) -> Callable[[ScaleFn], ScaleFn]:  # fmt: skip
    """Register an equalizer under ``name`` (the quantize config key that turns it on)."""

    def add(fn: ScaleFn) -> ScaleFn:
        if name in EQUALIZERS:
            raise ValueError(f"equalizer {name!r} is registered twice")
        EQUALIZERS[name] = Equalizer(name, title, frozenset(needs), samples, linear_pairs, fn)
        return fn

    return add


@equalizer("smoothquant", title="SmoothQuant", needs={"abs_max"})
def _smoothquant(pair: Pair, config: Any) -> tuple[Tensor, dict[str, Any]]:
    from sparsify.algorithms.smoothquant import smoothing_scales

    return smoothing_scales(pair.stats["abs_max"], pair.weights, config.smoothquant), {}  # (in,)


@equalizer("awq", title="AWQ", samples=True, linear_pairs=True)
def _awq(pair: Pair, config: Any) -> tuple[Tensor, dict[str, Any]]:
    from sparsify.algorithms.awq import awq_search

    assert pair.fake_quantize is not None
    c = config.awq
    found = awq_search(pair.stats["sample"], pair.weights, pair.fake_quantize, c.grid, c.duo_scaling, pair.group)
    info = {"ratio": found.ratio, "error": found.error, "plain_error": found.plain_error}
    return found.scales, info  # (in,)


def pairs(arch: Arch, linear_pairs: bool) -> list[Pair]:
    """The producer/consumer pairs of a layer of this family, in data-flow order."""
    out = [Pair(norm, "norm", fed) for norm, fed in arch.norm_feeds]
    if linear_pairs:
        out += [Pair(linear, "linear", fed) for linear, fed in arch.linear_feeds]
    return out


def fits(layer: nn.Module, pair: Pair) -> bool:
    """Whether a Linear producer's outputs are its consumers' inputs channel for channel (not with grouped KV
    heads, where ``v_proj``'s outputs are repeated across heads)."""
    if pair.kind == "norm":
        return True
    width = layer.get_submodule(pair.producer).weight.shape[0]
    return all(layer.get_submodule(c).weight.shape[1] == width for c in pair.consumers)


def fold(layer: nn.Module, pair: Pair, s: Tensor, norm_offset: float = 0.0) -> None:
    """Divide the producer's output by ``s: (in,)`` and multiply the consumers' input columns by it, in place."""
    import torch

    from sparsify.algorithms.smoothquant import smooth_norm, smooth_weights

    with torch.no_grad():
        producer = layer.get_submodule(pair.producer)
        bias = getattr(producer, "bias", None)
        if pair.kind == "norm":
            weight, new_bias = smooth_norm(producer.weight, bias, s, norm_offset)  # (in,): output / s
        else:
            inv = (1.0 / s.float())[:, None]  # (out of the producer = in of the consumers, 1)
            weight = (producer.weight.float() * inv).to(producer.weight.dtype)  # rows / s
            new_bias = (bias.float() / s.float()).to(bias.dtype) if bias is not None else None
        producer.weight.copy_(weight)
        if bias is not None and new_bias is not None:
            bias.copy_(new_bias)
        for name in pair.consumers:
            m = layer.get_submodule(name)
            m.weight.copy_(smooth_weights(m.weight, s))  # (out, in) * (in,)
