"""Step 1: what enters every layer, recorded by running the model's own backbone with a recorder in each
layer's place (it stores the hidden states and whatever else the backbone passes a layer: position
embeddings, masks, and returns the hidden states unchanged). No exception stops the forward; nothing is
architecture-specific."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sparsify.calibration.work import ERROR_WINDOWS, LayerCall


@dataclass
class Captured:
    hidden: list[Tensor]  # what enters layer 0, one tensor per batch
    calls: list[list[LayerCall]]  # per layer, per batch: the other arguments the backbone passes it


class _InputRecorder(nn.Module):
    """Stands in for layer ``index`` during the embedding forward; records its inputs."""

    def __init__(self, index: int, store: Captured):
        super().__init__()
        self.index, self.store = index, store

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.index == 0:
            self.store.hidden.append(hidden)
        self.store.calls[self.index].append((tuple(args[1:]), kwargs))
        return hidden


def calibration_batches(tokens: Tensor | None, batch_size: int) -> list[Tensor]:
    """``tokens: (samples, seq_len)`` in batches; the first holds ``ERROR_WINDOWS`` windows, as output errors
    are measured on it alone. No tokens: no batches."""
    if tokens is None:
        return []
    head, rest = tokens[:ERROR_WINDOWS], tokens[ERROR_WINDOWS:]
    return [head, *rest.split(batch_size)] if rest.numel() else [head]


def batch_count(samples: int, batch_size: int) -> int:
    """How many batches :func:`calibration_batches` cuts ``samples`` windows into (known before any is sampled)."""
    return 1 + -(-max(0, samples - ERROR_WINDOWS) // batch_size)


@torch.no_grad()
def capture_inputs(backbone: nn.Module, layers: nn.ModuleList, batches: list[Tensor], device: torch.device) -> Captured:
    """Every layer's inputs on ``batches``; ``layers`` (the backbone's own list) is restored whatever happens."""
    store = Captured(hidden=[], calls=[[] for _ in layers])
    originals = list(layers)
    try:
        for i in range(len(originals)):
            layers[i] = _InputRecorder(i, store)
        for batch in batches:
            backbone(input_ids=batch.to(device), use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return store
