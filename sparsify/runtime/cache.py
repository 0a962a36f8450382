"""Bounded decoding cache for windowed layers (sliding window, StreamingLLM sinks)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from sparsify.runtime.format import patterns_from_config


class WindowCacheLayer(DynamicLayer):
    """Decoding cache of a windowed layer: the first ``sinks`` keys and the last ``window - 1``, nothing else.

    ``update`` returns the kept keys plus the new ones (what the new queries may see); memory stays at
    ``sinks + window - 1`` keys however long the generation runs.
    """

    is_sliding = False  # transformers sizes its mask on a non-sliding layer; ours spans every position seen
    is_croppable = False

    def __init__(self, window: int, sinks: int = 0) -> None:
        super().__init__()
        self.window, self.sinks = window, sinks
        self.cumulative_length = 0

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)  # (B, Hkv, kept + new, D)
        values = torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values = self._keep(keys), self._keep(values)
        return keys, values

    def _keep(self, states: Tensor) -> Tensor:
        recent = self.window - 1
        if states.shape[-2] <= self.sinks + recent:
            return states
        tail = states[..., states.shape[-2] - recent :, :] if recent else states[..., :0, :]
        return torch.cat([states[..., : self.sinks, :], tail], dim=-2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sinks + self.window - 1


class BoundedCache(DynamicCache):
    """A ``DynamicCache`` whose windowed layers are :class:`WindowCacheLayer`."""

    def __init__(self, layers: list[DynamicLayer]) -> None:
        Cache.__init__(self, layers=layers)


def bounded_cache(model: nn.Module) -> BoundedCache:
    """A cache for ``model.generate(cache=...)``: bounded for windowed layers, growing for the others."""
    patterns, _ = patterns_from_config(model.config)
    return BoundedCache(
        [WindowCacheLayer(int(p.window or 0), p.sinks) if p.evicts else DynamicLayer() for p in patterns]
    )
