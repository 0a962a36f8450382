"""Attention patterns as boolean masks ``(q_len, kv_len)``: True where a query may attend a key.

Positions are absolute: query ``i`` sits at ``q_offset + i``, key ``j`` at ``j``. Windows follow
transformers/Mistral: a causal window ``w`` keeps the ``w`` most recent keys including the query's own
position (``q - w < k <= q``).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def local_mask(q_len: int, window: int, kv_len: int | None = None, q_offset: int = 0) -> Tensor:
    """Bidirectional (encoder) local attention: keys within ``window // 2`` positions either side."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    q, k = _positions(q_len, kv_len or q_len + q_offset, q_offset)
    return (q - k).abs() <= window // 2


def block_sparse_mask(
    q_len: int,
    block_size: int,
    kv_len: int | None = None,
    q_offset: int = 0,
    global_blocks: int = 1,
    random_blocks: int = 0,
    causal: bool = True,
    seed: int = 0,
) -> Tensor:
    """BigBird-style block sparsity over blocks of ``block_size`` positions (the last one may be partial).

    Each query block sees its own and the neighbouring key blocks, the ``global_blocks`` leading blocks (whose
    queries also see everything), and ``random_blocks`` random key blocks drawn per query block from ``seed`` and
    the block index alone, so a prefix of the input gets the same choices as the whole (decoding equals the full
    forward). Causal models draw only among blocks at or before the query's block.
    """
    if block_size < 1:
        raise ValueError(f"block size must be >= 1, got {block_size}")
    kv_len = kv_len or q_len + q_offset
    q, k = _positions(q_len, kv_len, q_offset)
    qb, kb = q // block_size, k // block_size  # (q, 1), (1, kv) block indices
    mask = ((qb - kb).abs() <= 1) | (kb < global_blocks) | (qb < global_blocks)  # (q, kv)
    if random_blocks:
        n_kv = -(-kv_len // block_size)
        table = torch.zeros(int(qb.max()) + 1, n_kv, dtype=torch.bool)  # (query blocks, key blocks)
        for b in range(int(qb.min()), int(qb.max()) + 1):
            table[b, random_block_choices(b, n_kv, random_blocks, causal, seed)] = True
        mask |= table[qb.squeeze(1)].repeat_interleave(block_size, 1)[:, :kv_len]  # (q, kv)
    return mask & (k <= q) if causal else mask


def random_block_choices(query_block: int, key_blocks: int, count: int, causal: bool, seed: int) -> Tensor:
    """The random key blocks of one query block: a function of ``seed`` and the block index only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + query_block)
    pool = min(query_block + 1, key_blocks) if causal else key_blocks
    return torch.randperm(pool, generator=g)[:count]


def attention_fraction(mask: Tensor, causal: bool = True) -> float:
    """Attended (query, key) pairs relative to dense attention (causal or full) at this length."""
    q_len, kv_len = mask.shape
    dense = causal_mask(q_len, kv_len, kv_len - q_len) if causal else torch.ones_like(mask)
    return float(mask.sum()) / float(dense.sum())


PATTERNS = ("full", "sliding-window", "sinks", "local", "block-sparse")


@dataclass(frozen=True)
class LayerPattern:
    """One layer's attention pattern, as stored in a checkpoint's config (``sparsify_attention.layers``)."""

    pattern: str = "full"
    window: int | None = None
    sinks: int = 0
    block_size: int | None = None
    global_blocks: int = 0
    random_blocks: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown attention pattern {self.pattern!r}; known: {', '.join(PATTERNS)}")
        if self.pattern in ("sliding-window", "sinks", "local") and (self.window or 0) < 1:
            raise ValueError(f"pattern {self.pattern} needs window >= 1, got {self.window}")
        if self.pattern == "block-sparse" and (self.block_size or 0) < 1:
            raise ValueError(f"pattern block-sparse needs block_size >= 1, got {self.block_size}")

    @property
    def evicts(self) -> bool:
        """Whether decoding can drop keys for good (a bounded cache of ``sinks + window - 1`` keys)."""
        return self.pattern in ("sliding-window", "sinks")


def pattern_mask(p: LayerPattern, q_len: int, kv_len: int | None = None, causal: bool = True) -> Tensor:
    """The ``(q_len, kv_len)`` mask of pattern ``p``, queries being the last ``q_len`` of ``kv_len`` positions."""
    kv_len = kv_len or q_len
    offset = kv_len - q_len
    if p.pattern in ("sliding-window", "sinks"):
        return sliding_window_mask(q_len, int(p.window or 0), kv_len, offset, sinks=p.sinks)
    if p.pattern == "local":
        mask = local_mask(q_len, int(p.window or 0), kv_len, offset)
    elif p.pattern == "block-sparse":
        mask = block_sparse_mask(
            q_len, int(p.block_size or 0), kv_len, offset, p.global_blocks, p.random_blocks, causal, p.seed
        )
    else:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool)
    return mask & causal_mask(q_len, kv_len, offset) if causal else mask
