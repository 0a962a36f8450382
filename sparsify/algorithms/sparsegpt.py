"""SparseGPT: one-shot pruning with second-order weight updates (Frantar & Alistarh 2023, arXiv:2301.00774).

The solver walks input columns left to right in blocks. Inside a block it picks the mask by the
OBS saliency ``w^2 / [H^-1]_jj^2`` (adaptive mask selection), zeroes the pruned weights and
spreads each column's error onto the columns not yet visited through the upper Cholesky factor
of the inverse Hessian. N:M masks are chosen per group of M columns as the walk reaches them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsify.algorithms.masks import unstructured_mask


def dampened_inverse_cholesky(H: Tensor, dampening: float) -> Tensor:
    """Upper Cholesky factor of ``(H + dampening * mean(diag H) * I)^-1``; ``H: (in, in)``."""
    H = H.double().clone()
    diag = torch.arange(H.shape[0], device=H.device)
    H[diag, diag] += dampening * torch.mean(torch.diag(H))
    L, info = torch.linalg.cholesky_ex(H)
    if info:
        raise ValueError("the calibration Hessian is not positive definite; increase dampening")
    H_inv = torch.cholesky_inverse(L)  # (in, in)
    U, info = torch.linalg.cholesky_ex(H_inv, upper=True)
    if info:
        raise ValueError("the inverse Hessian is not positive definite; increase dampening")
    return U.float()


def dense_output_target(W: Tensor, C: Tensor, H: Tensor, dampening: float) -> Tensor:
    """The weights whose outputs on the compressed model's inputs best match the dense model's outputs.

    Minimizes ``||X W*^T - X_dense W^T||^2 + lam ||W* - W||^2`` with ``H = X^T X``,
    ``C = X_dense^T X`` and ``lam = dampening * mean(diag H)``: ``W* = W (C + lam I) (H + lam I)^-1``,
    which is ``W`` itself when the inputs have not drifted (``C = H``). Running SparseGPT on ``W*``
    with ``H`` then minimizes the pruned layer's distance to the *dense model's* outputs, correcting
    the error that earlier pruned layers passed down (the asymmetric calibration of GPTAQ, Li et al.
    2025, applied to pruning). ``W: (out, in)``, ``C, H: (in, in)``.
    """
    lam = dampening * H.diagonal().mean().double()
    Hd = H.double() + lam * torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
    Cd = C.double() + lam * torch.eye(C.shape[0], dtype=torch.float64, device=C.device)
    L = torch.linalg.cholesky(Hd)
    target_t = torch.cholesky_solve((W.double() @ Cd).T, L)  # (in, out) = (H + lam)^-1 (C + lam)^T W^T
    return target_t.T.float()


def sparsegpt_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    dampening: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """Prune ``W: (out, in)`` given ``H = X^T X: (in, in)``; returns ``(W_new, keep_mask)``.

    ``sparsity`` applies when ``nm`` is None; with ``nm=(n, m)`` every group of ``m`` inputs keeps ``n``.
    """
    W = W.float().clone()  # (out, in)
    H = H.float().clone()
    n_in = W.shape[1]
    dead = torch.diag(H) == 0  # inputs never active in calibration
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = dampened_inverse_cholesky(H, dampening)  # (in, in), upper triangular

    keep = torch.ones_like(W, dtype=torch.bool)
    if nm is not None and blocksize % nm[1]:
        blocksize = nm[1] * max(1, blocksize // nm[1])
    for b0 in range(0, n_in, blocksize):
        b1 = min(b0 + blocksize, n_in)
        W_blk = W[:, b0:b1].clone()  # (out, bs)
        U_blk = U[b0:b1, b0:b1]  # (bs, bs)
        E_blk = torch.zeros_like(W_blk)  # (out, bs) scaled errors
        d = torch.diag(U_blk)  # (bs,)
        if nm is None:
            keep_blk = unstructured_mask(W_blk.pow(2) / d.pow(2).unsqueeze(0), sparsity, "tensor")
        else:
            keep_blk = torch.ones_like(W_blk, dtype=torch.bool)
        for j in range(b1 - b0):
            if nm is not None and j % nm[1] == 0:
                n, m = nm
                saliency = W_blk[:, j : j + m].pow(2) / d[j : j + m].pow(2).unsqueeze(0)  # (out, m)
                drop = torch.topk(saliency, m - n, dim=1, largest=False).indices  # (out, m-n)
                keep_blk[:, j : j + m].scatter_(1, drop, False)
            w = W_blk[:, j]  # (out,)
            q = torch.where(keep_blk[:, j], w, torch.zeros_like(w))
            err = (w - q) / U_blk[j, j]  # (out,)
            W_blk[:, j:] -= err.unsqueeze(1) @ U_blk[j, j:].unsqueeze(0)  # (out, bs-j)
            W_blk[:, j] = q
            E_blk[:, j] = err
        W[:, b0:b1] = W_blk
        W[:, b1:] -= E_blk @ U[b0:b1, b1:]  # (out, in-b1): lazy batch update
        keep[:, b0:b1] = keep_blk
    W[~keep] = 0.0
    return W, keep
