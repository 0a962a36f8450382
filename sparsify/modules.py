"""Module-level helpers: which modules are prunable Linears and how to read/write their weights; a model's
layers replayed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D`` (a Linear with its weight stored as ``(in, out)``)."""
    return isinstance(module, (nn.Linear, Conv1D))


def weight_matrix(module: nn.Module) -> Tensor:
    """The weight as ``(out, in)``, whatever the layout it is stored in."""
    W = module.weight
    return W.t() if isinstance(module, Conv1D) else W


@torch.no_grad()
def set_weight_matrix(module: nn.Module, W: Tensor) -> None:
    """Write ``W: (out, in)`` back into the module's own layout and dtype."""
    stored = module.weight
    stored.copy_((W.t() if isinstance(module, Conv1D) else W).to(stored.dtype))


def effective_weight(module: nn.Module) -> Tensor | None:
    """The ``(out, in)`` matrix a Linear-like module computes with (a quantized Linear's dequantized
    weight), or None for any other module."""
    if is_linear(module):
        return weight_matrix(module)
    dense = getattr(module, "dense_weight", None)
    return dense() if callable(dense) else None


def in_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[1]


def out_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[0]


@torch.no_grad()
def keep_outputs(module: nn.Module, idx: Tensor) -> None:
    """Keep only output features ``idx`` of a Linear (or Conv1D): its weight rows and bias entries."""
    if isinstance(module, Conv1D):
        module.weight = nn.Parameter(module.weight[:, idx].contiguous(), requires_grad=False)  # (in, out)
        module.nf = len(idx)
    else:
        module.weight = nn.Parameter(module.weight[idx].contiguous(), requires_grad=False)  # (out, in)
        module.out_features = len(idx)
    if getattr(module, "bias", None) is not None:
        module.bias = nn.Parameter(module.bias[idx].contiguous(), requires_grad=False)


@torch.no_grad()
def keep_inputs(module: nn.Module, idx: Tensor) -> None:
    """Keep only input features ``idx`` of a Linear (or Conv1D): its weight columns."""
    if isinstance(module, Conv1D):
        module.weight = nn.Parameter(module.weight[idx].contiguous(), requires_grad=False)  # (in, out)
    else:
        module.weight = nn.Parameter(module.weight[:, idx].contiguous(), requires_grad=False)
        module.in_features = len(idx)


@torch.no_grad()
def add_to_bias(module: nn.Module, delta: Tensor | None = None) -> None:
    """Add ``delta`` (``(out,)``) to the bias, creating a zero bias first if the module has none."""
    if getattr(module, "bias", None) is None:
        weight = module.weight
        module.bias = nn.Parameter(
            torch.zeros(out_features(module), dtype=weight.dtype, device=weight.device), requires_grad=False
        )
    if delta is not None:
        module.bias.add_(delta.to(module.bias.dtype))


def replace_module(layer: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name`` (relative to ``layer``) in place of what was there."""
    parent, _, attr = name.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, attr, new)


class _Replay(nn.Module):
    """Stands in for a decoder layer: passes its input on, or (the last layer) gives ``states.pop(0)``."""

    def __init__(self, states: list[Tensor] | None):
        super().__init__()
        self.states = states

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden if self.states is None else self.states.pop(0)


@contextlib.contextmanager
def replaying(layers: nn.ModuleList, states: list[Tensor]) -> Iterator[None]:
    """Within: the model's decoder layers (``layers``, restored after) are stood in for by a replay, the last one
    giving ``states.pop(0)`` at each forward: the model computes its outputs from those hidden states."""
    originals = list(layers)
    try:
        for i in range(len(originals)):
            layers[i] = _Replay(states if i == len(originals) - 1 else None)
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
