"""Whole-model decisions before a sweep (each pass's ``prepare`` or its saved decisions, layers removed) and
the in-memory API, :func:`compress_model`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsify.calibration import (
    InMemoryLayers,
    LayerwiseRunner,
    RunOutput,
)
from sparsify.checkpoint.stage_model import Layers
from sparsify.errors import SparsifyError
from sparsify.passes import Pass
from sparsify.passes.base import shorten_per_layer
from sparsify.plan import config_from_dict, make_plan
from sparsify.progress import Progress
from sparsify.recipe import Recipe


def _remove_layers(model: nn.Module, layers: Layers, removed: list[int]) -> None:
    """Drop layers from the model (skeleton or in memory) before the sweep: its config, its layer list and
    each module's own ``layer_idx`` follow, so the forward and the loop see the smaller model."""
    n = len(layers.modules)
    keep = [i for i in range(n) if i not in set(removed)]
    kept = nn.ModuleList([layers.modules[i] for i in keep])
    parent, _, attr = layers.path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, kept)
    config = model.config
    for key, value in shorten_per_layer(config.to_dict(), keep, n).items():
        if isinstance(value, list | dict) and getattr(config, key, None) != value:
            setattr(config, key, value)
    config.num_hidden_layers = len(keep)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    layers.modules = kept
    layers.source_index = [layers.source_index[i] for i in keep]


def _prepare(model: nn.Module, layers: Layers, passes: list[Pass], runner: LayerwiseRunner,
             saved: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    """Each pass's whole-model decisions in recipe order (``saved``: an earlier run's, restored instead);
    layers a pass removes are gone for the passes after it. Returns the decisions, to save."""
    decisions = {}
    for p in passes:
        if saved is not None:
            p.restore(saved.get(str(p.index), {}))
        else:
            p.prepare(runner)
        decisions[str(p.index)] = p.decisions()
        removed = p.layers_to_remove()
        if removed:
            _remove_layers(model, layers, removed)
            runner.layers = layers.modules
            _follow(runner.provider, layers)  # the passes after this one load the layers that are left
    return decisions


def _follow(provider: Any, layers: Layers) -> None:
    """The provider hands out ``layers``' modules (after a removal): its list, and where each comes from."""
    provider.layers = layers.modules
    if hasattr(provider, "source_index"):
        provider.source_index = layers.source_index


def _resolver(layers: Layers):
    def resolve(p: Pass, i: int, layer: nn.Module) -> dict[str, nn.Module]:
        return p.targets_in(layer, f"{layers.path}.{i}")

    return resolve


def _finish_records(output: RunOutput) -> None:
    for record in output.records:
        record["rel_error"] = output.errors.get(record["name"])


def compress_model(
    model: nn.Module,
    recipe: Recipe,
    tokens: torch.Tensor,
    progress: Progress | None = None,
) -> tuple[RunOutput, list[str]]:
    """Compress an in-memory model in place with the same plan and loop as :func:`compress` (for tests, notebooks).

    Modules are reshaped and layers removed in the model itself; its config's sizes are left to the
    caller (``compress`` writes them from each pass's ``edit_config``).
    """
    cfg = {k: v for k, v in model.config.to_dict().items() if k != "transformers_version"}
    plan = make_plan(recipe, cfg, lambda c: model.config if c == cfg else config_from_dict(c, cfg, lambda: None))
    if len(plan.stages) > 1 or plan.stages[0].config_passes:
        raise SparsifyError("compress_model runs layer passes only; attention passes rewrite a saved config")
    passes = plan.stages[0].layer_passes
    layers = Layers.of(model)
    device = next(model.parameters()).device
    runner = LayerwiseRunner(
        model.base_model, layers.modules, InMemoryLayers(layers.modules), tokens, recipe.calibration.batch_size,
        progress, device, layers.path, recipe.calibration.inputs, experts=recipe.calibration.experts,
    )  # fmt: skip
    runner.whole = lambda: model
    _prepare(model, layers, passes, runner, None)
    _follow(runner.provider, layers)
    output = runner.run(passes, _resolver(layers))
    _finish_records(output)
    return output, plan.notes + [n for p in passes for n in p.notes()]


# ------------------------------------------------------------------------------------------- compress
