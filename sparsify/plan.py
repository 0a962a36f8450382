"""The plan: the whole recipe walked on the config alone, before the first layer is touched.

Pass after pass, in recipe order, the plan builds the model the config describes *at that point* (on the
meta device: no weights are read), binds the pass to it (the pass reads its sizes there and refuses what
it cannot do), resolves its targets, and asks it for the config it will leave (:meth:`Pass.plan_config`),
which the next pass is planned against. So a second layer removal counts the layers the first one left,
MoE experts are sized from the FFN a channel pruning left, and a quantization after MoE sees the experts
and the routers. What each pass needs of the model it is given (:data:`~sparsify.passes.base.FACTS`:
floating-point Linears, a dense FFN) is tracked along: a pass that needs what an earlier one took away is
refused with one line naming both passes.

The plan also splits the recipe into **stages**: a stage is the config passes that precede a run of
layer passes, then that run as one layer-wise sweep. A config pass between two layer passes
(``[prune, attention, prune]``) starts a new stage, whose sweep calibrates the model as the earlier
stage left it (read back from its output). A whole-model pass (distillation) is a stage of its own: it
trains the model the stages before it wrote, read back whole.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparsify.arch import SPARSIFY_TYPE_PREFIX, Arch, find_layers, is_encoder, lookup
from sparsify.errors import SparsifyError
from sparsify.passes import Pass, build_pass, calibrates
from sparsify.passes.base import FACTS
from sparsify.recipe import Recipe
from sparsify.runtime.format import register_model_type
from sparsify.targets import select_targets

ConfigOf = Callable[[dict[str, Any]], Any]  # config dict -> PretrainedConfig


@dataclass
class Stage:
    config_passes: list[Pass] = field(default_factory=list)  # applied to the config before the sweep
    layer_passes: list[Pass] = field(default_factory=list)  # the sweep's passes (empty: config passes only)
    model_pass: Pass | None = None  # or a whole-model pass (distillation), training the model before it at once


@dataclass
class Plan:
    passes: list[Pass]  # every pass of the recipe, built and bound, in recipe order
    stages: list[Stage]
    configs: list[dict[str, Any]]  # the config each pass is given, as planned; then the output's
    notes: list[str]

    @property
    def output_config(self) -> dict[str, Any]:
        return self.configs[-1]

    @property
    def layer_passes(self) -> list[Pass]:
        return [p for s in self.stages for p in s.layer_passes]

    @property
    def weight_passes(self) -> list[Pass]:
        """The passes that change weights: the layer passes and the whole-model ones, in recipe order."""
        return [p for p in self.passes if calibrates(p.config)]


def initial_facts(cfg: dict[str, Any]) -> set[str]:
    """What the input model offers the passes (:data:`~sparsify.passes.base.FACTS`)."""
    arch = lookup(str(cfg.get("model_type", "")))
    facts = set()
    if cfg.get("quantization_config") is None:
        facts.add("float")
    if arch is not None and arch.ffn == "dense":
        facts.add("dense_ffn")
    return facts


def _refusal(p: Pass, fact: str, taker: Pass | None, cfg: dict[str, Any]) -> str:
    what, did = FACTS[fact]
    if taker is not None:
        hint = "; quantize last" if fact == "float" else "; put it before that pass" if fact == "dense_ffn" else ""
        return (
            f"pass {p.index} ({p.describe()}) cannot follow pass {taker.index} ({taker.describe()}): it needs"
            f" {what}, and pass {taker.index} {did}{hint}"
        )
    if fact == "float":
        return (
            f"pass {p.index} ({p.describe()}) needs {what}, and the input is already quantized (quantization_config"
            " in config.json); sparsify's layer passes take floating-point checkpoints (quantize last, in the same"
            " recipe)"
        )
    return f"pass {p.index} ({p.describe()}) needs {what}; the input's {cfg.get('model_type')} model has none"


def make_plan(
    recipe: Recipe,
    cfg: dict[str, Any],
    config_of: ConfigOf,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
) -> Plan:
    """Walk ``recipe`` over the input's ``cfg`` (see the module docstring); raises SparsifyError on the
    first step that cannot apply."""
    facts = initial_facts(cfg)
    takers: dict[str, Pass | None] = {}  # fact -> the pass that took it away (None: the input lacked it)
    passes: list[Pass] = []
    configs: list[dict[str, Any]] = []
    notes: list[str] = []
    stages: list[Stage] = [Stage()]
    models: dict[str, nn.Module] = {}  # planned config (as JSON) -> the model it builds, on meta
    for index, step in enumerate(recipe.passes):
        arch = lookup(str(cfg.get("model_type", "")))
        p = build_pass(step, index, arch)
        for fact in sorted(p.requires - facts):
            raise SparsifyError(_refusal(p, fact, takers.get(fact), cfg))
        if p.whole_model:
            p.after([q for q in passes if q.layerwise])
            stages.append(Stage(model_pass=p))
        elif p.layerwise:
            if stages[-1].model_pass is not None:
                stages.append(Stage())
            key = json.dumps(cfg, sort_keys=True)
            if key not in models:
                models[key] = _meta_model(config_of(cfg), trust_remote_code, dtype)
            _bind(p, models[key], arch, str(cfg.get("model_type", "")), notes)
            if p.needs_dense_path and recipe.calibration.inputs == "dense":
                raise SparsifyError(
                    f"pass {index}: dense_targets fits the dense model's outputs from the compressed model's inputs;"
                    " with calibration inputs 'dense' there are no compressed inputs (use inputs: compressed)"
                )
            if p.needs_dense_path and stages[-1].layer_passes:
                raise SparsifyError(f"pass {index}: dense_targets is supported on the first pruning pass of a stage")
            p.after(list(stages[-1].layer_passes))
            stages[-1].layer_passes.append(p)
        elif stages[-1].layer_passes or stages[-1].model_pass is not None:
            stages.append(Stage([p], []))
        else:
            stages[-1].config_passes.append(p)
        configs.append(cfg)
        cfg = checked_config(p, p.plan_config(cfg))
        for fact in p.removes & facts:
            takers[fact] = p
        facts -= p.removes
        passes.append(p)
    configs.append(cfg)
    return Plan(passes, stages, configs, notes)


def _meta_model(config: Any, trust_remote_code: bool, dtype: torch.dtype | None) -> nn.Module:
    from sparsify.checkpoint import build_skeleton

    return build_skeleton(config, is_encoder(config.model_type), trust_remote_code, dtype)


def _bind(p: Pass, model: nn.Module, arch: Arch | None, model_type: str, notes: list[str]) -> None:
    """Bind a layer pass to the model as the passes before it leave it: sizes, refusals, targets."""
    layers_path, layers = find_layers(model, arch)
    if arch is None:
        note = f"model_type {model_type!r} is not in the architecture table; layers found at {layers_path}"
        if note not in notes:
            notes.append(note)
    p.bind(model)
    per_layer: dict[int, dict[str, nn.Module]] = {i: {} for i in range(len(layers))}
    if p.uses_targets:
        cfg = p.config
        selection = select_targets(model, arch, layers_path, len(layers), cfg.targets, cfg.ignore, model_type)
        p.matcher = selection.matcher
        per_layer = selection.per_layer
        if selection.outside_layers:
            notes.append(
                f"pass {p.index} ({cfg.type}): not applied to {', '.join(selection.outside_layers)}:"
                " outside the decoder layers (lm_head and embeddings are never compressed)"
            )
    p.validate(per_layer)


def checked_config(p: Pass, new: dict[str, Any]) -> dict[str, Any]:
    """A config a pass left, checked to load in transformers (sparsify's own model types registered)."""
    from transformers import AutoConfig

    if str(new.get("model_type", "")).startswith(SPARSIFY_TYPE_PREFIX):
        register_model_type(new["model_type"])
    fields = {k: v for k, v in new.items() if k != "transformers_version"}
    try:
        AutoConfig.for_model(**fields)
    except Exception as e:
        raise SparsifyError(f"pass {p.index}: the rewritten config does not load in transformers: {e}") from e
    return new


def config_from_dict(cfg: dict[str, Any], original: dict[str, Any], load_original: Callable[[], Any]):
    """The config object for ``cfg``: the model's own when unchanged (``load_original``: its code, if any), else
    built from the dict as ``AutoConfig.from_pretrained`` would build it from that ``config.json``."""
    from transformers import AutoConfig

    if cfg == original:
        return load_original()
    if cfg.get("auto_map"):
        raise SparsifyError("a recipe that edits the config of a model with its own code is not supported")
    if str(cfg.get("model_type", "")).startswith(SPARSIFY_TYPE_PREFIX):
        register_model_type(cfg["model_type"])
    fields = {k: v for k, v in cfg.items() if k != "transformers_version"}
    arch = lookup(str(fields.get("model_type", "")))
    if arch is not None and arch.with_layer_types and "layer_types" in fields:
        fields["model_type"] = arch.with_layer_types  # what AutoConfig.from_pretrained does with such a config.json
    return AutoConfig.for_model(**fields)
