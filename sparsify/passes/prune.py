"""Pruning: unstructured and N:M (magnitude, Wanda, RIA, SparseGPT, optional OWL profile) here, and
structured (channels, heads, whole layers) in :mod:`sparsify.passes.structured`, behind one ``type: prune``.

```yaml
- type: prune
  method: sparsegpt        # magnitude | wanda | ria | sparsegpt
  sparsity: 0.5            # unstructured only; N:M implies 1 - N/M
  pattern: "2:4"           # unstructured | N:M
  profile: uniform         # uniform | owl (unstructured only)
  targets: ["re:.*(q|k|v|o|gate|up|down)_proj"]
- type: prune
  structured: channels     # channels | heads | layers
  ratio: 0.25              # channels/heads: fraction removed
  metric: flap             # magnitude | wanda | flap (channels/heads); block-influence | angular (layers)
  bias_compensation: true
```
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparsify.algorithms import outlier_ratio, owl_layer_sparsities, wanda_scores
from sparsify.errors import SparsifyError
from sparsify.modules import in_features, set_weight_matrix, weight_matrix
from sparsify.passes.base import Pass, calibration_record, register, saw_no_tokens, variant_for
from sparsify.passes.prune_config import PruneConfig
from sparsify.passes.prune_methods import PRUNE_METHODS
from sparsify.statistics import InputStats

if TYPE_CHECKING:
    from sparsify.arch import Arch
    from sparsify.calibration import LayerwiseRunner, LayerWork


@register("prune")
class PrunePass(Pass):
    """Unstructured or N:M pruning of the target Linears (zeros stored dense)."""

    config_cls = PruneConfig
    config: PruneConfig
    leaves_zeros = True
    kind = "prune"
    title = "Pruning, per Linear"
    columns = (
        ("name", "Linear", "text"),
        ("shape", "shape", "shape"),
        ("method", "method", "text"),
        ("pattern", "pattern", "text"),
        ("sparsity", "sparsity", "pct"),
        ("rel_error", "rel. error", "err"),
        ("seconds", "time", "s"),
        ("status", "status", "text"),
    )

    @classmethod
    def build(cls, config: PruneConfig, index: int, arch: Arch | None = None) -> Pass:  # type: ignore[override]
        variant = variant_for("prune", config)  # structured pruning (sparsify.passes.structured)
        return (variant or cls)(config, index, arch)

    def __init__(self, config: PruneConfig, index: int, arch: Arch | None = None):
        super().__init__(config, index, arch)
        self.method = PRUNE_METHODS[config.method]
        self.needs = self.method.needs
        self.needs_dense_path = config.dense_targets
        self.needs_data = bool(self.method.needs) or config.profile == "owl"
        self.per_target = True  # each Linear pruned alone (OWL's per-layer sparsity is decided before the sweep)
        self.layer_sparsity: list[float] | None = None  # set by OWL
        self.outlier_ratios: list[float] | None = None

    def describe(self) -> str:
        c = self.config
        amount = c.pattern if c.nm else f"{c.target_sparsity:.0%} unstructured"
        return f"prune {c.method} {amount}" + (" (OWL)" if c.profile == "owl" else "")

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

    def prepare(self, runner: LayerwiseRunner) -> None:
        if self.config.profile != "owl":
            return
        threshold = self.config.owl_threshold

        def layer_ratio(work: LayerWork, _outputs: list[torch.Tensor]) -> float:
            scores = [wanda_scores(weight_matrix(m).float(), work.stats[f]["sq_norm"]) for f, m in work.targets.items()]
            return outlier_ratio(scores, threshold) if scores else 0.0

        def layer_targets(i: int, layer: nn.Module) -> dict[str, nn.Module]:
            return self.targets_in(layer, runner.prefix(i))

        ratios = runner.observe(layer_ratio, "OWL outlier statistics", layer_targets, {"sq_norm"})
        self.restore({"outlier_ratios": ratios})

    def decisions(self) -> dict[str, Any]:
        return {"outlier_ratios": self.outlier_ratios} if self.outlier_ratios is not None else {}

    def restore(self, decisions: dict[str, Any]) -> None:
        if "outlier_ratios" in decisions:
            self.outlier_ratios = [float(r) for r in decisions["outlier_ratios"]]
            c = self.config
            self.layer_sparsity = owl_layer_sparsities(self.outlier_ratios, c.target_sparsity, c.owl_lambda)

    def notes(self) -> list[str]:
        if self.layer_sparsity is None or self.outlier_ratios is None:
            return []
        sparsities = ", ".join(f"{s:.3f}" for s in self.layer_sparsity)
        ratios = ", ".join(f"{r:.4f}" for r in self.outlier_ratios)
        return [f"pass {self.index}: OWL layer sparsities {sparsities} (outlier ratios {ratios})"]

    @classmethod
    def summary(cls, records: list[dict[str, Any]]) -> list[tuple[str, str, str | None, Any]]:
        pruned = list({r["name"]: r for r in records if r.get("status") == "pruned"}.values())  # last pass per Linear
        params = sum(r["shape"][0] * r["shape"][1] for r in pruned)
        zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in pruned)
        sparsity = zeros / params if params else 0.0
        rows = [
            ("target Linears", f"{len(pruned)} pruned", "target_linears", len(pruned)),
            ("target sparsity", f"{sparsity:.1%}", "target_sparsity", sparsity),
            ("", "", "target_parameters", params),
            ("zeros", "stored dense: the file is as large as the dense one's", None, None),
        ]
        skipped = sorted({r["name"] for r in records if str(r.get("status", "")).startswith("skipped")})
        if skipped:
            rows.append(("skipped Linears", f"{len(skipped)}, see their status: {', '.join(skipped[:5])}", None, None))
        return rows

    def compress_layer(self, work: LayerWork) -> list[dict[str, Any]]:
        c = self.config
        nm = c.nm
        layer_index, targets, stats = work.index, work.targets, work.stats
        sparsity = self.layer_sparsity[layer_index] if self.layer_sparsity else c.target_sparsity
        records = []
        for fqn, module in targets.items():
            t0 = time.perf_counter()
            W = weight_matrix(module).float()  # (out, in)
            record: dict[str, Any] = {
                "kind": self.kind,
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
            blind = saw_no_tokens(self.method.needs, stats.get(fqn))
            W_new = self._prune(fqn, W, stats.get(fqn), sparsity, nm, blind)
            set_weight_matrix(module, W_new)
            record.update(calibration_record(stats.get(fqn), "magnitude" if blind else None))
            record.update(
                status="pruned",
                sparsity=float((weight_matrix(module) == 0).float().mean()),
                seconds=time.perf_counter() - t0,
            )
            records.append(record)
        return records

    def _prune(
        self,
        fqn: str,
        W: torch.Tensor,
        stats: InputStats | None,
        sparsity: float,
        nm: tuple[int, int] | None,
        blind: bool = False,
    ) -> torch.Tensor:
        """``W: (out, in)`` pruned by the config's method (:data:`~sparsify.passes.prune_methods.PRUNE_METHODS`);
        ``blind`` (a routed expert that saw no calibration token): by magnitude."""
        method = PRUNE_METHODS["magnitude"] if blind else self.method
        try:
            return method.prune(W, stats, sparsity, nm, self.config)
        except ValueError as e:
            raise SparsifyError(f"{fqn}: {e}") from e


__all__ = ["PruneConfig", "PrunePass"]
