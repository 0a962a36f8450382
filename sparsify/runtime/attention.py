"""The ``sparsify`` attention function: a layer's pattern mask AND transformers' mask, then SDPA;
:func:`register` makes it transformers' ``attn_implementation="sparsify"``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from sparsify.algorithms.attention_masks import LayerPattern, Rule, pattern_mask, pattern_rule, window_rule
from sparsify.runtime.format import CONFIG_KEY, IMPLEMENTATION

FLEX_MIN_QUERIES = 128  # on CUDA, inputs this long use flex_attention block masks; decoding steps use SDPA


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
    allowed = None
    if attention_mask is not None:
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        allowed = _select_columns(allowed, kv_len, p.sinks)  # (B, 1, q, kv)
    if query.is_cuda and q_len >= FLEX_MIN_QUERIES and not softcap and not dropout:
        rule = pattern_rule(p, q_len, kv_len, causal)
        return _flex(query, key, value, rule, kv_len - q_len, allowed, scaling, compiled=True)
    if p.evicts and q_len >= 2 * _chunk(p):
        return _banded(module, query, key, value, allowed, p, dropout, scaling, softcap, kwargs)
    mask = _mask(p, q_len, kv_len, causal, query.device)[None, None]  # (1, 1, q, kv)
    return _attend(module, query, key, value, mask, allowed, dropout, scaling, softcap, kwargs)


def _attend(module, query, key, value, mask, allowed, dropout, scaling, softcap, kwargs) -> tuple[Tensor, None]:
    if allowed is not None:
        mask = mask & allowed  # (B, 1, q, kv)
    mask = mask | ~mask.any(-1, keepdim=True)  # fully masked rows (padding queries) attend all: no NaN
    if softcap:
        return _eager(query, key, value, mask, scaling, softcap)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, mask, dropout, scaling, is_causal=False, **kwargs)


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(
    query: Tensor,  # (B, H, q, D)
    key: Tensor,  # (B, Hkv, kv, D)
    value: Tensor,
    rule: Rule,
    offset: int,
    allowed: Tensor | None,  # (B, 1, q, kv)
    scaling: float,
    compiled: bool,
) -> tuple[Tensor, None]:
    """The pattern's rule as a flex_attention block mask: key blocks a query block cannot see are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q_len, kv_len = query.shape[2], key.shape[2]
    if allowed is None:

        def mask_mod(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            return rule(qi + offset, ki)

    else:
        pad = allowed[:, 0]  # (B, q, kv)

        def mask_mod(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            return rule(qi + offset, ki) & pad[b, qi, ki]

    batch = None if allowed is None else query.shape[0]
    block_mask = create_block_mask(mask_mod, batch, None, q_len, kv_len, device=query.device)
    attend = _compiled_flex() if compiled else flex_attention
    out = attend(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None  # (B, q, H, D)


def _chunk(p: LayerPattern) -> int:
    return max(int(p.window or 0), 64)


def _banded(module, query, key, value, allowed, p, dropout, scaling, softcap, kwargs) -> tuple[Tensor, None]:
    """A windowed layer over a long input, one chunk of queries at a time against only the keys it can see
    (its sinks and the band ``window - 1`` before it): attention work and mask memory grow linearly."""
    q_len, kv_len = query.shape[2], key.shape[2]
    offset = kv_len - q_len  # queries are the last q_len positions
    window, chunk = int(p.window or 0), _chunk(p)
    rule = window_rule(window, p.sinks)
    outputs = []
    for start in range(0, q_len, chunk):
        end = min(start + chunk, q_len)
        first = max(offset + start - window + 1, 0)  # earliest key in the band
        keys = torch.cat([torch.arange(min(p.sinks, first)), torch.arange(first, offset + end)])  # (n,)
        queries = torch.arange(offset + start, offset + end).unsqueeze(1)  # (c, 1)
        mask = rule(queries, keys.unsqueeze(0)).to(query.device)[None, None]  # (1, 1, c, n)
        keys = keys.to(key.device)
        rows = allowed[:, :, start:end][..., keys] if allowed is not None else None
        out, _ = _attend(
            module,
            query[:, :, start:end],
            key[:, :, keys],
            value[:, :, keys],
            mask,
            rows,
            dropout,
            scaling,
            softcap,
            kwargs,
        )
        outputs.append(out)  # (B, c, H, D)
    return torch.cat(outputs, dim=1), None  # (B, q, H, D)


def register() -> None:
    """Make ``attn_implementation="sparsify"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, sparsify_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)
