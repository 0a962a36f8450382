"""The settings of a ``type: attention`` step (:mod:`sparsify.passes.attention`), importable without torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from sparsify.passes.base import PassConfig

if TYPE_CHECKING:
    from sparsify.algorithms.attention_masks import LayerPattern


class AttentionConfig(PassConfig):
    type: Literal["attention"] = "attention"
    command = "attention"
    command_help = (
        "Swap the attention pattern: sliding window, sinks + window (StreamingLLM), block-sparse, local (encoders)."
        " A sliding window on Llama, Mistral, Qwen2/3, Gemma 2/3 or Phi-3 becomes the family's native config (plain"
        " transformers and vLLM load it); the other patterns are written for sparsify.load(OUT)."
    )
    command_examples = (
        "Examples: sparsify attention ./llama -o ./llama-swa --window 1024 --global-every 4;"
        " sparsify attention ./llama -o ./llama-sinks --pattern sinks --window 1020 --sinks 4"
    )
    layerwise = False
    pattern: Literal["sliding-window", "sinks", "block-sparse", "local"] = Field(
        "sliding-window", description="attention pattern"
    )
    window: int | None = Field(None, ge=1, description="keys each query sees (sliding-window, sinks, local)")
    sinks: int = Field(0, ge=0, description="leading tokens every query sees (StreamingLLM)")
    global_every: int = Field(0, ge=0, description="keep every N-th layer full attention (0: none)")
    block_size: int | None = Field(None, ge=1, description="block-sparse: tokens per block")
    global_blocks: int = Field(1, ge=0, description="block-sparse: blocks every query sees (and that see all)")
    random_blocks: int = Field(0, ge=0, description="block-sparse: seeded random blocks per query block")

    def inapplicable(self) -> dict[str, str]:
        out = {}
        if self.pattern != "block-sparse":
            out.update(
                dict.fromkeys(("block_size", "global_blocks", "random_blocks"), "applies to pattern block-sparse")
            )
        if self.pattern != "sinks":
            out["sinks"] = f"applies to pattern sinks, not {self.pattern}"
        return out

    @model_validator(mode="after")
    def _check(self) -> AttentionConfig:
        if self.pattern in ("sliding-window", "sinks", "local") and self.window is None:
            raise ValueError(f"pattern {self.pattern} needs a window >= 1")
        if self.pattern == "block-sparse" and self.block_size is None:
            raise ValueError("pattern block-sparse needs block_size")
        if self.pattern == "sinks" and self.sinks < 1:
            raise ValueError("pattern sinks needs sinks >= 1")
        if self.pattern == "block-sparse" and self.window is not None:
            raise ValueError("pattern block-sparse takes block_size, not window")
        return self

    def layer_pattern(self, layer: int) -> LayerPattern:
        from sparsify.algorithms.attention_masks import LayerPattern

        if self.pattern == "block-sparse":
            return LayerPattern(
                "block-sparse",
                block_size=self.block_size,
                global_blocks=self.global_blocks,
                random_blocks=self.random_blocks,
                seed=layer,
            )
        return LayerPattern(self.pattern, window=self.window, sinks=self.sinks)
