"""Attention-pattern swap: native configs where a runtime knows the pattern, sparsify.load otherwise.

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
Patterns no runtime knows (sinks, block-sparse, encoder-local, and a window on a family without a native
one) are written as ``attn_implementation: sparsify`` plus a per-layer ``sparsify_attention`` section, which
:func:`sparsify.load` runs (``sparsify/runtime/``) and plain transformers refuses to load.
"""

from __future__ import annotations

import functools
from typing import Any

from sparsify.algorithms.attention_masks import LayerPattern, attention_fraction, pattern_mask
from sparsify.arch import lookup, supported_list
from sparsify.errors import SparsifyError
from sparsify.passes.attention_config import AttentionConfig
from sparsify.passes.base import Pass, register
from sparsify.runtime.format import CONFIG_KEY, unwrap_config, wrap_config

FLOPS_AT = 4096  # sequence length at which the report states the attention-FLOPs fraction

_LLAMA_ONLY_KEYS = ("attention_bias", "mlp_bias", "pretraining_tp")


def _shape(p: LayerPattern) -> str:
    """A pattern's size for the report: window and sinks, or block layout."""
    if p.block_size:
        extra = [f"{n} {k}" for k, n in (("global", p.global_blocks), ("random", p.random_blocks)) if n]
        return f"block {p.block_size}" + (f", {', '.join(extra)}" if extra else "")
    if p.window:
        return f"window {p.window}" + (f" + {p.sinks} sinks" if p.sinks else "")
    return "—"


@functools.lru_cache(maxsize=64)
def _fraction(p: LayerPattern, length: int, causal: bool) -> float:
    """Attended (query, key) pairs relative to dense attention at ``length`` tokens."""
    if p.pattern == "full":
        return 1.0
    return attention_fraction(pattern_mask(p, length, length, causal), causal)


