"""The passes: their configs, importable without torch (:data:`CONFIGS`: what the recipe schema accepts and the CLI
generates its commands from), and their implementations, registered by their modules (``@register("prune")``) and
imported when :data:`PASSES` is first read (so ``sparsify -h`` and a recipe refused before any work never import
torch or transformers).

A new pass: its config class in :data:`CONFIGS` and its module in :func:`_load` (a test holds the two equal).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sparsify.passes.attention_config import AttentionConfig
from sparsify.passes.base import PassConfig
from sparsify.passes.distill_config import DistillConfig
from sparsify.passes.heal_config import HealConfig
from sparsify.passes.moe_config import MoEConfig
from sparsify.passes.prune_config import PruneConfig
from sparsify.passes.quantize_config import QuantizeConfig

if TYPE_CHECKING:
    from sparsify.passes.base import Pass

# the order of the CLI's commands and of the recipe's union
CONFIGS: tuple[type[PassConfig], ...] = (AttentionConfig, DistillConfig, HealConfig, MoEConfig, PruneConfig,
                                         QuantizeConfig)  # fmt: skip


def _load() -> dict[str, type[Pass]]:
    """Every pass module imported (each registers its pass): the registry, full."""
    from sparsify.passes import attention, distill, heal, moe, prune, quantize, structured  # noqa: F401
    from sparsify.passes.base import PASSES

    return PASSES


def __getattr__(name: str) -> Any:
    """``PASSES``, ``Pass``, ``register``: the implementations, imported on first use."""
    if name == "PASSES":
        return _load()
    if name in ("Pass", "register"):
        from sparsify.passes import base

        return getattr(base, name)
    raise AttributeError(f"module 'sparsify.passes' has no attribute {name!r}")


def build_pass(config: PassConfig, index: int, arch=None) -> Pass:
    """The pass a recipe step describes; ``arch`` is the model's architecture-table entry (or None)."""
    return _load()[config.type].build(config, index, arch)


def calibrates(config: PassConfig) -> bool:
    """Whether the step changes weights from calibration data (a layer pass or a whole-model one, distillation)."""
    return type(config).layerwise or type(config).whole_model


__all__ = ["CONFIGS", "PASSES", "Pass", "PassConfig", "build_pass", "calibrates", "register"]
