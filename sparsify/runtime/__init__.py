"""Attention patterns no runtime knows natively, run through transformers' attention interface.

A checkpoint written with such a pattern carries, in its ``config.json``::

    "attn_implementation": "sparsify",
    "sparsify_attention": {"format": 1, "causal": true, "layers": [{"pattern": "sinks", "window": 1020, "sinks": 4}, ...]}

Plain ``from_pretrained`` refuses it (``attn_implementation="sparsify" is not supported``), so it never runs
dense attention by mistake. :func:`load` registers the ``sparsify`` attention function and returns the model;
the function builds each layer's pattern mask, intersects it with transformers' own padding/causal mask and
runs SDPA (or eager maths when the model uses logit soft-capping). Windowed layers decode with a bounded
cache (:class:`WindowCacheLayer`: the first ``sinks`` keys plus the last ``window - 1``).

Cache and mask agree through one rule: a bounded layer returns its kept sinks followed by a contiguous run
of keys ending at the newest query, so the pattern is evaluated as if the returned keys were contiguous.
Distances inside the run are exact, sinks are visible to every later query, and evicted keys are outside
every current query's window; transformers' mask columns are picked to match the same keys.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from torch import nn

from sparsify.algorithms.attention_masks import LayerPattern
from sparsify.errors import SparsifyError

IMPLEMENTATION = "sparsify"  # the attn_implementation name written into configs
CONFIG_KEY = "sparsify_attention"
FORMAT = 1


def patterns_from_config(config: Any) -> tuple[list[LayerPattern], bool]:
    """Validated per-layer patterns and causality of a config carrying ``sparsify_attention``."""
    spec = getattr(config, CONFIG_KEY, None) if not isinstance(config, dict) else config.get(CONFIG_KEY)
    if not isinstance(spec, dict) or not isinstance(spec.get("layers"), list):
        raise SparsifyError(f"config has no valid {CONFIG_KEY} section")
    if spec.get("format") != FORMAT:
        raise SparsifyError(f"{CONFIG_KEY} format {spec.get('format')!r} is not {FORMAT}; upgrade sparsify")
    try:
        layers = [LayerPattern(**entry) for entry in spec["layers"]]
    except (TypeError, ValueError) as e:
        raise SparsifyError(f"{CONFIG_KEY}.layers: {e}") from e
    return layers, bool(spec.get("causal", True))


def register() -> None:
    """Make ``attn_implementation="sparsify"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    from sparsify.runtime.attention import sparsify_attention_forward

    AttentionInterface.register(IMPLEMENTATION, sparsify_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)


def _with_bounded_generate(model: nn.Module) -> None:
    """``model.generate`` gets a bounded cache unless the caller passes one."""
    generate = model.generate

    @functools.wraps(generate)
    def bounded_generate(*args: Any, **kwargs: Any) -> Any:
        from sparsify.runtime.cache import bounded_cache

        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None and kwargs.get("use_cache", True):
            kwargs["cache"] = bounded_cache(model)
        return generate(*args, **kwargs)

    model.generate = bounded_generate


def load(path: str | Path, *, trust_remote_code: bool = False, **kwargs: Any) -> nn.Module:
    """Load a checkpoint sparsify wrote, with its attention patterns active; native ones load as usual.

    Causal models come back as ``AutoModelForCausalLM``, encoders as ``AutoModel``; ``kwargs`` go to
    ``from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from sparsify.arch import is_encoder

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    cls = AutoModel if is_encoder(config.model_type) else AutoModelForCausalLM
    if getattr(config, CONFIG_KEY, None) is None:
        return cls.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    patterns, causal = patterns_from_config(config)
    if len(patterns) != config.num_hidden_layers:
        raise SparsifyError(f"{CONFIG_KEY} has {len(patterns)} layers, the model {config.num_hidden_layers}")
    register()
    kwargs["attn_implementation"] = IMPLEMENTATION
    model = cls.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    if causal and any(p.evicts for p in patterns):
        _with_bounded_generate(model)
    return model
