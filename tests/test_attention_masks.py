"""Mask builders against naive loops, for several lengths, windows and block sizes."""

from __future__ import annotations

import pytest
import torch

from sparsify.algorithms.attention_masks import (
    LayerPattern,
    attention_fraction,
    block_sparse_mask,
    causal_mask,
    local_mask,
    pattern_mask,
    random_block_choices,
    sliding_window_mask,
)


def _loop(q_len, kv_len, offset, allowed):
    m = torch.zeros(q_len, kv_len, dtype=torch.bool)
    for i in range(q_len):
        for j in range(kv_len):
            m[i, j] = allowed(offset + i, j)
    return m


@pytest.mark.parametrize("length", [1, 7, 33])
@pytest.mark.parametrize("window", [1, 4, 16, 64])
@pytest.mark.parametrize("sinks", [0, 2])
def test_sliding_window_and_sinks(length, window, sinks):
    got = sliding_window_mask(length, window, sinks=sinks)
    ref = _loop(length, length, 0, lambda i, j: j <= i and (i - j < window or j < sinks))
    assert torch.equal(got, ref)
    assert not (got & ~causal_mask(length)).any()  # never the future


@pytest.mark.parametrize(("q_len", "offset"), [(1, 20), (5, 11)])
def test_sliding_window_with_a_cache_offset(q_len, offset):
    got = sliding_window_mask(q_len, 6, kv_len=q_len + offset, q_offset=offset, sinks=3)
    ref = _loop(q_len, q_len + offset, offset, lambda i, j: j <= i and (i - j < 6 or j < 3))
    assert torch.equal(got, ref)


@pytest.mark.parametrize("length", [5, 40])
@pytest.mark.parametrize("window", [1, 3, 8, 128])
def test_local_mask(length, window):
    assert torch.equal(local_mask(length, window), _loop(length, length, 0, lambda i, j: abs(i - j) <= window // 2))


@pytest.mark.parametrize(("length", "block"), [(16, 4), (24, 8), (12, 12)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("global_blocks", [0, 1, 2])
def test_block_sparse_without_random_blocks(length, block, causal, global_blocks):
    got = block_sparse_mask(length, block, global_blocks=global_blocks, causal=causal)

    def allowed(i, j):
        bi, bj = i // block, j // block
        ok = abs(bi - bj) <= 1 or bj < global_blocks or bi < global_blocks
        return ok and (j <= i or not causal)

    assert torch.equal(got, _loop(length, length, 0, allowed))


def test_block_sparse_random_blocks_are_seeded_and_whole_blocks():
    a = block_sparse_mask(64, 8, global_blocks=0, random_blocks=2, causal=False, seed=1)
    b = block_sparse_mask(64, 8, global_blocks=0, random_blocks=2, causal=False, seed=1)
    assert torch.equal(a, b)
    blocks = a.reshape(8, 8, 8, 8).permute(0, 2, 1, 3).reshape(8, 8, 64)
    assert ((blocks.sum(-1) == 0) | (blocks.sum(-1) == 64)).all()  # on or off per block
    assert (blocks.any(-1).sum(1) >= 3).all()  # neighbours plus random ones


def test_errors_and_fractions():
    with pytest.raises(ValueError, match="window"):
        sliding_window_mask(4, 0)
    with pytest.raises(ValueError, match="block size"):
        block_sparse_mask(10, 0)
    with pytest.raises(ValueError, match="unknown attention pattern"):
        LayerPattern("dilated")
    with pytest.raises(ValueError, match="needs window"):
        LayerPattern("sinks", sinks=4)
    assert attention_fraction(causal_mask(8)) == 1.0
    length, w = 1024, 128
    expected = (w * (w + 1) / 2 + (length - w) * w) / (length * (length + 1) / 2)
    assert attention_fraction(sliding_window_mask(length, w)) == pytest.approx(expected)


@pytest.mark.parametrize(("length", "block"), [(10, 4), (17, 8), (5, 8)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("random_blocks", [0, 2])
def test_block_sparse_any_length_and_random_blocks(length, block, causal, random_blocks):
    """A partial last block is a block like the others; random blocks come from (seed, query block) alone."""
    got = block_sparse_mask(length, block, global_blocks=1, random_blocks=random_blocks, causal=causal, seed=3)
    n = -(-length // block)

    def allowed(i, j):
        bi, bj = i // block, j // block
        picked = random_block_choices(bi, n, random_blocks, causal, 3).tolist() if random_blocks else []
        ok = abs(bi - bj) <= 1 or bj < 1 or bi < 1 or bj in picked
        return ok and (j <= i or not causal)

    assert torch.equal(got, _loop(length, length, 0, allowed))


@pytest.mark.parametrize(
    "p",
    [
        LayerPattern("sinks", window=5, sinks=2),
        LayerPattern("sliding-window", window=3),
        LayerPattern("block-sparse", block_size=4, global_blocks=1, random_blocks=1, seed=2),
        LayerPattern("full"),
    ],
)
def test_decoding_rows_equal_the_full_mask(p):
    """The mask for the last q queries over all keys is the bottom of the full mask: decoding sees what the
    full forward sees (random blocks included)."""
    full = pattern_mask(p, 24)
    for q_len in (1, 3):
        assert torch.equal(pattern_mask(p, q_len, 24), full[-q_len:])


def test_pattern_mask_dispatches_to_the_builders():
    assert torch.equal(pattern_mask(LayerPattern("sinks", window=4, sinks=1), 9), sliding_window_mask(9, 4, sinks=1))
    assert torch.equal(pattern_mask(LayerPattern("local", window=5), 9, causal=False), local_mask(9, 5))
    assert torch.equal(pattern_mask(LayerPattern(), 9), causal_mask(9))
    assert pattern_mask(LayerPattern(), 9, causal=False).all()