def _layers_positions_types(cfg: dict[str, Any]) -> tuple[int, int | None, list[str] | None]:
    """Layer count, context length and layer types, under each family's own key names (``n_layer``, ...)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(**cfg)
    positions = getattr(config, "max_position_embeddings", None)
    types = getattr(config, "layer_types", None)
    return int(config.num_hidden_layers), int(positions) if positions else None, list(types) if types else None


def layer_types(num_layers: int, global_every: int) -> list[str]:
    """``full_attention`` on every ``global_every``-th layer (the last of each group), sliding elsewhere."""
    return [
        "full_attention" if global_every and (i + 1) % global_every == 0 else "sliding_attention"
        for i in range(num_layers)
    ]


@register("attention")
class AttentionPass(Pass):
    """Rewrites the config's attention pattern; weights pass through unchanged."""

    config_cls = AttentionConfig
    config: AttentionConfig
    requires = frozenset()  # the config only: quantized or MoE models take a pattern too
    eval_lengths = (512, 2048)  # a pattern shows at contexts longer than its window
    kind = "attention"
    title = "Attention, per layer"
    columns = (
        ("name", "layer", "text"),
        ("pattern", "pattern", "text"),
        ("shape", "shape", "text"),
        ("flops_fraction", "FLOPs vs dense", "pct"),
        ("status", "status", "text"),
    )

    def __init__(self, config: AttentionConfig, index: int, arch=None):
        super().__init__(config, index, arch)
        self._records: list[dict[str, Any]] = []
        self._notes: list[str] = []

    def edit_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        new, self._records, self._notes = self.apply(cfg)
        return new

    def config_records(self) -> list[dict[str, Any]]:
        return self._records

    def notes(self) -> list[str]:
        return self._notes

    @classmethod
    def summary(cls, records: list[dict[str, Any]]) -> list[tuple[str, str, str | None, Any]]:
        changed = [r for r in records if r["pattern"] != "full"]
        if not records or not changed:
            return []
        mean = sum(r["flops_fraction"] for r in records) / len(records)
        text = (
            f"{len(changed)}/{len(records)} layers {changed[0]['pattern']} ({changed[0]['shape']}),"
            f" {mean:.1%} of dense attention FLOPs at {records[0]['flops_at']} tokens, {records[0]['status']}"
        )
        return [("attention", text, "attention_flops_fraction", mean)]

    def describe(self) -> str:
        c = self.config
        if c.pattern == "block-sparse":
            shape = f"block {c.block_size}, {c.global_blocks} global, {c.random_blocks} random"
        else:
            shape = f"window {c.window}" + (f" + {c.sinks} sinks" if c.sinks else "")
        extra = f", 1 in {c.global_every} layers full" if c.global_every else ""
        return f"attention {c.pattern} {shape}{extra}"

    def apply(self, cfg: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
        """The new config dict, one report record per layer, and notes."""
        c = self.config
        notes: list[str] = []
        if CONFIG_KEY in cfg:
            notes.append(f"pass {self.index}: replaces the checkpoint's earlier sparsify attention patterns")
            cfg = unwrap_config(cfg)
        model_type = cfg.get("model_type", "?")
        arch = lookup(model_type)
        if arch is None:
            raise SparsifyError(
                f"attention patterns need a known family; model_type {model_type!r} is not one of {supported_list()}"
            )
        n, positions, own_types = _layers_positions_types(cfg)
        self._check_fits(model_type, arch.causal, positions)
        types = layer_types(n, c.global_every)
        if all(t == "full_attention" for t in types):
            raise SparsifyError(f"global_every={c.global_every} leaves no windowed layer among {n}")
        patterns = [c.layer_pattern(i) if t == "sliding_attention" else LayerPattern() for i, t in enumerate(types)]
        style = arch.window_config if c.pattern == "sliding-window" else None
        if style and arch.layer_type_settings and own_types is not None and types != own_types:
            # Gemma 3's layer types also choose each layer's RoPE: moving a layer to another type would
            # change its positions' encoding, so the model's own types stay and sparsify runs the windows.
            notes.append(
                f"pass {self.index}: {model_type}'s layer types also set {', '.join(arch.layer_type_settings)};"
                f" windows on other layers than its own sliding ones keep every layer's settings through"
                f" sparsify.load (--global-every matching the model's own pattern stays native)"
            )
            style = None
        if style is not None:
            new, runtime = self._native(cfg, style, types, int(c.window or 0))
            status = f"native: {runtime}"
        else:
            new = wrap_config(cfg, patterns, arch.causal, positions)
            runtime = "sparsify.load"
            status = "sparsify: needs sparsify.load"
        length = min(FLOPS_AT, positions or FLOPS_AT)
        records = [
            {
                "kind": self.kind,
                "name": f"{arch.layers}.{i}",
                "layer": i,
                "pass": self.index,
                "method": "attention",
                "pattern": p.pattern,
                "window": p.window,
                "sinks": p.sinks or None,
                "block_size": p.block_size,
                "global_blocks": p.global_blocks if p.block_size else None,
                "random_blocks": p.random_blocks if p.block_size else None,
                "shape": _shape(p),
                "flops_fraction": _fraction(p, length, arch.causal),
                "flops_at": length,
                "status": status,
            }
            for i, p in enumerate(patterns)
        ]
        mean = sum(r["flops_fraction"] for r in records) / n
        dense = "causal" if arch.causal else "bidirectional"
        notes.append(
            f"pass {self.index}: {self.describe()} written for {runtime}; attention FLOPs {mean:.1%} of {dense}"
            f" dense at {length} tokens"
        )
        if style is None:
            notes.append(
                f"pass {self.index}: load the output with sparsify.load(OUT); its model_type"
                f" {new['model_type']!r} is sparsify's own, so plain transformers and vLLM refuse it rather than"
                " run dense attention"
            )
        return new, records, notes

    def _check_fits(self, model_type: str, causal: bool, positions: int | None) -> None:
        c = self.config
        if not causal and c.pattern in ("sliding-window", "sinks"):
            raise SparsifyError(
                f"pattern {c.pattern} is causal and {model_type} is an encoder (bidirectional);"
                " use --pattern local or --pattern block-sparse"
            )
        if causal and c.pattern == "local":
            raise SparsifyError(
                f"pattern local is bidirectional, for encoders; {model_type} is causal: use --pattern sliding-window"
            )
        if c.pattern == "block-sparse" and positions and positions % int(c.block_size or 1):
            raise SparsifyError(
                f"block_size {c.block_size} does not divide max_position_embeddings {positions}:"
                " blocks must tile the model's context"
            )

    def _native(self, cfg: dict[str, Any], style: str, types: list[str], window: int) -> tuple[dict[str, Any], str]:
        uniform = all(t == "sliding_attention" for t in types)
        if style == "mistral":
            bad = [k for k in ("attention_bias", "mlp_bias") if cfg.get(k)]
            if bad:
                raise SparsifyError(f"{cfg['model_type']} with {bad[0]}=true has no Mistral equivalent")
            new = {k: v for k, v in cfg.items() if k not in _LLAMA_ONLY_KEYS and k != "layer_types"}
            new.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=window)
            if uniform:
                return new, "mistral"
            # transformers loads model_type mistral with layer_types as Ministral (per-layer windows);
            # vLLM runs MistralForCausalLM with its Llama code, which honours layer_types too.
            new["layer_types"] = types
            return new, "mistral with layer_types (transformers: Ministral)"
        if style == "qwen":
            new = {**cfg, "use_sliding_window": True, "sliding_window": window, "layer_types": types}
            new["max_window_layers"] = 0
            return new, cfg["model_type"]
        if style == "layer_types":
            return {**cfg, "sliding_window": window, "layer_types": types}, cfg["model_type"]
        if not uniform:
            raise SparsifyError(f"{cfg['model_type']} has one sliding_window for all layers; drop global_every")
        switch = {"use_sliding_window": True} if "use_sliding_window" in cfg else {}  # Qwen3-MoE reads it too
        return {**cfg, "sliding_window": window, **switch}, cfg["model_type"]
