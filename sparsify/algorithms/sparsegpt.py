"""SparseGPT: one-shot pruning with second-order weight updates (Frantar & Alistarh 2023, arXiv:2301.00774).

The solver walks input columns left to right in blocks. Inside a block it picks the mask by the
OBS saliency ``w^2 / [H^-1]_jj^2`` (adaptive mask selection), zeroes the pruned weights and
spreads each column's error onto the columns not yet visited through the upper Cholesky factor
of the inverse Hessian. N:M masks are chosen per group of M columns as the walk reaches them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsify.algorithms.linalg import dampen_, dampened_inverse_cholesky
from sparsify.algorithms.masks import unstructured_mask


def dense_output_target(W: Tensor, C: Tensor, H: Tensor, dampening: float) -> Tensor:
    """The weights whose outputs on the compressed model's inputs best match the dense model's outputs.

    Minimizes ``||X W*^T - X_dense W^T||^2 + lam ||W* - W||^2`` with ``H = X^T X``,
    ``C = X_dense^T X`` and ``lam = dampening * mean(diag H)``: ``W* = W (C + lam I) (H + lam I)^-1``,
    which is ``W`` itself when the inputs have not drifted (``C = H``). Running SparseGPT on ``W*``
    with ``H`` then minimizes the pruned layer's distance to the *dense model's* outputs, correcting
    the error that earlier pruned layers passed down (the asymmetric calibration of GPTAQ, Li et al.
    2025, applied to pruning). ``W: (out, in)``, ``C, H: (in, in)``.
    """
    if torch.equal(C, H):  # inputs have not drifted (the first pruned layer): W* = W exactly, skip the solve
        return W.float().clone()
    lam = dampening * H.diagonal().mean().float()
    rhs = (W.float() @ C.float()).T  # (in, out) = C^T W^T
    rhs += lam * W.float().T  # (C + lam I)^T W^T
    L = dampen_(H.float().clone(), dampening)  # H + lam I, then its Cholesky factor in the same memory
    info = torch.empty((), dtype=torch.int32, device=L.device)
    torch.linalg.cholesky_ex(L, out=(L, info))
    if info:
        raise ValueError("the calibration Hessian is not positive definite; increase dampening")
    target_t = torch.cholesky_solve(rhs, L.tril_())  # (in, out) = (H + lam)^-1 (C + lam)^T W^T
    return target_t.T


def sparsegpt_prune(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    dampening: float = 0.01,
    inplace: bool = False,
) -> tuple[Tensor, Tensor]:
    """Prune ``W: (out, in)`` given ``H = X^T X: (in, in)``; returns ``(W_new, keep_mask)``.

    ``sparsity`` applies when ``nm`` is None; with ``nm=(n, m)`` every group of ``m`` inputs keeps ``n``.
    ``inplace=True`` lets the solver use a float32 ``H``'s memory (destroying it): peak extra memory is
    then one ``(in, in)`` float32 buffer.
    """
    W = W.float().clone()  # (out, in)
    H = H.float() if inplace else H.float().clone()  # (in, in); float32 throughout, as the reference code
    n_in = W.shape[1]
    dead = torch.diag(H) == 0  # inputs never active in calibration
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = dampened_inverse_cholesky(H, dampening, inplace=True)  # (in, in), upper triangular, in H's memory

    keep = torch.ones_like(W, dtype=torch.bool)
    kept_any = torch.zeros(W.shape[0], dtype=torch.bool, device=W.device)  # (out,) rows with a kept weight so far
    if nm is not None and blocksize % nm[1]:
        blocksize = nm[1] * max(1, blocksize // nm[1])
    for b0 in range(0, n_in, blocksize):
        b1 = min(b0 + blocksize, n_in)
        Wt = W[:, b0:b1].T.contiguous()  # (bs, out): column j of the block is row j, contiguous
        U_blk = U[b0:b1, b0:b1]  # (bs, bs)
        d = torch.diag(U_blk).unsqueeze(1)  # (bs, 1)
        E = torch.empty_like(Wt)  # (bs, out) scaled errors
        if nm is None:
            saliency = Wt.pow(2) / d.pow(2)  # (bs, out)
            drop = ~unstructured_mask(saliency, sparsity, "tensor")  # (bs, out)
            if b1 == n_in:  # last block: a row with nothing kept so far keeps its most salient weight here
                lost = ~kept_any & drop.all(0)  # (out,)
                if lost.any():
                    drop[saliency[:, lost].argmax(0), lost.nonzero().squeeze(-1)] = False
            kept_any |= ~drop.all(0)
        else:
            drop = torch.zeros_like(Wt, dtype=torch.bool)
        scale = drop.float() / d  # (bs, out): err_j = w_j * [pruned] / U_jj
        for j in range(b1 - b0):
            if nm is not None and j % nm[1] == 0:
                n, m = nm
                saliency = Wt[j : j + m].pow(2) / d[j : j + m].pow(2)  # (m, out)
                worst = torch.topk(saliency, m - n, dim=0, largest=False).indices  # (m-n, out)
                drop[j : j + m].scatter_(0, worst, True)
                scale[j : j + m] = drop[j : j + m].float() / d[j : j + m]
            torch.mul(Wt[j], scale[j], out=E[j])  # (out,)
            Wt[j:].addr_(U_blk[j, j:], E[j], alpha=-1.0)  # (bs-j, out) rank-1 update; row j becomes q
        W[:, b0:b1] = Wt.T
        W[:, b1:] -= E.T @ U[b0:b1, b1:]  # (out, in-b1): lazy batch update
        keep[:, b0:b1] = ~drop.T
    W[~keep] = 0.0
    return W, keep
