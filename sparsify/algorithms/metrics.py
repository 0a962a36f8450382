"""Error measures shared by passes, evaluation and tests."""

from __future__ import annotations

import torch
from torch import Tensor


def relative_reconstruction_error(W: Tensor, W_new: Tensor, H: Tensor) -> float:
    """``||X W^T - X W_new^T||_F^2 / ||X W^T||_F^2`` computed from ``H = X^T X``.

    ``W, W_new: (out, in)``, ``H: (in, in)``; any positive scaling of ``H`` cancels.
    """
    D = (W - W_new).double()  # (out, in)
    Hd = H.double()
    num = (D @ Hd * D).sum()
    den = (W.double() @ Hd * W.double()).sum()
    return float(num / den) if den > 0 else 0.0


def kl_stats(ref_logprobs: Tensor, logprobs: Tensor, ref_top1: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per position, ``KL(p_ref || p) = sum_v p_ref(v) (log p_ref(v) - log p(v))`` and whether the two most
    likely tokens agree.

    ``ref_logprobs, logprobs: (..., V)`` log-probabilities (each row's ``exp`` sums to 1) → ``(N,)`` float32 KL
    and ``(N,)`` bool, ``N`` the positions. A token the reference gives probability 0 adds nothing; one it gives
    more and the model 0 makes the KL infinite. ``ref_top1 (...)``: the reference's most likely tokens where they
    are known more exactly than its (rounded) log-probabilities tell.
    """
    ref = ref_logprobs.float().flatten(0, -2)  # (N, V)
    lp = logprobs.float().flatten(0, -2)  # (N, V)
    p = ref.exp()
    kl = torch.where(p > 0, p * (ref - lp), 0.0).sum(-1)  # (N,)
    top1 = ref.argmax(-1) if ref_top1 is None else ref_top1.flatten().to(lp.device)  # (N,)
    return kl, top1 == lp.argmax(-1)
