"""The layers of a checkpoint, one at a time: read when the loop needs one, saved when it is done.

Layer ``i`` of the model may be layer ``source_index[i]`` of the checkpoint (after layers were removed).
Tensors are saved under the output model's names, in their stored precision.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsify.checkpoint.skeleton import KeyMap, materialize, release
from sparsify.checkpoint.source import TensorInfo, TensorSource
from sparsify.checkpoint.writer import LayerFiles


class LazyLayers:
    """Provider that reads each layer from the checkpoint and, when the loop is done with it, saves it.

    Layer ``i`` of the model may be layer ``source_index[i]`` of the checkpoint (after layers were
    removed). Tensors are saved under the output model's names, in their stored precision: a tensor no
    pass changed is written from the input as it was stored (a float32 model calibrated in bfloat16
    keeps its float32 norms and kept weights); changed and reshaped values in the stored dtype; a tensor
    a pass added (a bias) in the layer's floating dtype.
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        layers_path: str,
        source: TensorSource,
        keymap: KeyMap,
        store: LayerFiles | None,
        dtype: torch.dtype,
        device: torch.device,
        source_index: list[int] | None = None,
    ):
        self.layers, self.layers_path = layers, layers_path
        self.source, self.keymap, self.store = source, keymap, store
        self.dtype, self.device = dtype, device
        self.source_index = source_index or list(range(len(layers)))
        # layer index -> layer-relative name -> stored dtype, for each loaded layer (a whole-model pass holds them all)
        self.stored: dict[int, dict[str, torch.dtype]] = {}

    def _source_key(self, index: int, name: str) -> str | None:
        return self.keymap.to_ckpt.get(f"{self.layers_path}.{self.source_index[index]}.{name}")

    def load(self, index: int) -> nn.Module:
        layer = self.layers[index]
        names = [n for n, _ in layer.named_parameters()]
        prefix = f"{self.layers_path}.{self.source_index[index]}"
        stored = materialize(layer, prefix, names, self.source, self.keymap, self.dtype, self.device)
        self.stored[index] = {name: t.dtype for name, t in stored.items()}
        return layer

    def stored_bytes(self, index: int, name: str) -> tuple[int, torch.dtype] | None:
        """See :meth:`sparsify.calibration.work.LayerProvider.stored_bytes`: a tensor added beside ``name``
        (a quantized weight's scales) is written in ``name``'s stored dtype, the layer's usual one."""
        key = self._source_key(index, name)
        if key is None:
            return None
        info = self.source.info(key)
        return info.nbytes, info.dtype

    def total_bytes(self) -> int:
        """Every tensor of the checkpoint the layers are read from, as stored."""
        return sum(self.source.info(k).nbytes for k in self.source.keys())

    def _storage_dtype(self, index: int, name: str, value: torch.Tensor) -> torch.dtype:
        stored = self.stored.get(index, {})
        if name in stored and stored[name].is_floating_point == value.is_floating_point():
            return stored[name]  # (a float weight a pass turned into integers keeps its integer dtype)
        floats = [d for d in stored.values() if d.is_floating_point]
        return max(set(floats), key=floats.count) if value.is_floating_point() and floats else value.dtype

    @torch.no_grad()
    def round_to_storage(self, index: int, layer: nn.Module) -> None:
        """Make the weights the loop propagates with exactly the ones that will be saved."""
        for name, p in layer.named_parameters():
            stored = self._storage_dtype(index, name, p)
            if p.is_floating_point() and stored != p.dtype:
                p.copy_(p.to(stored).to(p.dtype))

    def finish(self, index: int, layer: nn.Module, write: bool, info: dict[str, Any] | None = None) -> None:
        if write and self.store is not None:
            params = [(name, p.detach().cpu()) for name, p in layer.named_parameters()]
            out = {
                name: self.keymap.output_key(f"{self.layers_path}.{index}.{checkpoint_name(layer, name)}")
                for name, _ in params
            }
            entries = [
                (out[name], TensorInfo(self._storage_dtype(index, name, p), tuple(p.shape))) for name, p in params
            ]
            tensors = ((out[name], self._stored_value(index, name, p)) for name, p in params)
            self.store.save(index, entries, tensors, info or {})
        self.stored.pop(index, None)
        release(layer)

    def _stored_value(self, index: int, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` in its storage dtype, taking the stored bits wherever no pass changed a value."""
        dtype = self._storage_dtype(index, name, value)
        key = self._source_key(index, name)
        if key is None or self.source.info(key).shape != tuple(value.shape):
            return value.to(dtype)  # added or reshaped by a pass
        if value.dtype == dtype or not value.is_floating_point():
            return value.to(dtype)
        original = self.source.get_many([key])[key]
        untouched = value == original.to(value.dtype)  # the compute copy is the stored value, rounded
        return torch.where(untouched, original, value.to(dtype))


def checkpoint_name(layer: nn.Module, name: str) -> str:
    """The checkpoint name of parameter ``name`` of ``layer``: a module that declares a ``checkpoint_prefix``
    (an MoE block written in its family's published layout, e.g. Mixtral's ``block_sparse_moe``) is written
    under that prefix instead of its own path."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = getattr(layer.get_submodule(".".join(parts[:i])), "checkpoint_prefix", None)
        if prefix:
            return ".".join([prefix, *parts[i:]])
    return name
