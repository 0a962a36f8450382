"""The ``sparsify`` attention function: a layer's pattern mask AND transformers' mask, then SDPA."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from sparsify.algorithms.attention_masks import LayerPattern, pattern_mask
from sparsify.runtime import CONFIG_KEY


@functools.lru_cache(maxsize=128)
def _mask(p: LayerPattern, q_len: int, kv_len: int, causal: bool, device: torch.device) -> Tensor:
    return pattern_mask(p, q_len, kv_len, causal).to(device)  # (q, kv)


def _layer_pattern(module: nn.Module) -> tuple[LayerPattern, bool]:
    spec = getattr(module.config, CONFIG_KEY)
    return LayerPattern(**spec["layers"][module.layer_idx]), bool(spec.get("causal", True))


def _select_columns(allowed: Tensor, kv_len: int, sinks: int) -> Tensor:
    """Transformers' mask spans every position seen; a bounded cache returned its sinks and the newest keys."""
    width = allowed.shape[-1]
    if width == kv_len:
        return allowed
    if width < kv_len:
        raise RuntimeError(f"attention mask covers {width} keys but the layer has {kv_len}")
    return torch.cat([allowed[..., :sinks], allowed[..., width - (kv_len - sinks) :]], dim=-1)


def _eager(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scaling: float, softcap: float | None):
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)  # (B, H, kv, D)
    scores = (query @ key.transpose(-1, -2)) * scaling  # (B, H, q, kv)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1, dtype=torch.float32).to(query.dtype)
    return (probs @ value).transpose(1, 2).contiguous(), None  # (B, q, H, D)


def sparsify_attention_forward(
    module: nn.Module,
    query: Tensor,  # (B, H, q, D)
    key: Tensor,  # (B, Hkv, kv, D)
    value: Tensor,  # (B, Hkv, kv, D)
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Transformers attention function: the layer's pattern mask AND the model's padding/causal mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    p, causal = _layer_pattern(module)
    softcap = kwargs.pop("softcap", None)
    kwargs.pop("sliding_window", None)  # a family's own window arrives through attention_mask already
    kwargs.pop("is_causal", None)  # causality is part of the pattern mask
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if p.pattern == "full" and not softcap:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal=causal, **kwargs
        )
    q_len, kv_len = query.shape[2], key.shape[2]
    mask = _mask(p, q_len, kv_len, causal, query.device)[None, None]  # (1, 1, q, kv)
    if attention_mask is not None:
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        mask = mask & _select_columns(allowed, kv_len, p.sinks)  # (B, 1, q, kv)
    mask = mask | ~mask.any(-1, keepdim=True)  # fully masked rows (padding queries) attend all: no NaN
    if softcap:
        return _eager(query, key, value, mask, scaling, softcap)
    return sdpa_attention_forward(module, query, key, value, mask, dropout, scaling, is_causal=False, **kwargs)
