"""Registry of pass types by name: the YAML ``type`` key selects the class."""

from __future__ import annotations

from sparsify.passes.attention import AttentionConfig, AttentionPass
from sparsify.passes.base import ConfigPass, LayerPass, PassConfig
from sparsify.passes.prune import PruneConfig, PrunePass

PASSES: dict[str, type[LayerPass] | type[ConfigPass]] = {"prune": PrunePass, "attention": AttentionPass}
CONFIGS: tuple[type[PassConfig], ...] = (PruneConfig, AttentionConfig)


def build_pass(config: PassConfig, index: int, stages: list[tuple[str, ...]] | None = None) -> LayerPass | ConfigPass:
    return PASSES[config.type](config, index, stages)


def is_layer_pass(config: PassConfig) -> bool:
    return issubclass(PASSES[config.type], LayerPass)


__all__ = [
    "CONFIGS",
    "PASSES",
    "AttentionConfig",
    "ConfigPass",
    "LayerPass",
    "PassConfig",
    "PruneConfig",
    "build_pass",
    "is_layer_pass",
]
