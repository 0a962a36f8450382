"""SmoothQuant: move activation outliers into the weights before quantizing both (Xiao et al. 2023, arXiv:2211.10438).

For a Linear ``y = X W^T`` and any positive ``s: (in,)``, ``y = (X / s) (W * s)^T``: dividing the
activation's input channel ``j`` by ``s_j`` and multiplying the weight's column ``j`` by it leaves the float
model unchanged while flattening the activation's outlier channels. The division is folded into the
module that produces ``X`` (the preceding norm: its weight and bias divided by ``s``); the
multiplication into every Linear reading ``X`` (q/k/v, or gate/up), hence one ``s`` for several weights.
"""

from __future__ import annotations

import torch
from torch import Tensor


def smoothing_scales(act_absmax: Tensor, weights: list[Tensor], alpha: float = 0.5, min_scale: float = 1e-5) -> Tensor:
    """Per input channel ``s_j = max|X_j|^alpha / max_i max_k |W_i[k, j]|^(1 - alpha)``, at least ``min_scale``.

    ``act_absmax: (in,)`` is the calibration maximum of ``|X|`` per channel; ``weights`` are the
    ``(out_i, in)`` weights that read ``X``. ``alpha`` in ``[0, 1]`` is the share of the difficulty moved into
    the weights (0: none of the activations' range, ``s = 1 / max|W|``; 1: ``s = max|X|``). A channel whose
    activation or weight maximum is 0 gets ``s = 1`` (nothing to balance). Returns float32 ``(in,)``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    if not weights:
        raise ValueError("smoothing_scales needs at least one weight reading the activation")
    a = act_absmax.float()  # (in,)
    w = torch.stack([torch.maximum(W.amax(0), -W.amin(0)).float() for W in weights]).amax(0)  # (in,)
    if w.shape != a.shape:
        raise ValueError(f"weights have {w.shape[0]} input columns but the activation has {a.shape[0]} channels")
    s = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp_(min=min_scale)  # (in,)
    return torch.where((a > 0) & (w > 0), s, torch.ones_like(s))


def smooth_weights(W: Tensor, s: Tensor) -> Tensor:
    """``W * s`` per input column (``W: (out, in)``, ``s: (in,)``), computed in at least float32, in ``W``'s dtype.

    The module producing the input must be divided by ``s`` to keep the model's function: the preceding
    norm's weight (and bias) become ``weight / s`` (and ``bias / s``).
    """
    dtype = torch.promote_types(W.dtype, torch.float32)
    return (W.to(dtype) * s.to(dtype)).to(W.dtype)


def smooth_norm(weight: Tensor, bias: Tensor | None, s: Tensor, offset: float = 0.0) -> tuple[Tensor, Tensor | None]:
    """The preceding norm's parameters with its output divided by ``s: (in,)``, in their dtypes.

    A norm that scales by ``offset + weight`` (Gemma's ``1 + w``) gets ``(offset + w) / s - offset``;
    the bias, if any, ``bias / s``. Computed in at least float32.
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    w = ((offset + weight.to(dtype)) / s.to(dtype) - offset).to(weight.dtype)  # (in,)
    b = None if bias is None else (bias.to(dtype) / s.to(dtype)).to(bias.dtype)  # (in,)
    return w, b
