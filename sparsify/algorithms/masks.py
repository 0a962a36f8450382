"""Keep-masks from importance scores: unstructured (per tensor or per row) and N:M."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Scope = Literal["tensor", "row"]


def unstructured_mask(scores: Tensor, sparsity: float, scope: Scope = "tensor") -> Tensor:
    """Boolean keep-mask that zeroes the ``round(sparsity * n)`` lowest scores.

    ``scope="tensor"`` compares all entries (as ``torch.nn.utils.prune.l1_unstructured``);
    ``scope="row"`` prunes the same count in every output row (as Wanda does).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if scope == "tensor":
        k = round(sparsity * scores.numel())
        if k:
            drop = torch.topk(scores.reshape(-1), k, largest=False).indices  # (k,)
            mask.view(-1)[drop] = False
    else:
        k = round(sparsity * scores.shape[-1])
        if k:
            drop = torch.topk(scores, k, dim=-1, largest=False).indices  # (out, k)
            mask.scatter_(-1, drop, False)
    return mask


def keep_one_per_row(mask: Tensor, scores: Tensor) -> Tensor:
    """In place: every row of ``mask: (rows, cols)`` with no kept entry keeps its highest score."""
    empty = ~mask.any(dim=-1)  # (rows,)
    if empty.any():
        best = scores[empty].argmax(dim=-1)  # (empty rows,)
        mask[empty.nonzero().squeeze(-1), best] = True
    return mask


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Boolean keep-mask holding the ``n`` highest scores of every ``m`` consecutive inputs.

    ``scores: (out, in)`` with ``in % m == 0``; N:M means N non-zeros in each group of M.
    """
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    out_f, in_f = scores.shape
    if in_f % m:
        raise ValueError(f"input features {in_f} are not a multiple of M={m}")
    groups = scores.reshape(out_f, in_f // m, m)  # (out, in/m, m)
    keep = torch.topk(groups, n, dim=-1).indices  # (out, in/m, n)
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device).scatter_(-1, keep, True)
    return mask.reshape(out_f, in_f)


def magnitude_mask(W: Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> Tensor:
    """Magnitude pruning (Han et al. 2015): keep the largest ``|W|`` per tensor, or per N:M group.

    Per tensor, a row that would lose every weight keeps its largest (no output is cut off entirely).
    """
    scores = W.abs()
    return nm_mask(scores, *nm) if nm else keep_one_per_row(unstructured_mask(scores, sparsity, "tensor"), scores)
