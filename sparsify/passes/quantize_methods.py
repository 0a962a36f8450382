"""Quantization schemes and weight-rounding methods by name: a quantize step's ``scheme:`` is a key of
:data:`SCHEMES`, its ``method:`` a key of :data:`QUANTIZE_METHODS`.

A method is what it reads of each target's inputs plus one function that rounds one weight matrix; the
maths lives in :mod:`sparsify.algorithms`, imported by each function when it runs (the tables and the config
load without torch: ``sparsify -h``). A new method is a file there and one entry here (the config's choices, the
CLI's ``--method`` and the docs' contract test follow)::

    @quantize_method("mine", title="My rounding", needs={"hessian"})
    def _mine(W, H, args, mask, options):  # W: (out, in) -> Rounded(q, scale, zero_point, weight)
        ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the functions import the maths when they run: the tables and the config load without torch
    import torch
    from torch import Tensor

    from sparsify.algorithms.quant import QuantArgs
    from sparsify.runtime.quantized import Activations


@dataclass(frozen=True)
class Scheme:
    bits: int  # weight bits
    activations: Activations  # None: weight-only; "dynamic": int8 per token; "static": one calibrated scale


SCHEMES: dict[str, Scheme] = {
    "w8a8": Scheme(8, "dynamic"),
    "w8a8-static": Scheme(8, "static"),
    "w4a16": Scheme(4, None),
    "w8a16": Scheme(8, None),
}


class RoundingOptions(Protocol):
    """The quantize config's settings a method may read (:class:`~sparsify.passes.quantize.QuantizeConfig`)."""

    blocksize: int
    dampening: float
    weight_observer: str

    @property
    def gptq_act_order(self) -> bool: ...


@dataclass(frozen=True)
class Rounded:
    q: Tensor  # (out, in) integers
    scale: Tensor
    zero_point: Tensor
    weight: Tensor  # (out, in) float: dequantize(q, scale, zero_point)


RoundFn = Callable[["Tensor", "Tensor | None", "QuantArgs", "Tensor", RoundingOptions], "Rounded"]


@dataclass(frozen=True)
class QuantizeMethod:
    name: str
    title: str  # how reports name it
    needs: frozenset[str]  # the statistics it reads of each target's inputs (empty: data-free)
    options: tuple[str, ...]  # config keys only this method reads (refused with another method)
    round: RoundFn  # (W: (out, in), H: (in, in) or None, args, mask: (out, in) kept, options) -> Rounded


QUANTIZE_METHODS: dict[str, QuantizeMethod] = {}  # in the order the docs and the CLI list them


def quantize_method(
    name: str, title: str, needs: set[str] | frozenset[str] = frozenset(), options: tuple[str, ...] = ()
) -> Callable[[RoundFn], RoundFn]:
    """Register a weight-rounding method under ``name`` (the YAML ``method:``)."""

    def add(fn: RoundFn) -> RoundFn:
        if name in QUANTIZE_METHODS:
            raise ValueError(f"quantize method {name!r} is registered twice")
        QUANTIZE_METHODS[name] = QuantizeMethod(name, title, frozenset(needs), options, fn)
        return fn

    return add


def expand_zero_point(zp: Tensor, shape: torch.Size, args: QuantArgs) -> Tensor:
    """A per-channel or per-group zero point broadcast to the weight's ``(out, in)``."""
    from sparsify.algorithms.quant import PerGroup

    if isinstance(args.granularity, PerGroup):
        return zp.repeat_interleave(args.granularity.size, dim=1)
    return zp.expand(shape)


@quantize_method("rtn", title="round-to-nearest")
def _rtn(W: Tensor, H: Tensor | None, args: QuantArgs, mask: Tensor, options: RoundingOptions) -> Rounded:
    import torch

    from sparsify.algorithms.quant import dequantize, observe, qparams, quantize

    importance = H.diagonal() if H is not None else None  # (in,): each input's mean square, when calibrated
    scale, zp = qparams(*observe(W, args, options.weight_observer, importance=importance), args)  # type: ignore[arg-type]
    q = torch.where(mask, quantize(W, scale, zp, args), expand_zero_point(zp, W.shape, args))  # zp decodes to 0
    return Rounded(q, scale, zp, dequantize(q, scale, zp, args))


@quantize_method("gptq", title="GPTQ", needs={"hessian"}, options=("act_order", "dampening", "blocksize"))
def _gptq(W: Tensor, H: Tensor | None, args: QuantArgs, mask: Tensor, options: RoundingOptions) -> Rounded:
    from sparsify.algorithms.gptq import gptq_quantize

    assert H is not None
    res = gptq_quantize(
        W,
        H,
        args,
        options.blocksize,
        options.dampening,
        options.gptq_act_order,
        mask=mask,
        observer=options.weight_observer,  # type: ignore[arg-type]
    )
    return Rounded(res.q, res.scale, res.zero_point, res.weight)
