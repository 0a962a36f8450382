"""The one layer-wise calibration loop every data-driven pass runs through.

1. Embed the calibration batch by running the model's own backbone with each layer replaced by a
   recorder that stores the layer's inputs (hidden states plus whatever the backbone passes a
   layer: position embeddings, masks) and returns the hidden states unchanged. No exception is
   raised to stop the forward; no architecture-specific code (:mod:`.capture`).
2. For each layer in turn: materialize it, and for each pass in recipe order resolve its targets by
   name on the layer as it is now (an earlier pass may have reshaped or replaced modules), gather the
   statistics the pass declares about their inputs (:mod:`.gather`, :mod:`sparsify.statistics`), and let
   the pass compress the layer (:mod:`.compress`). Then re-run the compressed layer to produce the next
   layer's inputs (as SparseGPT does), measuring on the first batch the layer's output error against the
   dense layer and each Linear's output error where the Linear kept its shape (:mod:`.forward`), save the
   layer and release it (:mod:`.runner`).

The loop knows no pass: it calls the hooks of :class:`sparsify.passes.base.Pass`.
"""

from sparsify.calibration.capture import Captured, batch_count
from sparsify.calibration.compress import Resolver
from sparsify.calibration.experts import ExpertCalibration, calibration_notes
from sparsify.calibration.runner import (
    Checkpoint,
    LayerwiseRunner,
    Probe,
    ResumePoint,
    resumed_probe,
    tracks_dense_path,
)
from sparsify.calibration.work import (
    ERROR_WINDOWS,
    InMemoryLayers,
    LayerCall,
    LayerProvider,
    LayerWork,
    ModelWork,
    RunOutput,
    run_layer,
)

__all__ = [
    "ERROR_WINDOWS",
    "Captured",
    "Checkpoint",
    "ExpertCalibration",
    "InMemoryLayers",
    "LayerCall",
    "LayerProvider",
    "LayerWork",
    "LayerwiseRunner",
    "ModelWork",
    "Probe",
    "Resolver",
    "ResumePoint",
    "RunOutput",
    "batch_count",
    "calibration_notes",
    "resumed_probe",
    "run_layer",
    "tracks_dense_path",
]
