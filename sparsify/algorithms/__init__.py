"""Pure tensor math: no modules walked, no files read, no devices chosen.

Every function takes tensors and returns tensors. Weights are ``W: (out, in)`` (the ``nn.Linear``
layout), calibration statistics are per input feature.
"""

from sparsify.algorithms.masks import magnitude_mask, nm_mask, unstructured_mask
from sparsify.algorithms.metrics import relative_reconstruction_error
from sparsify.algorithms.owl import outlier_ratio, owl_layer_sparsities
from sparsify.algorithms.ria import ria_scores
from sparsify.algorithms.sparsegpt import dense_output_target, sparsegpt_prune
from sparsify.algorithms.wanda import wanda_scores

__all__ = [
    "dense_output_target",
    "magnitude_mask",
    "nm_mask",
    "outlier_ratio",
    "owl_layer_sparsities",
    "relative_reconstruction_error",
    "ria_scores",
    "sparsegpt_prune",
    "unstructured_mask",
    "wanda_scores",
]
