"""The pass registry: each module registers its pass under the YAML ``type`` (``@register("prune")``).

The modules are imported here, explicitly (no package walking); importing :mod:`sparsify.passes`
therefore fills :data:`PASSES`, and :data:`CONFIGS` is what the recipe schema accepts.
"""

from __future__ import annotations

from sparsify.passes import attention, distill, heal, moe, prune, quantize, structured  # noqa: F401 - registration
from sparsify.passes.base import PASSES, Pass, PassConfig, register

CONFIGS: tuple[type[PassConfig], ...] = tuple(cls.config_cls for cls in PASSES.values())


def build_pass(config: PassConfig, index: int, arch=None) -> Pass:
    """The pass a recipe step describes; ``arch`` is the model's architecture-table entry (or None)."""
    return PASSES[config.type].build(config, index, arch)


def calibrates(config: PassConfig) -> bool:
    """Whether the step changes weights from calibration data (a layer pass or a whole-model one, distillation)."""
    return PASSES[config.type].layerwise or PASSES[config.type].whole_model


__all__ = ["CONFIGS", "PASSES", "Pass", "PassConfig", "build_pass", "calibrates", "register"]
