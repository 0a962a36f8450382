"""Attention-pattern swap, written as configs that runtimes load natively.

```yaml
- type: attention
  pattern: sliding-window   # sliding-window | sinks | block-sparse | local
  window: 1024
  global_every: 4           # keep every 4th layer full attention (0: none)
```

A sliding window becomes the model family's own configuration: Llama → Mistral (uniform) or
Ministral (per-layer ``layer_types``), Qwen2/Qwen3 ``use_sliding_window`` + ``layer_types``, Gemma 2/3
``sliding_window`` + ``layer_types``, Phi-3 ``sliding_window``. The weights are not touched;
``AutoModelForCausalLM.from_pretrained(out)`` then runs the windowed attention with no sparsify code.
Patterns no runtime knows (sinks, block-sparse, encoder-local) are refused with a clear error until
sparsify's own attention function ships (see docs/methods/attention.md).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from sparsify.algorithms.attention_masks import attention_fraction, causal_mask, sliding_window_mask
from sparsify.errors import SparsifyError
from sparsify.passes.base import ConfigPass, PassConfig

FLOPS_AT = 4096  # sequence length at which the report states the attention-FLOPs fraction

# How each family expresses a sliding window natively (architecture knowledge as data).
NATIVE_WINDOW: dict[str, str] = {
    "llama": "mistral",  # same weights and module names; Mistral / Ministral configs carry the window
    "mistral": "mistral",
    "qwen2": "qwen",
    "qwen3": "qwen",
    "gemma2": "layer_types",
    "gemma3_text": "layer_types",
    "phi3": "uniform",
}
_LLAMA_ONLY_KEYS = ("attention_bias", "mlp_bias", "pretraining_tp")


class AttentionConfig(PassConfig):
    type: Literal["attention"] = "attention"
    pattern: Literal["sliding-window", "sinks", "block-sparse", "local"] = "sliding-window"
    window: int | None = Field(None, ge=1, description="keys each query sees (sliding-window, sinks, local)")
    sinks: int = Field(0, ge=0, description="leading tokens every query sees (StreamingLLM)")
    global_every: int = Field(0, ge=0, description="keep every N-th layer full attention (0: none)")
    block_size: int | None = Field(None, ge=1, description="block-sparse: tokens per block")
    global_blocks: int = Field(1, ge=0)
    random_blocks: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> AttentionConfig:
        if self.pattern in ("sliding-window", "sinks", "local") and self.window is None:
            raise ValueError(f"pattern {self.pattern} needs a window >= 1")
        if self.pattern == "block-sparse" and self.block_size is None:
            raise ValueError("pattern block-sparse needs block_size")
        if self.pattern == "sinks" and self.sinks < 1:
            raise ValueError("pattern sinks needs sinks >= 1")
        return self


def layer_types(num_layers: int, global_every: int) -> list[str]:
    """``full_attention`` on every ``global_every``-th layer (the last of each group), sliding elsewhere."""
    return [
        "full_attention" if global_every and (i + 1) % global_every == 0 else "sliding_attention"
        for i in range(num_layers)
    ]


class AttentionPass(ConfigPass):
    config_cls = AttentionConfig
    config: AttentionConfig

    def describe(self) -> str:
        c = self.config
        extra = f", every {c.global_every}th layer full" if c.global_every else ""
        return f"attention {c.pattern} window {c.window}{extra}"

    def apply(self, cfg: dict[str, Any], layers_path: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
        c = self.config
        model_type = cfg.get("model_type", "?")
        if c.pattern != "sliding-window":
            raise SparsifyError(
                f"pattern {c.pattern} has no native config in any runtime and sparsify's own attention function"
                " is not available yet; use --pattern sliding-window"
            )
        style = NATIVE_WINDOW.get(model_type)
        if style is None:
            kind = "an encoder (use --pattern local)" if model_type == "bert" else "a family without a native window"
            raise SparsifyError(
                f"sliding-window on model_type {model_type!r}: {kind}; native sliding windows exist for "
                + ", ".join(sorted(NATIVE_WINDOW))
            )
        n = int(cfg["num_hidden_layers"])
        types = layer_types(n, c.global_every)
        if all(t == "full_attention" for t in types):
            raise SparsifyError(f"global_every={c.global_every} leaves no windowed layer among {n}")
        window = int(c.window or 0)
        new, runtime = self._native(cfg, style, types, window)
        fraction = attention_fraction(sliding_window_mask(FLOPS_AT, window)) if window < FLOPS_AT else 1.0
        records = [
            {
                "name": f"{layers_path}.{i}",
                "layer": i,
                "pass": self.index,
                "method": "attention",
                "pattern": "sliding-window" if t == "sliding_attention" else "full",
                "window": window if t == "sliding_attention" else None,
                "flops_fraction": fraction if t == "sliding_attention" else 1.0,
                "status": f"native: {runtime}",
            }
            for i, t in enumerate(types)
        ]
        mean = sum(r["flops_fraction"] for r in records) / n
        notes = [
            f"pass {self.index}: {self.describe()} written as a native {runtime} config; attention FLOPs"
            f" {mean:.1%} of dense at {FLOPS_AT} tokens ({attention_fraction(causal_mask(8)):.0%} = causal dense)"
        ]
        return new, records, notes

    def _native(self, cfg: dict[str, Any], style: str, types: list[str], window: int) -> tuple[dict[str, Any], str]:
        uniform = all(t == "sliding_attention" for t in types)
        if style == "mistral":
            bad = [k for k in ("attention_bias", "mlp_bias") if cfg.get(k)]
            if bad:
                raise SparsifyError(f"{cfg['model_type']} with {bad[0]}=true has no Mistral equivalent")
            new = {k: v for k, v in cfg.items() if k not in _LLAMA_ONLY_KEYS and k != "layer_types"}
            if uniform:
                new.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=window)
                return new, "mistral"
            new.update(
                model_type="ministral", architectures=["MinistralForCausalLM"], sliding_window=window, layer_types=types
            )
            return new, "ministral"
        if style == "qwen":
            new = {**cfg, "use_sliding_window": True, "sliding_window": window, "layer_types": types}
            new["max_window_layers"] = 0
            return new, cfg["model_type"]
        if style == "layer_types":
            return {**cfg, "sliding_window": window, "layer_types": types}, cfg["model_type"]
        if not uniform:
            raise SparsifyError(f"{cfg['model_type']} has one sliding_window for all layers; drop global_every")
        return {**cfg, "sliding_window": window}, cfg["model_type"]
