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

import re
import time
from typing import TYPE_CHECKING, Any, Literal

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
from sparsify.errors import SparsifyError
from sparsify.modules import in_features, set_weight_matrix, weight_matrix
from sparsify.passes.base import LayerPassConfig, Pass, register
from sparsify.statistics import InputStats

if TYPE_CHECKING:
    from sparsify.arch import Arch
    from sparsify.calibration import LayerwiseRunner, LayerWork

_NM = re.compile(r"^(\d+):(\d+)$")
STRUCTURED_METRICS = {"channels": ("magnitude", "wanda", "flap"), "heads": ("magnitude", "wanda", "flap"),
                      "layers": ("block-influence", "angular")}  # fmt: skip
UNSTRUCTURED_ONLY = ("method", "sparsity", "pattern", "profile", "owl_threshold", "owl_lambda", "blocksize",
                     "dampening", "dense_targets", "sequential")  # fmt: skip
STRUCTURED_ONLY = ("ratio", "remove", "metric", "bias_compensation", "refit", "multiple_of")


class PruneConfig(LayerPassConfig):
    type: Literal["prune"] = "prune"
    method: Literal["magnitude", "wanda", "ria", "sparsegpt"] = Field("wanda", description="importance score / solver")
    sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="fraction of weights set to zero")
    pattern: str = Field("unstructured", description="'unstructured' or 'N:M' (N non-zeros in every M inputs)")
    profile: Literal["uniform", "owl"] = Field(
        "uniform",
        description="the same sparsity in every layer, or OWL's outlier-weighted layer sparsities",
        json_schema_extra={"flag": "--sparsity-profile"},
    )
    owl_threshold: float = Field(5.0, gt=0, description="OWL outlier threshold M: score > M x layer mean")
    owl_lambda: float = Field(
        0.08, ge=0.0, lt=0.5, description="OWL: layer sparsities span 2 x lambda around the target"
    )
    blocksize: int = Field(128, gt=0, description="SparseGPT: columns solved per block")
    dampening: float = Field(0.01, gt=0.0, description="SparseGPT: fraction of mean diag(H) added to H")
    dense_targets: bool = Field(
        False, description="SparseGPT: reconstruct the dense model's outputs, correcting upstream pruning error"
    )
    structured: Literal["channels", "heads", "layers"] | None = Field(
        None, description="remove whole FFN channels, attention heads (KV groups) or layers instead"
    )
    ratio: float | None = Field(None, ge=0.0, lt=1.0, description="channels/heads: fraction removed")
    remove: int | None = Field(None, ge=1, description="layers: how many to remove")
    metric: str | None = Field(
        None,
        description="structured importance: magnitude|wanda|flap (channels, heads), block-influence|angular (layers)",
    )
    bias_compensation: bool = Field(False, description="fold removed channels' mean output into the bias (FLAP)")
    refit: bool = Field(
        False, description="structured: least-squares refit of the output projection on the kept inputs"
    )
    multiple_of: int = Field(8, ge=1, description="channels: kept width rounded to a multiple of this")

    def inapplicable(self) -> dict[str, str]:
        if self.structured is not None:
            out = {k: f"applies to unstructured pruning, not structured {self.structured}" for k in UNSTRUCTURED_ONLY}
            out.update(dict.fromkeys(("targets", "ignore"), "does not apply to structured pruning: it changes every"
                                     " layer alike (one width keeps the config native)"))  # fmt: skip
            if self.structured == "layers":
                out.update(dict.fromkeys(("ratio", "bias_compensation", "refit", "multiple_of"),
                                         "does not apply to structured layers (it takes remove)"))  # fmt: skip
            else:
                out["remove"] = f"applies to structured layers, not {self.structured}"
            if self.structured == "heads":
                out["multiple_of"] = "applies to structured channels (heads go in whole KV groups)"
            return out
        out = {k: "applies to structured pruning (structured: channels|heads|layers)" for k in STRUCTURED_ONLY}
        if self.profile != "owl":
            out.update(dict.fromkeys(("owl_threshold", "owl_lambda"), "applies to profile owl"))
        if self.method != "sparsegpt":
            out.update(dict.fromkeys(("blocksize", "dampening", "dense_targets"), "applies to method sparsegpt"))
        return out

    @model_validator(mode="after")
    def _check(self) -> PruneConfig:
        if self.structured is not None:
            return self._check_structured()
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
        if self.dense_targets and self.sequential:
            raise ValueError("dense_targets and sequential cannot be combined yet")
        return self

    def _check_structured(self) -> PruneConfig:
        metrics = STRUCTURED_METRICS[self.structured]
        if self.metric is not None and self.metric not in metrics:
            raise ValueError(f"metric for structured {self.structured} must be one of {', '.join(metrics)}")
        if self.structured == "layers" and self.remove is None:
            raise ValueError("structured layers needs remove (how many layers)")
        if self.structured != "layers" and self.ratio is None:
            raise ValueError(f"structured {self.structured} needs a ratio in [0, 1)")
        return self

    @property
    def structured_metric(self) -> str:
        assert self.structured is not None
        return self.metric or ("block-influence" if self.structured == "layers" else "wanda")

    @property
    def nm(self) -> tuple[int, int] | None:
        match = _NM.match(self.pattern)
        return (int(match[1]), int(match[2])) if match else None

    @property
    def target_sparsity(self) -> float:
        nm = self.nm
        return 1 - nm[0] / nm[1] if nm else float(self.sparsity or 0.0)


@register("prune")
class PrunePass(Pass):
    """Unstructured or N:M pruning of the target Linears (zeros stored dense)."""

    config_cls = PruneConfig
    command = "prune"
    command_help = (
        "Prune a model: unstructured or N:M (magnitude, Wanda, RIA, SparseGPT; zeros stored dense), or structured"
        " (FFN channels, attention head groups, whole layers; physically removed, a smaller config)."
    )
    command_examples = (
        "Examples: sparsify prune ./model -o ./model-2of4 --method sparsegpt --pattern 2:4;"
        " sparsify prune ./model -o ./model-ffn80 --structured channels --ratio 0.2 --metric flap --bias-compensation"
    )
    config: PruneConfig
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
        if config.structured is not None:
            from sparsify.passes.structured import StructuredPrunePass

            return StructuredPrunePass(config, index, arch)
        return cls(config, index, arch)

    def __init__(self, config: PruneConfig, index: int, arch: Arch | None = None):
        super().__init__(config, index, arch)
        method = config.method
        self.needs = (
            frozenset() if method == "magnitude" else frozenset({"hessian" if method == "sparsegpt" else "sq_norm"})
        )
        self.needs_dense_path = config.dense_targets
        self.needs_data = method != "magnitude" or config.profile == "owl"
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
        self, fqn: str, W: torch.Tensor, stats: InputStats | None, sparsity: float, nm: tuple[int, int] | None
    ) -> torch.Tensor:
        method = self.config.method
        if method == "magnitude":
            return W * magnitude_mask(W, sparsity, nm)
        if stats is None or stats.tokens == 0:
            raise SparsifyError(f"{fqn}: saw no calibration tokens")
        if method == "sparsegpt":
            H = stats.mean("hessian")
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
        scores = scorer(W, stats.mean("sq_norm"))  # (out, in)
        keep = nm_mask(scores, *nm) if nm else unstructured_mask(scores, sparsity, "row")
        return W * keep
