"""The settings of a ``type: moe`` step (:mod:`sparsify.passes.moe`), importable without torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sparsify.passes.base import LayerPassConfig


class MoEConfig(LayerPassConfig):
    type: Literal["moe"] = "moe"
    command = "moe-convert"
    command_help = (
        "Convert each dense FFN into routed (and shared) experts with a router: a native Mixtral, Qwen2-MoE or"
        " Qwen3-MoE checkpoint that plain transformers and vLLM load."
    )
    command_examples = (
        "Examples: sparsify moe-convert ./llama -o ./llama-moe;"
        " sparsify moe-convert ./llama -o ./llama-moe --experts 16 --top-k 12 --shared 1"
    )
    experts: int = Field(8, ge=2, description="E: equal groups of the FFN's neurons")
    top_k: int = Field(
        6,
        ge=1,
        description="routed experts per token (the default, 6 of 8, keeps 75% of the FFN: on SmolLM2 1.44x"
        " dense perplexity; a quarter active collapses it without healing)",
    )
    shared: int = Field(0, ge=0, description="of the E groups, always-on shared experts (CMoE)")
    split: Literal["cluster", "coactivation", "random"] = Field(
        "coactivation", description="how neurons are grouped (cluster: from the weights alone, no data)"
    )
    router: Literal["centroid", "analytic", "trained"] = Field(
        "analytic", description="how the router is built (centroid: from the weights alone, no data)"
    )
    router_steps: int = Field(300, ge=1, description="trained router: Adam steps per layer")
    active_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="neurons counted active per token (co-activation, shared experts)"
    )
    seed: int = Field(0, description="seed of the split and the router", json_schema_extra={"flag": "--moe-seed"})

    def inapplicable(self) -> dict[str, str]:
        out = dict.fromkeys(("targets", "ignore", "sequential"), "does not apply: moe converts every layer's FFN whole")
        if self.router != "trained":
            out["router_steps"] = "applies to router trained"
        if self.split != "coactivation" and not self.shared:
            out["active_fraction"] = "applies to split coactivation or shared experts"
        return out

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.shared >= self.experts:
            raise ValueError(f"shared {self.shared} must be fewer than experts {self.experts} (some must be routed)")
        routed = self.experts - self.shared
        if self.top_k > routed:
            default = "" if "top_k" in self.model_fields_set else " (the default)"
            raise ValueError(f"top_k {self.top_k}{default} is more than the {routed} routed experts (experts - shared)")
        return self
