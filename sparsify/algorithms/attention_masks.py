"""Attention patterns as index rules and boolean masks ``(q_len, kv_len)``: True where a query may attend a key.

Positions are absolute: query ``i`` sits at ``q_offset + i``, key ``j`` at ``j``. Windows follow
transformers/Mistral: a causal window ``w`` keeps the ``w`` most recent keys including the query's own
position (``q - w < k <= q``).

Each pattern is written once, as a *rule*: a function of (query position, key position) tensors that
broadcasts. A mask is the rule evaluated on a grid; flex_attention's ``mask_mod`` is the same rule
evaluated index by index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Rule = Callable[[Tensor, Tensor], Tensor]  # (query positions, key positions) -> allowed, broadcasting


def _positions(q_len: int, kv_len: int, q_offset: int) -> tuple[Tensor, Tensor]:
    q = torch.arange(q_offset, q_offset + q_len).unsqueeze(1)  # (q, 1)
    k = torch.arange(kv_len).unsqueeze(0)  # (1, kv)
    return q, k


def _grid(rule: Rule, q_len: int, kv_len: int | None, q_offset: int) -> Tensor:
    q, k = _positions(q_len, kv_len or q_len + q_offset, q_offset)
    return rule(q, k)  # (q, kv)


def causal_rule(q: Tensor, k: Tensor) -> Tensor:
    return k <= q


def window_rule(window: int, sinks: int = 0) -> Rule:
    """Causal sliding window of ``window`` keys, plus the first ``sinks`` keys (StreamingLLM's attention sinks)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return lambda q, k: (k <= q) & ((k > q - window) | (k < sinks))


def local_rule(window: int) -> Rule:
    """Bidirectional (encoder) local attention: keys within ``window // 2`` positions either side."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return lambda q, k: (q - k).abs() <= window // 2


def block_rule(
    block_size: int,
    first_query: int,
    last_query: int,
    kv_len: int,
    global_blocks: int = 1,
    random_blocks: int = 0,
    causal: bool = True,
    seed: int = 0,
) -> Rule:
    """BigBird-style block sparsity for queries at positions ``first_query .. last_query`` (see block_sparse_mask)."""
    if block_size < 1:
        raise ValueError(f"block size must be >= 1, got {block_size}")
    first, last = first_query // block_size, last_query // block_size + 1
    table = block_table(first, last, -(-kv_len // block_size), global_blocks, random_blocks, causal, seed)

    def rule(q: Tensor, k: Tensor) -> Tensor:
        ok = table.to(q.device)[q // block_size - first, k // block_size]
        return ok & (k <= q) if causal else ok

    return rule


def causal_mask(q_len: int, kv_len: int | None = None, q_offset: int = 0) -> Tensor:
    return _grid(causal_rule, q_len, kv_len, q_offset)


def sliding_window_mask(
    q_len: int, window: int, kv_len: int | None = None, q_offset: int = 0, sinks: int = 0
) -> Tensor:
    """Causal sliding window of ``window`` keys, plus the first ``sinks`` keys (StreamingLLM's attention sinks)."""
    return _grid(window_rule(window, sinks), q_len, kv_len, q_offset)


def local_mask(q_len: int, window: int, kv_len: int | None = None, q_offset: int = 0) -> Tensor:
    """Bidirectional (encoder) local attention: keys within ``window // 2`` positions either side."""
    return _grid(local_rule(window), q_len, kv_len, q_offset)


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
    kv_len = kv_len or q_len + q_offset
    rule = block_rule(block_size, q_offset, q_offset + q_len - 1, kv_len, global_blocks, random_blocks, causal, seed)
    return _grid(rule, q_len, kv_len, q_offset)


def block_table(
    first: int, last: int, key_blocks: int, global_blocks: int, random_blocks: int, causal: bool, seed: int
) -> Tensor:
    """``(last - first, key_blocks)``: which key blocks query blocks ``first .. last - 1`` attend."""
    qb = torch.arange(first, last).unsqueeze(1)  # (nq, 1)
    kb = torch.arange(key_blocks).unsqueeze(0)  # (1, nk)
    table = ((qb - kb).abs() <= 1) | (kb < global_blocks) | (qb < global_blocks)  # (nq, nk)
    for b in range(first, last) if random_blocks else ():
        table[b - first, random_block_choices(b, key_blocks, random_blocks, causal, seed)] = True
    return table


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


def pattern_rule(p: LayerPattern, q_len: int, kv_len: int | None = None, causal: bool = True) -> Rule:
    """The rule of pattern ``p`` when the queries are the last ``q_len`` of ``kv_len`` positions."""
    kv_len = kv_len or q_len
    if p.pattern in ("sliding-window", "sinks"):
        return window_rule(int(p.window or 0), p.sinks)
    if p.pattern == "local":
        rule = local_rule(int(p.window or 0))
    elif p.pattern == "block-sparse":
        first = kv_len - q_len
        rule = block_rule(
            int(p.block_size or 0), first, kv_len - 1, kv_len, p.global_blocks, p.random_blocks, causal, p.seed
        )
    else:
        return causal_rule if causal else (lambda q, k: torch.ones_like(q - k, dtype=torch.bool))
    return (lambda q, k: rule(q, k) & (k <= q)) if causal else rule


def pattern_mask(p: LayerPattern, q_len: int, kv_len: int | None = None, causal: bool = True) -> Tensor:
    """The ``(q_len, kv_len)`` mask of pattern ``p``, queries being the last ``q_len`` of ``kv_len`` positions."""
    kv_len = kv_len or q_len
    return _grid(pattern_rule(p, q_len, kv_len, causal), q_len, kv_len, kv_len - q_len)
