"""Unstructured and N:M pruning: magnitude, Wanda, RIA and SparseGPT, with an optional OWL profile.

```yaml
- type: prune
  method: sparsegpt        # magnitude | wanda | ria | sparsegpt
  sparsity: 0.5            # unstructured only; N:M implies 1 - N/M
  pattern: "2:4"           # unstructured | N:M
  profile: uniform         # uniform | owl (unstructured only)
  targets: ["re:.*(q|k|v|o|gate|up|down)_proj"]
```
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from sparsify.algorithms import (
    dense_output_target,
    magnitude_mask,
    nm_mask,
    outlier_ratio,
    owl_layer_sparsities,
    ria_scores,
    sparsegpt_prune,
    unstructured_mask,
    wanda_scores,
)
from sparsify.calibration import LayerwiseRunner, LinearStats
from sparsify.errors import SparsifyError
from sparsify.modules import in_features, set_weight_matrix, weight_matrix
from sparsify.passes.base import LayerPass, LayerPassConfig

_NM = re.compile(r"^(\d+):(\d+)$")


class PruneConfig(LayerPassConfig):
    type: Literal["prune"] = "prune"
    method: Literal["magnitude", "wanda", "ria", "sparsegpt"] = "wanda"
    sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="fraction of weights set to zero")
    pattern: str = Field("unstructured", description="'unstructured' or 'N:M' (N non-zeros in every M inputs)")
    profile: Literal["uniform", "owl"] = "uniform"
    owl_threshold: float = Field(5.0, gt=0, description="OWL outlier threshold M: score > M x layer mean")
    owl_lambda: float = Field(
        0.08, ge=0.0, lt=0.5, description="OWL: layer sparsities span 2 x lambda around the target"
    )
    blocksize: int = Field(128, gt=0, description="SparseGPT: columns solved per block")
    dampening: float = Field(0.01, gt=0.0, description="SparseGPT: fraction of mean diag(H) added to H")
    dense_targets: bool = Field(
        False, description="SparseGPT: reconstruct the dense model's outputs, correcting upstream pruning error"
    )

    @model_validator(mode="after")
    def _check(self) -> PruneConfig:
        if self.pattern != "unstructured":
            match = _NM.match(self.pattern)
            if not match:
                raise ValueError(f"pattern must be 'unstructured' or 'N:M' like '2:4', got {self.pattern!r}")
            n, m = int(match[1]), int(match[2])
            if not 0 < n < m:
                raise ValueError(f"pattern {self.pattern}: N:M needs 0 < N < M")
            implied = 1 - n / m
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-6:
                raise ValueError(f"sparsity {self.sparsity} contradicts pattern {self.pattern} (implies {implied:g})")
            if self.profile == "owl":
                raise ValueError("profile 'owl' applies to unstructured sparsity only")
        elif self.sparsity is None:
            raise ValueError("unstructured pruning needs a sparsity in [0, 1)")
        if self.dense_targets and self.method != "sparsegpt":
            raise ValueError("dense_targets needs method 'sparsegpt' (it changes the weight update)")
        if self.dense_targets and self.sequential:
            raise ValueError("dense_targets and sequential cannot be combined yet")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        match = _NM.match(self.pattern)
        return (int(match[1]), int(match[2])) if match else None

    @property
    def target_sparsity(self) -> float:
        nm = self.nm
        return 1 - nm[0] / nm[1] if nm else float(self.sparsity or 0.0)


class PrunePass(LayerPass):
    config_cls = PruneConfig
    config: PruneConfig

    def __init__(self, config: PruneConfig, index: int, stages: list[tuple[str, ...]] | None = None):
        super().__init__(config, index, stages)
        self.needs_data = config.method != "magnitude"  # type: ignore[misc]
        self.needs_hessian = config.method == "sparsegpt"
        self.needs_dense_path = config.dense_targets
        self.layer_sparsity: list[float] | None = None  # set by OWL

    def describe(self) -> str:
        c = self.config
        amount = c.pattern if c.nm else f"{c.target_sparsity:.0%}"
        return f"prune {c.method} {amount}" + (" owl" if c.profile == "owl" else "")

    def validate(self, targets: dict[int, dict[str, nn.Module]]) -> None:
        """Refuse a sparsity that rounds a whole row of some target to zero (no method then keeps anything)."""
        c = self.config
        if c.nm:
            return
        # OWL moves layers up to 2 x lambda above the target (capped at 0.99 as its reference code does)
        highest = min(c.target_sparsity + 2 * c.owl_lambda, 0.99) if c.profile == "owl" else c.target_sparsity
        for layer_targets in targets.values():
            for fqn, module in layer_targets.items():
                n_in = in_features(module)
                if round(highest * n_in) >= n_in:
                    owl = " (OWL can raise a layer to that)" if c.profile == "owl" else ""
                    raise SparsifyError(
                        f"sparsity {highest:g}{owl} would zero every weight of a row of {fqn} ({n_in} inputs);"
                        f" at most {(n_in - 1) / n_in:.4f} keeps one weight per row"
                    )

    def prepare(self, runner: LayerwiseRunner, targets: dict[int, dict[str, nn.Module]]) -> None:
        if self.config.profile != "owl":
            return
        threshold = self.config.owl_threshold

        def layer_ratio(_i: int, layer_targets: dict[str, nn.Module], stats: dict[str, LinearStats]) -> float:
            scores = [wanda_scores(weight_matrix(m).float(), stats[f].sq_norm) for f, m in layer_targets.items()]
            return outlier_ratio(scores, threshold) if scores else 0.0

        ratios = runner.observe(targets, layer_ratio, "OWL outlier statistics")
        self.outlier_ratios = ratios
        self.layer_sparsity = owl_layer_sparsities(ratios, self.config.target_sparsity, self.config.owl_lambda)

    def compress(
        self, layer_index: int, targets: dict[str, nn.Module], stats: dict[str, LinearStats]
    ) -> list[dict[str, Any]]:
        c = self.config
        nm = c.nm
        sparsity = self.layer_sparsity[layer_index] if self.layer_sparsity else c.target_sparsity
        records = []
        for fqn, module in targets.items():
            t0 = time.perf_counter()
            W = weight_matrix(module).float()  # (out, in)
            record: dict[str, Any] = {
                "name": fqn,
                "layer": layer_index,
                "pass": self.index,
                "method": c.method,
                "pattern": c.pattern,
                "shape": list(W.shape),
                "target_sparsity": sparsity,
            }
            if nm and W.shape[1] % nm[1]:
                record.update(status=f"skipped: {W.shape[1]} inputs are not a multiple of M={nm[1]}", sparsity=None)
                records.append(record)
                continue
            W_new = self._prune(fqn, W, stats.get(fqn), sparsity, nm)
            set_weight_matrix(module, W_new)
            record.update(
                status="pruned",
                sparsity=float((weight_matrix(module) == 0).float().mean()),
                seconds=time.perf_counter() - t0,
            )
            records.append(record)
        return records

    def _prune(
        self, fqn: str, W: torch.Tensor, stats: LinearStats | None, sparsity: float, nm: tuple[int, int] | None
    ) -> torch.Tensor:
        method = self.config.method
        if method == "magnitude":
            return W * magnitude_mask(W, sparsity, nm)
        assert stats is not None  # the loop collects statistics for every data-driven pass
        if stats.tokens == 0:
            raise SparsifyError(f"{fqn}: saw no calibration tokens")
        if method == "sparsegpt":
            assert stats.hessian is not None
            H = stats.hessian / stats.tokens
            try:
                if stats.cross is not None:
                    W = dense_output_target(W, stats.cross / stats.tokens, H, self.config.dampening)
                W_new, _ = sparsegpt_prune(
                    W, H, sparsity, nm, self.config.blocksize, self.config.dampening, inplace=True
                )
            except ValueError as e:
                raise SparsifyError(f"{fqn}: {e}") from e
            return W_new
        scorer = wanda_scores if method == "wanda" else ria_scores
        scores = scorer(W, stats.sq_norm / stats.tokens)  # (out, in)
        keep = nm_mask(scores, *nm) if nm else unstructured_mask(scores, sparsity, "row")
        return W * keep
