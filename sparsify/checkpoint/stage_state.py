"""What ``--resume`` needs of one stage of a run (a sweep of layer passes), kept in the output's work folder.

A stage's folder (``.OUT.partial/.sparsify-state/stage-N/``, see :class:`~sparsify.checkpoint.output.Partial`) holds
its finished layers' files, the calibration activations entering the next layer (written to a file of their own,
then named by ``progress.json``: the commit point), the decisions taken before the sweep, the perplexity measured
before a recovery pass, and whether the stage is complete. The folder's lock, checks and final rename are
:mod:`sparsify.checkpoint.output`'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from sparsify.checkpoint.writer import LayerFiles, save_tensors, write_json


@dataclass
class StageState:
    """What ``--resume`` needs of one stage of a run (a sweep of layer passes): its finished layers, the
    calibration activations entering the next one (and the probe windows' there, where a recovery pass will
    report the perplexity before it), that perplexity once measured, its shard plan, and whether it is
    complete."""

    dir: Path
    resumed: bool
    resumed_at: int | None = None  # the layer a resumed sweep continued from (set by resume_point)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def layers(self) -> LayerFiles:
        return LayerFiles(self.dir / "layers")

    def checkpoint(
        self,
        next_layer: int,
        hidden: list[Tensor],
        dense: list[Tensor] | None,
        probe: list[tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        """Record that layers before ``next_layer`` are done and the calibration activations entering it (and
        ``probe``'s, (token windows, hidden states) per batch, for the perplexity before a recovery pass).

        The activations go to a file of their own, which ``progress.json`` then names (an atomic rename: the
        commit point), so a run killed between the two writes resumes from the last complete checkpoint."""
        tensors = {f"hidden.{i}": h for i, h in enumerate(hidden)}
        tensors.update({f"dense.{i}": h for i, h in enumerate(dense or [])})
        for i, (tokens, h) in enumerate(probe or []):
            tensors.update({f"probe_tokens.{i}": tokens, f"probe.{i}": h})
        name = f"hidden-{next_layer}.safetensors"
        save_tensors(tensors, self.dir / name)
        write_json(self.dir / "progress.json", {"next_layer": next_layer, "batches": len(hidden), "file": name})
        for old in self.dir.glob("hidden*.safetensors"):
            if old.name != name:
                old.unlink()

    def progress(self) -> int:
        path = self.dir / "progress.json"
        return int(json.loads(path.read_text())["next_layer"]) if path.is_file() else 0

    def resume_point(
        self,
    ) -> tuple[int, list[Tensor], list[Tensor] | None, list[tuple[Tensor, Tensor]] | None] | None:
        """``(next layer, hidden states entering it, the dense path's, the probe's (token windows, hidden
        states))`` of an earlier run, if any."""
        from safetensors.torch import load_file

        path = self.dir / "progress.json"
        if not self.resumed or not path.is_file():
            return None
        progress = json.loads(path.read_text())
        n = int(progress["batches"])
        saved = self.dir / progress.get("file", "hidden.safetensors")
        tensors = load_file(str(saved)) if saved.is_file() else {}
        hidden = [tensors[f"hidden.{i}"] for i in range(n)]
        dense = [tensors[f"dense.{i}"] for i in range(n)] if "dense.0" in tensors else None
        count = sum(k.startswith("probe.") for k in tensors)
        probe = [(tensors[f"probe_tokens.{i}"], tensors[f"probe.{i}"]) for i in range(count)] or None
        self.resumed_at = int(progress["next_layer"])
        return self.resumed_at, hidden, dense, probe

    def save_recovered(self, recovered: dict[str, Any], windows: str) -> None:
        """The perplexity of the model before the stage's recovery pass, measured on the token windows whose
        digest is ``windows``, for a resumed run's report."""
        write_json(self.dir / "recovered.json", {**recovered, "windows": windows})

    def recovered(self, windows: str) -> dict[str, Any] | None:
        """What :meth:`save_recovered` saved, if it was measured on the same windows."""
        path = self.dir / "recovered.json"
        saved = json.loads(path.read_text()) if self.resumed and path.is_file() else {}
        return {k: v for k, v in saved.items() if k != "windows"} if saved.get("windows") == windows else None

    def save_decisions(self, decisions: dict[str, Any]) -> None:
        """What the passes decided before the sweep (layers removed, OWL sparsities), for ``--resume``."""
        write_json(self.dir / "decisions.json", decisions)

    def decisions(self) -> dict[str, Any] | None:
        path = self.dir / "decisions.json"
        return json.loads(path.read_text()) if self.resumed and path.is_file() else None

    @property
    def complete(self) -> bool:
        return self.resumed and (self.dir / "complete").is_file()

    def mark_complete(self) -> None:
        write_json(self.dir / "complete", {"complete": True})
