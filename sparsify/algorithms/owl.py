"""OWL: outlier-weighted layer-wise sparsity (Yin et al. 2024, arXiv:2310.05175)."""

from __future__ import annotations

import torch
from torch import Tensor


def outlier_ratio(scores: list[Tensor], threshold: float) -> float:
    """Fraction of entries whose score exceeds ``threshold`` times the mean score of the layer.

    ``scores`` are the Wanda scores of every target Linear in one layer (any shapes); the mean is
    taken over all of them together, as the layer-wise outlier distribution (LOD) in the paper.
    """
    flat = torch.cat([s.reshape(-1).float() for s in scores])  # (n,)
    return float((flat > threshold * flat.mean()).float().mean())


def owl_layer_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-layer sparsities averaging ``sparsity``; layers with more outliers get less sparsity.

    Ratios are min-max scaled to ``[0, 2*lam]``, centred, and subtracted from the target (as the
    OWL reference code does): the sparsities span ``2*lam`` and their mean is ``sparsity``.
    """
    r = torch.tensor(ratios, dtype=torch.float64)  # (L,)
    span = r.max() - r.min()
    scaled = (r - r.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(r)
    layer = sparsity - (scaled - scaled.mean())  # (L,)
    return [min(max(float(s), 0.0), 0.99) for s in layer]
