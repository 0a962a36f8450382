"""Module-level helpers: which modules are prunable Linears and how to read/write their weights."""

from __future__ import annotations

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


def in_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[1]
