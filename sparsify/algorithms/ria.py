"""RIA: relative importance and activations (Zhang et al. 2024, "Plug-and-Play", ICLR 2024)."""

from __future__ import annotations

from torch import Tensor


def ria_scores(W: Tensor, input_sq_norm: Tensor, alpha: float = 0.5, eps: float = 1e-12) -> Tensor:
    """``(|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||^alpha``.

    Relative importance divides each weight by the L1 norm of its row and of its column, so a weight
    that dominates either its output or its input channel is kept. ``W: (out, in)``,
    ``input_sq_norm: (in,)``; ``alpha=0.5`` as in the paper.
    """
    A = W.abs()  # (out, in)
    relative = A / (A.sum(dim=1, keepdim=True) + eps) + A / (A.sum(dim=0, keepdim=True) + eps)
    return relative * input_sq_norm.sqrt().pow(alpha).unsqueeze(0)  # (out, in)
