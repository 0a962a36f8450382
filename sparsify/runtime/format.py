"""The sparsify-attention checkpoint format: attention patterns no runtime knows natively.

A checkpoint written with such a pattern is a model type of its own, so that no runtime that does not
know it can run it with dense attention by mistake. Its ``config.json`` is the base family's config with::

    "model_type": "sparsify_llama",                       # not a transformers model type: plain
    "architectures": ["SparsifyLlamaForCausalLM"],        # from_pretrained and vLLM refuse it loudly
    "attn_implementation": "sparsify",
    "sparsify_attention": {"format": 2, "causal": true,
                           "base": {"model_type": "llama", "architectures": [...], ...},
                           "layers": [{"pattern": "sinks", "window": 1020, "sinks": 4}, ...]}

``base`` holds every config field the wrapper changed, so the original config can be restored exactly.
``sparsify.load`` (:mod:`sparsify.loading`) registers ``sparsify_<family>`` with transformers' Auto classes as a
subclass of the family's own config and model classes (same modules, same weights, the family's key
renamings; :func:`register_model_type`), registers the ``sparsify`` attention function
(:func:`sparsify.runtime.attention.register`), and returns the model. The function builds
each layer's pattern mask, intersects it with transformers' own padding/causal mask and runs SDPA (or
eager maths when the model uses logit soft-capping). A family's own sliding window (Gemma 2/3,
Qwen2/3) is widened to the whole context in such a checkpoint: every layer's attention is exactly its
pattern, and its layer types (which also choose Gemma 3's RoPE) are the model's own. Windowed layers
decode with a bounded cache (:class:`~sparsify.runtime.cache.WindowCacheLayer`: the first ``sinks`` keys plus the last
``window - 1``).

Cache and mask agree through one rule: a bounded layer returns its kept sinks followed by a contiguous run
of keys ending at the newest query, so the pattern is evaluated as if the returned keys were contiguous.
Distances inside the run are exact, sinks are visible to every later query, and evicted keys are outside
every current query's window; transformers' mask columns are picked to match the same keys.

Format 1 checkpoints (sparsify 0.1 before this change: the family's own model type with
``attn_implementation: sparsify``) still load.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

from sparsify.algorithms.attention_masks import LayerPattern
from sparsify.arch import SPARSIFY_TYPE_PREFIX
from sparsify.errors import SparsifyError

IMPLEMENTATION = "sparsify"  # the attn_implementation name written into configs
CONFIG_KEY = "sparsify_attention"
FORMAT = 2
FORMATS = (1, 2)
TYPE_PREFIX = SPARSIFY_TYPE_PREFIX  # model_type of a checkpoint only sparsify runs: sparsify_<family>
ARCH_PREFIX = "Sparsify"


def base_model_type(model_type: str) -> str:
    """The family behind a sparsify model type (``sparsify_llama`` → ``llama``); others unchanged."""
    return model_type.removeprefix(TYPE_PREFIX)


def wrap_config(
    base: dict[str, Any], patterns: list[LayerPattern], causal: bool, context: int | None
) -> dict[str, Any]:
    """The config of a checkpoint whose attention only sparsify runs (see the module docstring)."""
    changed = {k: base.get(k) for k in ("model_type", "architectures", "attn_implementation", "sliding_window")}
    new = dict(base)
    new["model_type"] = TYPE_PREFIX + base["model_type"]
    new["architectures"] = [ARCH_PREFIX + a for a in base.get("architectures") or []]
    new["attn_implementation"] = IMPLEMENTATION
    if base.get("sliding_window") is not None:
        new["sliding_window"] = int(context or 1 << 20)  # the family's own window never cuts: the patterns do
    new[CONFIG_KEY] = {
        "format": FORMAT,
        "causal": causal,
        "base": changed,
        "layers": [{k: v for k, v in dataclasses.asdict(p).items() if v} for p in patterns],
    }
    return new


def unwrap_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The base family's config of a sparsify-attention checkpoint (any other config unchanged)."""
    section = cfg.get(CONFIG_KEY)
    if not isinstance(section, dict):
        return cfg
    base = {k: v for k, v in cfg.items() if k != CONFIG_KEY}
    for key, value in (section.get("base") or {"attn_implementation": None}).items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


@functools.cache
def register_model_type(model_type: str) -> None:
    """Make ``sparsify_<family>`` a transformers model type: subclasses of the family's config and model classes."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    base = base_model_type(model_type)
    if base == model_type or base not in CONFIG_MAPPING:
        raise SparsifyError(f"model_type {model_type!r}: sparsify knows no family {base!r}")
    base_config = CONFIG_MAPPING[base]
    config_cls = type(ARCH_PREFIX + base_config.__name__, (base_config,), {"model_type": model_type})
    AutoConfig.register(model_type, config_cls)
    if (mapping := get_checkpoint_conversion_mapping(base)) is not None:
        register_checkpoint_conversion_mapping(model_type, mapping)
    for auto, table in ((AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING), (AutoModel, MODEL_MAPPING)):
        if base_config not in table:
            continue
        model = table[base_config]
        name = ARCH_PREFIX + model.__name__
        auto.register(config_cls, type(name, (model,), {"config_class": config_cls}))
        if (mapping := get_checkpoint_conversion_mapping(model.__name__)) is not None:
            register_checkpoint_conversion_mapping(name, mapping)  # key renamings are looked up by class name too


def read_config(path: str | Path, trust_remote_code: bool = False):  # -> PretrainedConfig
    """``AutoConfig.from_pretrained(path)``, with sparsify's own model types registered first."""
    from transformers import AutoConfig

    raw = json.loads((Path(path) / "config.json").read_text()) if Path(path).is_dir() else {}
    if str(raw.get("model_type", "")).startswith(TYPE_PREFIX):
        register_model_type(raw["model_type"])
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def patterns_from_config(config: Any) -> tuple[list[LayerPattern], bool]:
    """Validated per-layer patterns and causality of a config carrying ``sparsify_attention``."""
    spec = getattr(config, CONFIG_KEY, None) if not isinstance(config, dict) else config.get(CONFIG_KEY)
    if not isinstance(spec, dict) or not isinstance(spec.get("layers"), list):
        raise SparsifyError(f"config has no valid {CONFIG_KEY} section")
    if spec.get("format") not in FORMATS:
        raise SparsifyError(f"{CONFIG_KEY} format {spec.get('format')!r} is not one of {FORMATS}; upgrade sparsify")
    try:
        layers = [LayerPattern(**entry) for entry in spec["layers"]]
    except (TypeError, ValueError) as e:
        raise SparsifyError(f"{CONFIG_KEY}.layers: {e}") from e
    return layers, bool(spec.get("causal", True))
