"""The config of a ``type: prune`` step, shared by the unstructured pass (:mod:`sparsify.passes.prune`) and
the structured one (:mod:`sparsify.passes.structured`); its method choices are the registries'
(:mod:`sparsify.passes.prune_methods`)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from sparsify.passes.base import LayerPassConfig
from sparsify.passes.prune_methods import PRUNE_METHODS, STRUCTURED

_NM = re.compile(r"^(\d+):(\d+)$")
UNSTRUCTURED_ONLY = ("method", "sparsity", "pattern", "profile", "owl_threshold", "owl_lambda", "blocksize",
                     "dampening", "dense_targets", "sequential")  # fmt: skip
STRUCTURED_ONLY = ("ratio", "remove", "metric", "bias_compensation", "refit", "multiple_of")


class PruneConfig(LayerPassConfig):
    type: Literal["prune"] = "prune"
    command = "prune"
    command_help = (
        "Prune a model: unstructured or N:M (magnitude, Wanda, RIA, SparseGPT; zeros stored dense), or structured"
        " (FFN channels, attention head groups, whole layers; physically removed, a smaller config)."
    )
    command_examples = (
        "Examples: sparsify prune ./model -o ./model-2of4 --method sparsegpt --pattern 2:4;"
        " sparsify prune ./model -o ./model-ffn80 --structured channels --ratio 0.2 --metric flap --bias-compensation"
    )
    method: Literal[tuple(PRUNE_METHODS)] = Field("wanda", description="importance score / solver")
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
    structured: Literal[tuple(STRUCTURED)] | None = Field(
        None, description="remove whole FFN channels, attention heads (KV groups) or layers instead"
    )
    ratio: float | None = Field(None, ge=0.0, lt=1.0, description="channels/heads: fraction removed")
    remove: int | None = Field(None, ge=1, description="layers: how many to remove")
    metric: str | None = Field(
        None,
        description=f"structured importance: {'|'.join(STRUCTURED['channels'].metrics)} (channels, heads),"
        f" {'|'.join(STRUCTURED['layers'].metrics)} (layers)",
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
        out = {k: f"applies to structured pruning (structured: {'|'.join(STRUCTURED)})" for k in STRUCTURED_ONLY}
        if self.profile != "owl":
            out.update(dict.fromkeys(("owl_threshold", "owl_lambda"), "applies to profile owl"))
        own = PRUNE_METHODS[self.method].options
        for other in PRUNE_METHODS.values():
            out.update({k: f"applies to method {other.name}" for k in other.options if k not in own})
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
        metrics = STRUCTURED[self.structured].metrics
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
        return self.metric or STRUCTURED[self.structured].default_metric

    @property
    def nm(self) -> tuple[int, int] | None:
        match = _NM.match(self.pattern)
        return (int(match[1]), int(match[2])) if match else None

    @property
    def target_sparsity(self) -> float:
        nm = self.nm
        return 1 - nm[0] / nm[1] if nm else float(self.sparsity or 0.0)
