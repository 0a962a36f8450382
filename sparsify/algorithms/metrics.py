"""Error measures shared by passes and tests."""

from __future__ import annotations

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
