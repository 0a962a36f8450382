"""The model measured just before a recovery pass (heal), so that the report can say what healing recovered.

Held-out windows ride the layer-wise sweep beside the calibration (rank 0 only: it alone measures); once the last
layer is done, the hidden states they became give the perplexity of the compressed, not yet healed, model. Saved
with the stage (keyed by the windows' digest), so a run resumed after the sweep still reports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sparsify.checkpoint.output import tensor_digest
from sparsify.checkpoint.stage_state import StageState
from sparsify.evaluate import perplexity, perplexity_of_hidden
from sparsify.pipeline.measure import _probe
from sparsify.pipeline.options import Options, _Run


@dataclass
class RecoveryProbe:
    step: str | None  # the recovery pass's name ("healing"); None: the stage has none, nothing is measured
    windows: list[Tensor] | None  # the probe's token windows, in batches (None: not measured on this rank)
    digest: str | None  # what they are, for a resumed run's saved measurement

    @classmethod
    def of(cls, step: str | None, run: _Run, opts: Options) -> RecoveryProbe:
        """For a stage whose recovery pass is ``step`` (None: none)."""
        windows = _probe(run, opts) if step else None
        return cls(step, windows, tensor_digest(torch.cat(windows)) if windows is not None else None)

    def saved(self, state: StageState) -> dict[str, Any] | None:
        """The measurement an earlier run of this (complete) stage saved for these windows, if any."""
        return state.recovered(self.digest) if self.digest is not None else None

    def measure(self, model: torch.nn.Module, layers: Any, carried: list, state: StageState) -> dict[str, Any]:
        """The perplexity of what the windows became (``carried``: (tokens, hidden) per batch), saved with the stage;
        ``model``'s head must be loaded."""
        before = {"step": self.step, "perplexity": perplexity_of_hidden(model, layers.modules, carried)}
        if self.digest is not None:  # a run resumed from here on reports it too
            state.save_recovered(before, self.digest)
        return before

    def measure_model(self, model: torch.nn.Module, device: torch.device) -> dict[str, Any] | None:
        """The perplexity of a whole model in memory (a whole-model recovery pass: distillation) on the windows."""
        if self.windows is None:
            return None
        ppl = perplexity(model, torch.cat(self.windows).to(device), batch_size=int(self.windows[0].shape[0]))
        return {"step": self.step, "perplexity": ppl}

    def missing(self, before: dict[str, Any] | None) -> str | None:
        """The note when the measurement could not be made (a run resumed in the middle of the sweep)."""
        if self.windows is not None and before is None:
            return f"perplexity before {self.step} not measured: the run was resumed"
        return None
