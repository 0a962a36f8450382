"""Registry of pass types by name: the YAML ``type`` key selects the class."""

from __future__ import annotations

from sparsify.passes.base import LayerPass, PassConfig
from sparsify.passes.prune import PruneConfig, PrunePass

PASSES: dict[str, type[LayerPass]] = {"prune": PrunePass}
CONFIGS: tuple[type[PassConfig], ...] = (PruneConfig,)


def build_pass(config: PassConfig, index: int, stages: list[tuple[str, ...]] | None = None) -> LayerPass:
    return PASSES[config.type](config, index, stages)


__all__ = ["CONFIGS", "PASSES", "LayerPass", "PassConfig", "PruneConfig", "build_pass"]
