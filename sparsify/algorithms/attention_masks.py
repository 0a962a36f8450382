"""Attention patterns as boolean masks ``(q_len, kv_len)``: True where a query may attend a key.

Positions are absolute: query ``i`` sits at ``q_offset + i``, key ``j`` at ``j``. Windows follow
transformers/Mistral: a causal window ``w`` keeps the ``w`` most recent keys including the query's own
position (``q - w < k <= q``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _positions(q_len: int, kv_len: int, q_offset: int) -> tuple[Tensor, Tensor]:
    q = torch.arange(q_offset, q_offset + q_len).unsqueeze(1)  # (q, 1)
    k = torch.arange(kv_len).unsqueeze(0)  # (1, kv)
    return q, k


def causal_mask(q_len: int, kv_len: int | None = None, q_offset: int = 0) -> Tensor:
    q, k = _positions(q_len, kv_len or q_len + q_offset, q_offset)
    return k <= q


def sliding_window_mask(
    q_len: int, window: int, kv_len: int | None = None, q_offset: int = 0, sinks: int = 0
) -> Tensor:
    """Causal sliding window of ``window`` keys, plus the first ``sinks`` keys (StreamingLLM's attention sinks)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    q, k = _positions(q_len, kv_len or q_len + q_offset, q_offset)
    return (k <= q) & ((k > q - window) | (k < sinks))


def local_mask(length: int, window: int) -> Tensor:
    """Bidirectional (encoder) local attention: keys within ``window // 2`` positions either side."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    q, k = _positions(length, length, 0)
    return (q - k).abs() <= window // 2


def block_sparse_mask(
    length: int,
    block_size: int,
    global_blocks: int = 1,
    random_blocks: int = 0,
    causal: bool = True,
    seed: int = 0,
) -> Tensor:
    """BigBird-style block sparsity: each query block sees its own and neighbouring blocks, ``global_blocks``
    leading blocks (which also see everything), and ``random_blocks`` seeded random blocks."""
    if block_size < 1 or length % block_size:
        raise ValueError(f"block size {block_size} must divide the length {length}")
    n = length // block_size
    blocks = torch.zeros(n, n, dtype=torch.bool)  # (n, n) query block x key block
    idx = torch.arange(n)
    for d in (-1, 0, 1):
        ok = (idx + d >= 0) & (idx + d < n)
        blocks[idx[ok], idx[ok] + d] = True
    blocks[:, :global_blocks] = True
    blocks[:global_blocks, :] = True
    if random_blocks:
        g = torch.Generator().manual_seed(seed)
        for row in range(n):
            choices = torch.randperm(n, generator=g)[:random_blocks]
            blocks[row, choices] = True
    mask = blocks.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)  # (L, L)
    return mask & causal_mask(length) if causal else mask


def attention_fraction(mask: Tensor, causal: bool = True) -> float:
    """Attended (query, key) pairs relative to dense attention (causal or full) at this length."""
    q_len, kv_len = mask.shape
    dense = causal_mask(q_len, kv_len, kv_len - q_len) if causal else torch.ones_like(mask)
    return float(mask.sum()) / float(dense.sum())
