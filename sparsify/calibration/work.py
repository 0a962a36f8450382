"""What the loop works with: the layer provider, one layer's work as a pass sees it, one run of a layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from sparsify.distributed import SINGLE, World
from sparsify.progress import NoProgress, Progress
from sparsify.statistics import InputStats

LayerCall = tuple[tuple[Any, ...], dict[str, Any]]  # positional args after hidden_states, kwargs
ERROR_WINDOWS = 2  # calibration windows on which output errors are measured


class LayerProvider(Protocol):
    """Hands the loop one layer at a time and takes it back when done."""

    def load(self, index: int) -> nn.Module: ...

    def finish(self, index: int, layer: nn.Module, write: bool, info: dict[str, Any] | None = None) -> None:
        """Done with layer ``index``; ``write``: save it (with ``info``, its report data)."""

    def round_to_storage(self, index: int, layer: nn.Module) -> None: ...

    def stored_bytes(self, index: int, name: str) -> tuple[int, torch.dtype] | None:
        """Layer ``index``'s tensor ``name`` (layer-relative) as it will be written: ``(bytes it takes as the
        input stores it, the dtype a tensor a pass adds beside it is written in)``; None: not known (in memory)."""

    def total_bytes(self) -> int | None:
        """Every tensor of the checkpoint read, as stored (None: in memory)."""


class InMemoryLayers:
    """Provider for a model already in memory: layers are used in place."""

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers

    def load(self, index: int) -> nn.Module:
        return self.layers[index]

    def finish(self, index: int, layer: nn.Module, write: bool, info: dict[str, Any] | None = None) -> None:
        pass

    def round_to_storage(self, index: int, layer: nn.Module) -> None:
        pass

    def stored_bytes(self, index: int, name: str) -> tuple[int, torch.dtype] | None:
        return None

    def total_bytes(self) -> int | None:
        return None


@dataclass
class RunOutput:
    records: list[Any] = field(default_factory=list)  # pass records, in order
    errors: dict[str, float] = field(default_factory=dict)  # fqn (a Linear or a layer) -> relative output error
    # the probe windows (token ids, hidden states) per batch, after every layer as it was before a recovery pass
    probe: list[tuple[Tensor, Tensor]] | None = None


@dataclass
class LayerWork:
    """What a pass sees of one layer: the module, its targets and their input statistics, its inputs."""

    index: int
    layer: nn.Module
    prefix: str  # the layer's fqn, e.g. "model.layers.3"
    targets: dict[str, nn.Module]  # fqn -> module
    stats: dict[str, InputStats]  # fqn -> statistics of its inputs (what the pass declared)
    inputs: list[Tensor]  # hidden states entering the layer, one tensor per calibration batch
    calls: list[LayerCall]  # the other arguments the backbone passes the layer, per batch
    # fqn -> the float weight (out, in) its output error is measured against: the layer's dense weights; a
    # pass that rewrites weights without changing the function (SmoothQuant's migration) updates them
    reference: dict[str, Tensor] = field(default_factory=dict)
    progress: Progress = field(default_factory=NoProgress)  # for a pass's own long loops (QAT steps)
    teacher: list[Tensor] | None = None  # per batch: the outputs a training pass fits (see Pass.teacher)
    world: World = SINGLE  # under torchrun: ``inputs`` are this rank's share (a pass reading them combines its sums)

    def run(self, inputs: list[Tensor] | None = None) -> list[Tensor]:
        """The layer's outputs on ``inputs`` (default: the calibration inputs), batch by batch."""
        return run_layer(self.layer, self.inputs if inputs is None else inputs, self.calls)

    def relative(self, fqn: str) -> str:
        return fqn.removeprefix(self.prefix + ".")


@dataclass
class ModelWork:
    """What a whole-model pass (distillation) sees: the model with every layer in memory, the calibration
    windows and the dense model's hidden states after its last layer on them (the teacher)."""

    model: nn.Module  # the causal LM, its head included
    layers: nn.ModuleList  # its decoder layers (what a pass trains)
    tokens: list[Tensor]  # calibration windows, per batch (B, L); under torchrun this rank's share
    teacher: list[Tensor]  # per batch: the dense model's hidden states after its last layer (B, L, d)
    device: torch.device
    progress: Progress = field(default_factory=NoProgress)
    world: World = SINGLE


def run_layer(layer: nn.Module, hidden: list[Tensor], calls: list[LayerCall]) -> list[Tensor]:
    """The layer's output hidden states, one tensor per batch of ``hidden`` (with that batch's arguments)."""
    outs = []
    for h, (args, kwargs) in zip(hidden, calls, strict=True):
        out = layer(h, *args, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs
