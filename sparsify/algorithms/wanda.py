"""Wanda: pruning by weights and activations (Sun et al. 2023, arXiv:2306.11695)."""

from __future__ import annotations

from torch import Tensor


def wanda_scores(W: Tensor, input_sq_norm: Tensor) -> Tensor:
    """``|W_ij| * ||X_j||_2``: weight magnitude times the norm of input feature ``j``.

    ``W: (out, in)``; ``input_sq_norm: (in,)`` holds the (summed or averaged) squared input norms.
    Any positive scaling of ``input_sq_norm`` leaves the resulting masks unchanged.
    """
    return W.abs() * input_sq_norm.sqrt().unsqueeze(0)  # (out, in)
