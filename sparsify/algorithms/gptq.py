"""GPTQ: one-shot weight quantization with second-order error feedback (Frantar et al. 2022, arXiv:2210.17323).

The solver walks input columns in blocks, as SparseGPT does: each column is rounded to the grid, and its
error, scaled by the upper Cholesky factor ``U`` of the damped inverse Hessian (``U^T U = H^-1``), is
spread onto the columns not yet visited; inside a block at once, onto later blocks in one lazy batch update.

Quantization parameters follow the reference code: per tensor or per channel they come from the whole
``W`` before the walk; per group they come from the group's *updated* weights when the walk reaches its
first column. With ``act_order`` (columns visited by decreasing ``diag H``) groups are "static": every
group's parameters come from the original ``W`` in the original column order up front (AutoGPTQ's
``static_groups``), so the codes need no ``g_idx`` to be decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from sparsify.algorithms.linalg import dampened_inverse_cholesky
from sparsify.algorithms.quant import (
    PerChannel,
    PerGroup,
    PerToken,
    QuantArgs,
    dequantize,
    observe,
    qparams,
    quantize,
)


@dataclass(frozen=True)
class GPTQResult:
    """A quantized ``W: (out, in)``, everything in the original column order."""

    weight: Tensor  # (out, in) float32: dequantize(q, scale, zero_point), exactly
    q: Tensor  # (out, in) int8 codes
    scale: Tensor  # (1,), (out, 1) or (out, in // g): as minmax(W, granularity)
    zero_point: Tensor  # int8, shaped as scale
    perm: Tensor | None  # (in,) with act_order: perm[t] is the original column visited t-th; else None


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    args: QuantArgs,
    blocksize: int = 128,
    dampening: float = 0.01,
    act_order: bool = False,
    inplace: bool = False,
    mask: Tensor | None = None,
    observer: str = "minmax",
) -> GPTQResult:
    """Quantize ``W: (out, in)`` given ``H = X^T X / N: (in, in)``.

    ``args.granularity`` is PerTensor, PerChannel or PerGroup (a weight has no tokens). Inputs never active
    in calibration (``H_jj = 0``) get ``H_jj = 1`` and zero weights, as in SparseGPT. ``inplace=True`` lets the
    solver use a float32 ``H``'s memory (destroying it). ``mask: (out, in)`` bool, if given: weights where it
    is False are quantized to exactly zero (the zeros of an earlier pruning pass stay zeros; their error is
    fed forward like any other, as SparseGPT does). ``observer``: how a range is chosen for the scales
    (:func:`~sparsify.algorithms.quant.observe`: ``minmax``, ``mse`` or ``weighted-mse``, whose importance is
    ``diag(H)``). Raises ValueError when the damped
    Hessian is not positive definite (more ``dampening`` helps).
    """
    if isinstance(args.granularity, PerToken):
        raise ValueError("PerToken is for activations; quantize weights PerTensor, PerChannel or PerGroup")
    if blocksize < 1:
        raise ValueError(f"blocksize must be a positive number of columns, got {blocksize}")
    if W.ndim != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"expected W (out, in) and H (in, in), got {tuple(W.shape)} and {tuple(H.shape)}")
    W = W.float().clone()  # (out, in)
    H = H.float() if inplace else H.float().clone()  # (in, in)
    n_out, n_in = W.shape
    col_args = replace(args, granularity=PerChannel())  # one column (or group) of rows at a time
    group = args.granularity.size if isinstance(args.granularity, PerGroup) else None
    if group is not None and n_in % group:
        raise ValueError(f"{n_in} input columns are not a multiple of the group size {group}")
    dynamic_groups = group is not None and not act_order

    importance = torch.diag(H).clone()  # (in,): each input's mean square (weighted-mse weighs rounding errors by it)

    def choose(x: Tensor, a: QuantArgs, columns: slice = slice(None)) -> tuple[Tensor, Tensor]:
        return qparams(*observe(x, a, observer, importance=importance[columns]), a)  # type: ignore[arg-type]

    if dynamic_groups:
        scale = torch.empty((n_out, n_in // group), dtype=torch.float32, device=W.device)  # filled during the walk
        zero_point = torch.empty((n_out, n_in // group), dtype=torch.int8, device=W.device)
    else:
        scale, zero_point = choose(W, args)  # from the original W, as the reference code
    drop = None if mask is None else ~mask.to(W.device)  # (out, in): weights that must come out zero

    dead = torch.diag(H) == 0  # inputs never active in calibration
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)  # (in,)
        W = W[:, perm]
        drop = None if drop is None else drop[:, perm]
        H.copy_(H[perm])  # rows, then columns: one temporary (in, in) at a time
        H.copy_(H[:, perm])
    col_scale = scale if group is None else None  # (1,) or (out, 1): the same for every column
    col_zp = zero_point if group is None else None
    group_of = None
    if group is not None and not dynamic_groups:
        group_of = ((perm if perm is not None else torch.arange(n_in)) // group).tolist()  # static group per column
    U = dampened_inverse_cholesky(H, dampening, inplace=True)  # (in, in), upper triangular, in H's memory

    Q = torch.empty((n_out, n_in), dtype=torch.int8, device=W.device)  # codes in walk order
    for b0 in range(0, n_in, blocksize):
        b1 = min(b0 + blocksize, n_in)
        Wt = W[:, b0:b1].T.contiguous()  # (bs, out): column j of the block is row j, contiguous
        Qt = torch.empty(Wt.shape, dtype=torch.int8, device=W.device)  # (bs, out)
        U_blk = U[b0:b1, b0:b1]  # (bs, bs)
        E = torch.empty_like(Wt)  # (bs, out) scaled errors
        for j in range(b1 - b0):
            c = b0 + j  # walk position
            if dynamic_groups and c % group == 0:
                k, c_end = c // group, c + group
                cols = Wt[j : min(c_end, b1) - b0].T  # (out, *): the group's columns in this block, updated
                if c_end > b1:  # and those after it, with this block's errors so far applied
                    rest = W[:, b1:c_end] - E[:j].T @ U[b0:c, b1:c_end]  # (out, c_end - b1)
                    cols = torch.cat([cols, rest], dim=1)
                s, z = choose(cols, col_args, slice(c, c + cols.shape[1]))  # (out, 1)
                scale[:, k : k + 1], zero_point[:, k : k + 1] = s, z
            if group is not None:
                k = c // group if dynamic_groups else group_of[c]
                col_scale, col_zp = scale[:, k : k + 1], zero_point[:, k : k + 1]  # (out, 1)
            w = Wt[j : j + 1].T  # (out, 1)
            q = quantize(w, col_scale, col_zp, col_args)  # (out, 1) int8
            if drop is not None:
                q = torch.where(drop[:, c : c + 1], col_zp.expand_as(q), q)  # the zero point decodes to exactly 0
            Qt[j] = q[:, 0]
            E[j] = (w - dequantize(q, col_scale, col_zp, col_args))[:, 0] / U_blk[j, j]  # (out,)
            Wt[j:].addr_(U_blk[j, j:], E[j], alpha=-1.0)  # (bs-j, out) rank-1 error feedback
        Q[:, b0:b1] = Qt.T
        W[:, b1:] -= E.T @ U[b0:b1, b1:]  # (out, in-b1): lazy batch update

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]  # back to the original column order
    weight = dequantize(Q, scale, zero_point, args)  # (out, in) float32
    return GPTQResult(weight=weight, q=Q, scale=scale, zero_point=zero_point, perm=perm)
