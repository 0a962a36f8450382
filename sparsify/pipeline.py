"""Orchestration: model folder + recipe → compressed folder + report. One code path for every command.

A recipe runs in **stages**: a stage is the config passes that precede a run of layer passes, then
that run as one layer-wise sweep. Most recipes are one stage. A config pass between two layer passes
(``[prune, attention, prune]``) starts a new stage, whose sweep calibrates the model as the earlier
stage left it (read back from its output). Config passes after the last layer pass only edit the
final config. Every pass's ``edit_config`` runs in recipe order.
"""

from __future__ import annotations

import json
import logging
import re
import resource
import shutil
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsify import __version__, interrupts
from sparsify.arch import SPARSIFY_TYPE_PREFIX, Arch, find_layers, is_encoder, lookup
from sparsify.calibration import ERROR_WINDOWS, InMemoryLayers, LayerwiseRunner, ResumePoint, RunOutput
from sparsify.checkpoint import (
    DEFAULT_SHARD_BYTES,
    KeyMap,
    LayerFiles,
    ModelDir,
    TensorInfo,
    TensorSource,
    assemble,
    build_skeleton,
    check_layer_count,
    check_output,
    check_tensors,
    copy_aux_files,
    materialize,
    open_model,
    partial_output,
    release,
    set_tensor,
)
from sparsify.checkpoint.output import StageState, tensor_digest
from sparsify.data import load_text, sample_windows, tokenize
from sparsify.devices import resolve_device
from sparsify.errors import SparsifyError
from sparsify.evaluate import check_context, embedding_similarity, evaluate, load_tokenizer
from sparsify.passes import Pass, build_pass, is_layer_pass
from sparsify.progress import NoProgress, Progress
from sparsify.recipe import Recipe
from sparsify.report import build_report, model_card, write_report
from sparsify.runtime import register_model_type
from sparsify.targets import select_targets

log = logging.getLogger(__name__)


@dataclass
class Options:
    """Run settings that are not part of the recipe (they do not change the result's meaning)."""

    overwrite: bool = False
    dtype: torch.dtype = torch.float32  # compute dtype for calibration forwards and the maths
    device: str = "cpu"  # cpu, cuda, cuda:N or auto: where calibration and evaluation run
    trust_remote_code: bool = False
    eval_data: str | None = None  # perplexity before/after on this text
    eval_seq_lens: tuple[int, ...] | None = None  # None: 512, or what the recipe's passes ask for
    eval_max_windows: int | None = None
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    resume: bool = False  # continue an unfinished run into the same output (same model, recipe, settings)
    revision: str | None = None  # branch, tag or commit when the model is a Hugging Face Hub repo id
    progress: Progress = field(default_factory=NoProgress)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # in the report: which run wrote an output


# ------------------------------------------------------------------------------------------- layers


class LazyLayers:
    """Provider that reads each layer from the checkpoint and, when the loop is done with it, saves it.

    Layer ``i`` of the model may be layer ``source_index[i]`` of the checkpoint (after layers were
    removed). Tensors are saved under the output model's names, in their stored precision: a tensor no
    pass changed is written from the input as it was stored (a float32 model calibrated in bfloat16
    keeps its float32 norms and kept weights); changed and reshaped values in the stored dtype; a tensor
    a pass added (a bias) in the layer's floating dtype.
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        layers_path: str,
        source: TensorSource,
        keymap: KeyMap,
        store: LayerFiles | None,
        dtype: torch.dtype,
        device: torch.device,
        source_index: list[int] | None = None,
    ):
        self.layers, self.layers_path = layers, layers_path
        self.source, self.keymap, self.store = source, keymap, store
        self.dtype, self.device = dtype, device
        self.source_index = source_index or list(range(len(layers)))
        self.stored: dict[str, torch.dtype] = {}  # layer-relative name -> stored dtype (of the loaded layer)

    def _source_key(self, index: int, name: str) -> str | None:
        return self.keymap.to_ckpt.get(f"{self.layers_path}.{self.source_index[index]}.{name}")

    def load(self, index: int) -> nn.Module:
        layer = self.layers[index]
        names = [n for n, _ in layer.named_parameters()]
        prefix = f"{self.layers_path}.{self.source_index[index]}"
        stored = materialize(layer, prefix, names, self.source, self.keymap, self.dtype, self.device)
        self.stored = {name: t.dtype for name, t in stored.items()}
        return layer

    def _storage_dtype(self, name: str, value: torch.Tensor) -> torch.dtype:
        if name in self.stored and self.stored[name].is_floating_point == value.is_floating_point():
            return self.stored[name]  # (a float weight a pass turned into integers keeps its integer dtype)
        floats = [d for d in self.stored.values() if d.is_floating_point]
        return max(set(floats), key=floats.count) if value.is_floating_point() and floats else value.dtype

    @torch.no_grad()
    def round_to_storage(self, index: int, layer: nn.Module) -> None:
        """Make the weights the loop propagates with exactly the ones that will be saved."""
        for name, p in layer.named_parameters():
            stored = self._storage_dtype(name, p)
            if p.is_floating_point() and stored != p.dtype:
                p.copy_(p.to(stored).to(p.dtype))

    def finish(self, index: int, layer: nn.Module, write: bool, info: dict[str, Any] | None = None) -> None:
        if write and self.store is not None:
            params = [(name, p.detach().cpu()) for name, p in layer.named_parameters()]
            out = {
                name: self.keymap.output_key(f"{self.layers_path}.{index}.{checkpoint_name(layer, name)}")
                for name, _ in params
            }
            entries = [(out[name], TensorInfo(self._storage_dtype(name, p), tuple(p.shape))) for name, p in params]
            tensors = ((out[name], self._stored_value(index, name, p)) for name, p in params)
            self.store.save(index, entries, tensors, info or {})
        release(layer)

    def _stored_value(self, index: int, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` in its storage dtype, taking the stored bits wherever no pass changed a value."""
        dtype = self._storage_dtype(name, value)
        key = self._source_key(index, name)
        if key is None or self.source.info(key).shape != tuple(value.shape):
            return value.to(dtype)  # added or reshaped by a pass
        if value.dtype == dtype or not value.is_floating_point():
            return value.to(dtype)
        original = self.source.get_many([key])[key]
        untouched = value == original.to(value.dtype)  # the compute copy is the stored value, rounded
        return torch.where(untouched, original, value.to(dtype))


def checkpoint_name(layer: nn.Module, name: str) -> str:
    """The checkpoint name of parameter ``name`` of ``layer``: a module that declares a ``checkpoint_prefix``
    (an MoE block written in its family's published layout, e.g. Mixtral's ``block_sparse_moe``) is written
    under that prefix instead of its own path."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = getattr(layer.get_submodule(".".join(parts[:i])), "checkpoint_prefix", None)
        if prefix:
            return ".".join([prefix, *parts[i:]])
    return name


def _module_path(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise RuntimeError("module not found under root")


# --------------------------------------------------------------------------------------------- plan


@dataclass
class _Plan:
    arch: Arch | None
    layers_path: str
    layers: nn.ModuleList
    passes: list[Pass]
    targets: list[dict[int, dict[str, nn.Module]]]
    notes: list[str]
    source_index: list[int] = field(default_factory=list)  # model layer i is checkpoint layer source_index[i]


def _plan(model: nn.Module, model_type: str, steps: list[tuple[int, Any]]) -> _Plan:
    """The layer passes ``steps`` (recipe index, config) bound to ``model``, their targets resolved on it."""
    if getattr(model.config, "quantization_config", None) is not None:
        raise SparsifyError(
            "the model is already quantized (quantization_config in config.json); sparsify's layer passes take"
            " floating-point checkpoints (quantize last, in the same recipe)"
        )
    arch = lookup(model_type)
    layers_path, layers = find_layers(model, arch)
    notes: list[str] = []
    if arch is None:
        notes.append(f"model_type {model_type!r} is not in the architecture table; layers found at {layers_path}")
    passes, targets = [], []
    for index, cfg in steps:
        built = build_pass(cfg, index, arch)
        built.bind(model)
        per_layer: dict[int, dict[str, nn.Module]] = {i: {} for i in range(len(layers))}
        if built.uses_targets:
            selection = select_targets(model, arch, layers_path, len(layers), cfg.targets, cfg.ignore, model_type)
            built.matcher = selection.matcher
            per_layer = selection.per_layer
            if selection.outside_layers:
                notes.append(
                    f"pass {index} ({cfg.type}): not applied to {', '.join(selection.outside_layers)}:"
                    " outside the decoder layers (lm_head and embeddings are never compressed)"
                )
        built.validate(per_layer)
        if built.needs_dense_path and passes:
            raise SparsifyError(f"pass {index}: dense_targets is supported on the first pruning pass of a recipe only")
        passes.append(built)
        targets.append(per_layer)
    _check_order(passes)
    return _Plan(arch, layers_path, layers, passes, targets, notes, list(range(len(layers))))


def _resolver(plan: _Plan):
    def resolve(p: Pass, i: int, layer: nn.Module) -> dict[str, nn.Module]:
        return p.targets_in(layer, f"{plan.layers_path}.{i}")

    return resolve


def _remove_layers(model: nn.Module, plan: _Plan, removed: list[int]) -> None:
    """Drop layers from the model (skeleton or in memory) before the sweep: its config, its layer list and
    each module's own ``layer_idx`` follow, so the forward and the loop see the smaller model."""
    keep = [i for i in range(len(plan.layers)) if i not in set(removed)]
    kept = nn.ModuleList([plan.layers[i] for i in keep])
    parent, _, attr = plan.layers_path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, kept)
    config = model.config
    n = config.num_hidden_layers
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == n:
            setattr(config, key, [value[i] for i in keep])
    from sparsify.runtime import CONFIG_KEY

    section = getattr(config, CONFIG_KEY, None)
    if isinstance(section, dict) and len(section.get("layers", [])) == n:
        setattr(config, CONFIG_KEY, {**section, "layers": [section["layers"][i] for i in keep]})
    config.num_hidden_layers = len(keep)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    plan.layers = kept
    plan.source_index = [plan.source_index[i] for i in keep]
    plan.targets = [{j: t.get(i, {}) for j, i in enumerate(keep)} for t in plan.targets]


def _prepare(model: nn.Module, plan: _Plan, runner: LayerwiseRunner) -> None:
    """Each pass's whole-model work in recipe order; layers a pass removes are gone for the passes after it."""
    for p, targets in zip(plan.passes, plan.targets, strict=True):
        p.prepare(runner, targets)
        removed = p.layers_to_remove()
        if removed:
            _remove_layers(model, plan, removed)
            runner.layers = plan.layers


def _finish_records(plan: _Plan, output: RunOutput) -> None:
    for record in output.records:
        record["rel_error"] = output.errors.get(record["name"])


def compress_model(
    model: nn.Module,
    recipe: Recipe,
    tokens: torch.Tensor,
    progress: Progress | None = None,
) -> tuple[RunOutput, list[str]]:
    """Compress an in-memory model in place with the same loop as :func:`compress` (for tests, notebooks).

    Modules are reshaped and layers removed in the model itself; its config's sizes are left to the
    caller (``compress`` writes them from each pass's ``edit_config``).
    """
    if not all(is_layer_pass(step) for step in recipe.passes):
        raise SparsifyError("compress_model runs layer passes only; attention passes rewrite a saved config")
    plan = _plan(model, model.config.model_type, list(enumerate(recipe.passes)))
    device = next(model.parameters()).device
    runner = LayerwiseRunner(
        model.base_model, plan.layers, InMemoryLayers(plan.layers), tokens, recipe.calibration.batch_size,
        progress, device, plan.layers_path,
    )  # fmt: skip
    _prepare(model, plan, runner)
    runner.provider = InMemoryLayers(plan.layers)
    output = runner.run(plan.passes, _resolver(plan))
    _finish_records(plan, output)
    notes = plan.notes + [n for p in plan.passes for n in p.notes()]
    return output, notes


# ------------------------------------------------------------------------------------------- stages


@dataclass
class _Stage:
    config_steps: list[tuple[int, Any]]  # config passes applied before the sweep
    layer_steps: list[tuple[int, Any]]  # the sweep's layer passes (empty: config passes only)


def _stages(recipe: Recipe) -> list[_Stage]:
    """Split the recipe at each config pass that sits between layer passes (see the module docstring)."""
    stages: list[_Stage] = [_Stage([], [])]
    for index, step in enumerate(recipe.passes):
        if is_layer_pass(step):
            stages[-1].layer_steps.append((index, step))
        elif stages[-1].layer_steps:
            stages.append(_Stage([(index, step)], []))
        else:
            stages[-1].config_steps.append((index, step))
    return stages


def _edit_config(p: Pass, cfg: dict[str, Any]) -> dict[str, Any]:
    """``p.edit_config``, the result checked to load in transformers (sparsify's own model types registered)."""
    from transformers import AutoConfig

    new = p.edit_config(cfg)
    if new is cfg:
        return cfg
    if str(new.get("model_type", "")).startswith(SPARSIFY_TYPE_PREFIX):
        register_model_type(new["model_type"])
    fields = {k: v for k, v in new.items() if k not in ("transformers_version",)}
    try:
        AutoConfig.for_model(**fields)
    except Exception as e:
        raise SparsifyError(f"pass {p.index}: the rewritten config does not load in transformers: {e}") from e
    return new


def _config_from_dict(cfg: dict[str, Any], md: ModelDir, trust_remote_code: bool):  # -> PretrainedConfig
    """The config object for ``cfg``: the model's own when unchanged (its code, if any), else built from the dict
    as ``AutoConfig.from_pretrained`` would build it from that ``config.json``."""
    from transformers import AutoConfig

    if cfg == json.loads(md.config_path.read_text()):
        return md.load_config(trust_remote_code)
    if cfg.get("auto_map"):
        raise SparsifyError("a recipe that edits the config of a model with its own code is not supported")
    if str(cfg.get("model_type", "")).startswith(SPARSIFY_TYPE_PREFIX):
        register_model_type(cfg["model_type"])
    fields = {k: v for k, v in cfg.items() if k != "transformers_version"}
    if fields.get("model_type") == "mistral" and "layer_types" in fields:
        fields["model_type"] = "ministral"  # what AutoConfig.from_pretrained does with such a config.json
    return AutoConfig.for_model(**fields)


# ------------------------------------------------------------------------------------------- helpers


def _calibration_tokens(recipe: Recipe, tokenizer) -> tuple[torch.Tensor, str]:
    cal = recipe.calibration
    text = load_text(cal.data, text_column=cal.text_column, tokenizer=tokenizer)
    return sample_windows(tokenize(text, tokenizer), cal.samples, cal.seq_len, cal.seed), text.name


def _eval_lengths(opts: Options, passes: list[Pass], config) -> tuple[list[int], list[str]]:
    """Context lengths for perplexity: the requested ones, or those the passes ask for, within the model's context."""
    asked = sorted({n for p in passes for n in (p.eval_lengths or ())})
    wanted = list(opts.eval_seq_lens or asked or [512])
    limit = getattr(config, "max_position_embeddings", None)
    if opts.eval_seq_lens and opts.eval_data is not None:
        check_context(wanted, limit)  # asked for explicitly: refused, not dropped
    kept = [n for n in wanted if not limit or n <= limit]
    notes = [
        f"perplexity not measured at {n} tokens: beyond max_position_embeddings {limit}"
        for n in wanted
        if n not in kept
    ]
    if not kept:
        kept = [int(limit)]
        notes.append(f"perplexity measured at the model's full context, {limit} tokens")
    return kept, notes


def _perplexity(path: Path, opts: Options, lengths: list[int]) -> dict[str, Any]:
    return evaluate(
        path,
        opts.eval_data,
        lengths,
        opts.eval_max_windows,
        opts.dtype,
        opts.trust_remote_code,
        opts.progress,
        opts.device,
    )


def _before_after(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One evaluation record with ``before`` and ``after`` perplexities, per context length too."""

    def pair(b: dict[str, Any], a: dict[str, Any]) -> dict[str, Any]:
        return {
            **{k: v for k, v in a.items() if k != "perplexity"},
            "before": b["perplexity"],
            "after": a["perplexity"],
        }

    info = pair(before, after)
    if "by_length" in after:
        info["by_length"] = [pair(b, a) for b, a in zip(before["by_length"], after["by_length"], strict=True)]
    return info


def _fit_context(recipe: Recipe, config) -> tuple[Recipe, list[str]]:
    """Calibration windows within the model's context: a default is shortened (noted), an explicit value refused."""
    limit = getattr(config, "max_position_embeddings", None)
    cal = recipe.calibration
    if not limit or cal.seq_len <= limit:
        return recipe, []
    if "seq_len" in cal.model_fields_set:
        raise SparsifyError(
            f"calibration seq_len {cal.seq_len} is beyond the model's context (max_position_embeddings {limit});"
            f" use --seq-len {limit} or less"
        )
    fitted = recipe.model_copy(update={"calibration": cal.model_copy(update={"seq_len": int(limit)})})
    return fitted, [
        f"calibration windows shortened from the default {cal.seq_len} to the model's context, {limit} tokens"
    ]


def _run_info(md: ModelDir, recipe: Recipe, tokens: torch.Tensor | None, opts: Options) -> dict[str, Any]:
    """What a --resume must match: the model, the effective recipe, the calibration tokens and the numerics."""
    return {
        "sparsify_version": __version__,
        "model": md.fingerprint(),
        "recipe": recipe.to_yaml(),
        "calibration_tokens": tensor_digest(tokens) if tokens is not None else None,
        "dtype": str(opts.dtype).removeprefix("torch."),
        "device": opts.device,
    }


# ----------------------------------------------------------------------------------- one stage


@dataclass
class _StageResult:
    records: list[dict[str, Any]]
    passes: list[Pass]
    notes: list[str]
    counts: Any  # ShardCounts of the written shards


@dataclass
class _Skeleton:
    model: nn.Module
    keymap: KeyMap
    notes: list[str] = field(default_factory=list)


def _skeleton(md: ModelDir, config, opts: Options) -> _Skeleton:
    """The model on the meta device, every tensor of the checkpoint checked against it."""
    arch = lookup(config.model_type)
    if arch is not None:
        check_layer_count(md.source, arch.layers, int(config.num_hidden_layers))
    model = build_skeleton(
        config, is_encoder(config.model_type), opts.trust_remote_code, opts.dtype, set(md.source.keys())
    )
    keymap = KeyMap(model, md.source)
    arch = lookup(config.model_type)
    absent, unexpected = check_tensors(model, md.source, keymap, arch.optional if arch else ())
    notes = []
    if unexpected:
        notes.append(
            f"{len(unexpected)} tensor(s) the {config.model_type} model does not use, copied unchanged:"
            f" {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else "")
        )
    if absent:  # optional parts (an encoder's pooler): not written, zero for the forward, which never reads them
        notes.append(f"not in the checkpoint and not written (optional): {', '.join(absent)}")
        for name in absent:
            set_tensor(model, name, torch.zeros(model.get_parameter(name).shape, dtype=opts.dtype))
    return _Skeleton(model, keymap, notes)


def _load_outside_layers(skel: _Skeleton, plan: _Plan, md: ModelDir, opts: Options) -> None:
    """Read the tensors outside the layers (embeddings, final norm) onto the device; buffers too."""
    model = skel.model
    base_path = _module_path(model, model.base_model)
    base_prefix = f"{base_path}." if base_path else ""
    layer_prefix = plan.layers_path + "."
    outside = [n for n, p in model.named_parameters() if n.startswith(base_prefix) and not n.startswith(layer_prefix)]
    outside = [n for n in outside if model.get_parameter(n).is_meta]
    device = torch.device(opts.device)
    materialize(model, "", outside, md.source, skel.keymap, opts.dtype, device)
    for name, buffer in list(model.named_buffers()):
        set_tensor(model, name, buffer.to(device))


def _rest(md: ModelDir, keymap: KeyMap, plan: _Plan | None, layers_path: str | None) -> list[tuple[str, str]]:
    """``(input key, output key)`` of every tensor the loop does not write: outside the layers, copied as is;
    a layer's extra tensors (unknown to the model) follow their layer, and go with a removed one."""
    consumed = {k for n, k in keymap.to_ckpt.items() if layers_path and n.startswith(layers_path + ".")}
    if plan is None or layers_path is None:
        return [(k, k) for k in md.source.keys() if k not in consumed]
    add, strip = keymap._prefix_rule()
    ckpt_layers = add + (layers_path + ".").removeprefix(strip)
    new_index = {src: i for i, src in enumerate(plan.source_index)}
    pattern = re.compile(re.escape(ckpt_layers) + r"(\d+)\.(.*)")
    rest = []
    for key in md.source.keys():
        if key in consumed:
            continue
        match = pattern.fullmatch(key)
        if match is None:
            rest.append((key, key))
        elif int(match[1]) in new_index:
            rest.append((key, f"{ckpt_layers}{new_index[int(match[1])]}.{match[2]}"))
    return rest


def _run_stage(
    stage_index: int,
    stage: _Stage,
    md: ModelDir,
    cfg: dict[str, Any],
    out_dir: Path,
    state: StageState,
    tokens: torch.Tensor | None,
    recipe: Recipe,
    opts: Options,
) -> tuple[dict[str, Any], _StageResult]:
    """One stage: config passes, the sweep of its layer passes, their config edits; the stage's output
    (weights and config) written to ``out_dir``. Returns the config it leaves and what it did."""
    passes_done: list[Pass] = []
    records: list[dict[str, Any]] = []
    notes: list[str] = []
    arch = lookup(str(cfg.get("model_type", "")))
    for index, step in stage.config_steps:
        p = build_pass(step, index, arch)
        cfg = _edit_config(p, cfg)
        records += p.config_records()
        passes_done.append(p)
    config = _config_from_dict(cfg, md, opts.trust_remote_code)
    skel = _skeleton(md, config, opts)
    notes += skel.notes
    plan = None
    output = RunOutput()
    if stage.layer_steps:
        plan = _plan(skel.model, config.model_type, stage.layer_steps)
        _load_outside_layers(skel, plan, md, opts)
        device = torch.device(opts.device)
        provider = LazyLayers(plan.layers, plan.layers_path, md.source, skel.keymap, state.layers, opts.dtype, device)
        runner = LayerwiseRunner(
            skel.model.base_model, plan.layers, provider, tokens, recipe.calibration.batch_size, opts.progress,
            device, plan.layers_path,
        )  # fmt: skip
        if not state.complete:
            _prepare(skel.model, plan, runner)
            provider.layers, provider.source_index = plan.layers, plan.source_index
            output = _sweep(runner, plan, state)
            _finish_records(plan, output)
        else:
            _prepare_quietly(skel.model, plan, runner, provider)
            output = _saved_output(state, len(plan.layers))
            _finish_records(plan, output)
        records += output.records
        notes += plan.notes
        for p in plan.passes:
            cfg = _edit_config(p, cfg)
            passes_done.append(p)
    counts = assemble(
        out_dir, state.layers, md.source, _rest(md, skel.keymap, plan, plan.layers_path if plan else None), state.dir,
        opts.max_shard_bytes,
    )  # fmt: skip
    state.mark_complete()
    notes += [n for p in passes_done for n in p.notes()]
    return cfg, _StageResult(records, passes_done, notes, counts)


def _prepare_quietly(model: nn.Module, plan: _Plan, runner: LayerwiseRunner, provider: LazyLayers) -> None:
    """A finished stage of a resumed run: redo the passes' whole-model decisions (cheap, deterministic) so that
    their config edits and notes are the same; the layers are already written."""
    _prepare(model, plan, runner)
    provider.layers, provider.source_index = plan.layers, plan.source_index


def _saved_output(state: StageState, n_layers: int) -> RunOutput:
    output = RunOutput()
    for i in range(n_layers):
        info = state.layers.info(i) or {}
        output.records += info.get("records", [])
        output.errors.update(info.get("errors", {}))
    return output


def _sweep(runner: LayerwiseRunner, plan: _Plan, state: StageState) -> RunOutput:
    """The layer-wise loop, continuing from a checkpoint of an earlier run when resuming."""
    start: ResumePoint | None = state.resume_point()
    prior = RunOutput()
    n = len(plan.layers)
    if start is not None:
        prior = _saved_output(state, start[0])
        plan.notes.append(f"resumed at layer {start[0]} of {n}: earlier layers kept from the interrupted run")
        if start[0] >= n:
            return prior
    timer = {"last": 0.0, "cost": 0.0}

    def checkpoint(next_layer: int, hidden: list[torch.Tensor], dense: list[torch.Tensor] | None) -> None:
        # Save the activations entering the next layer unless that costs much and more than ~10% of the run.
        now = time.perf_counter()
        if next_layer == n:  # every layer done: nothing to carry over
            state.checkpoint(next_layer, [], None)
        elif timer["cost"] < 0.05 or now - timer["last"] >= 10 * timer["cost"]:
            state.checkpoint(next_layer, hidden, dense)
            timer["last"], timer["cost"] = time.perf_counter(), time.perf_counter() - now

    output = runner.run(plan.passes, _resolver(plan), start, checkpoint)
    output.records[:0] = prior.records
    output.errors.update(prior.errors)
    return output


# ------------------------------------------------------------------------------------------- compress


def compress(model_path: str | Path, recipe: Recipe, out: str | Path, options: Options | None = None) -> dict[str, Any]:
    """Run ``recipe`` on the model at ``model_path`` layer by layer and write the result to ``out``.

    The input is never modified; ``out`` appears only when complete (see :mod:`sparsify.checkpoint.output`
    for every rule). Returns the report.
    """
    opts = options or Options()
    opts = replace(opts, device=resolve_device(opts.device))
    t_start = time.perf_counter()
    md = open_model(model_path, opts.revision)
    reads = [
        Path(p)
        for p in (recipe.calibration.data, opts.eval_data)
        if p and not str(p).startswith("builtin:") and p != NO_DATA
    ]
    if Path(model_path).expanduser().exists():  # a .gguf input is read too, not only its converted folder
        reads.append(Path(model_path).expanduser())
    target = check_output(out, md.read_paths() + reads, md.path, opts.overwrite)

    # The work folder is claimed (locked) first: a second run into OUT is refused from the start.
    with partial_output(target, overwrite=opts.overwrite, resume=opts.resume, protect=md.read_paths() + reads) as work:
        config = md.load_config(opts.trust_remote_code)
        if (arch := lookup(config.model_type)) is not None:  # before building a model of the size it claims
            check_layer_count(md.source, arch.layers, int(config.num_hidden_layers))
        code_files = md.code_files()
        encoder = is_encoder(config.model_type)
        stages = _stages(recipe)
        layered = any(s.layer_steps for s in stages)
        recipe, context_notes = _fit_context(recipe, config) if layered else (recipe, [])
        tokens, calib_name = None, None
        if layered and recipe.calibration.data == NO_DATA:
            _check_data_free(stages, lookup(config.model_type))
        elif layered:
            tokenizer = load_tokenizer(md.path, opts.trust_remote_code)
            tokens, calib_name = _calibration_tokens(recipe, tokenizer)
            if not _any_needs_data(stages, lookup(config.model_type)) and tokens.shape[0] > ERROR_WINDOWS:
                tokens = tokens[:ERROR_WINDOWS]  # statistics unused: run only the windows errors are measured on
                context_notes.append(
                    f"no pass needs calibration statistics: only the {ERROR_WINDOWS} windows output errors are"
                    " measured on were run"
                )
        cfg = json.loads(md.config_path.read_text())
        _dry_run(stages, md, cfg, opts)  # every config pass and plan checked before any work
        all_passes = [build_pass(step, i, lookup(config.model_type)) for i, step in enumerate(recipe.passes)]
        _check_order(all_passes)
        lengths, eval_notes = _eval_lengths(opts, all_passes, config)
        work.begin(_run_info(md, recipe, tokens, opts), opts.overwrite)
        eval_before = _perplexity(md.path, opts, lengths) if opts.eval_data is not None and not encoder else None
        records: list[dict[str, Any]] = []
        notes = md.notes + context_notes
        done: list[Pass] = []
        source = md
        counts = None
        for k, stage in enumerate(stages):
            interrupts.check()
            last = k == len(stages) - 1
            out_dir = work.dir if last else work.stage(k).dir / "model"
            out_dir.mkdir(parents=True, exist_ok=True)
            cfg, result = _run_stage(k, stage, source, cfg, out_dir, work.stage(k), tokens, recipe, opts)
            records += result.records
            notes += result.notes
            done += result.passes
            counts = result.counts
            if not last:  # the next stage reads this one's output
                (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
                source = open_model(out_dir)
        assert counts is not None
        copy_aux_files(md.path, work.dir)
        for f in code_files:  # remote code travels with the checkpoint that needs it
            shutil.copy2(f, work.dir / f.name)
        original = json.loads(md.config_path.read_text())
        if cfg != original:
            (work.dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (work.dir / "recipe.yaml").write_text(recipe.to_yaml())
        eval_info = None
        if opts.eval_data is not None and encoder:
            eval_info = embedding_similarity(work.dir, md.path, opts.eval_data, dtype=opts.dtype, device=opts.device)
        elif eval_before is not None:
            eval_info = _before_after(eval_before, _perplexity(work.dir, opts, lengths))
        loader = "sparsify.load" if str(cfg.get("model_type", "")).startswith(SPARSIFY_TYPE_PREFIX) else "transformers"
        report = build_report(
            run_id=opts.run_id,
            loader=loader,
            version=__version__,
            model=str(model_path),
            output=target.shown,
            model_type=config.model_type,
            recipe=recipe,
            passes=done,
            calibration={
                "text": calib_name,
                "windows": int(tokens.shape[0]),
                "seq_len": int(tokens.shape[1]),
                # output errors are measured on the first ERROR_WINDOWS calibration windows only
                "error_tokens": int(min(ERROR_WINDOWS, tokens.shape[0]) * tokens.shape[1]),
            }
            if tokens is not None
            else None,
            records=records,
            totals={
                "parameters": counts.parameters,
                "quantized_parameters": counts.quantized,
                "input_bytes": sum(Path(f).stat().st_size for f in md.source.files),
                "nonzeros": counts.nonzeros,
                "bytes": counts.bytes,
                "wall_seconds": time.perf_counter() - t_start,
                "peak_rss_bytes": peak_rss_bytes(),
            },
            eval_info=eval_info,
            notes=notes + (eval_notes if eval_before else []),
        )
        write_report(report, work.dir / "sparsify_report.json")
        (work.dir / "README.md").write_text(model_card(report, md.path / "README.md"))
    return report


def _dry_run(stages: list[_Stage], md: ModelDir, cfg: dict[str, Any], opts: Options) -> None:
    """Check what can be checked before any work: each config pass's output, each stage's plan on the
    model built from the config at that point (targets, sizes, settings the passes refuse)."""
    for stage in stages:
        arch = lookup(str(cfg.get("model_type", "")))
        for index, step in stage.config_steps:
            cfg = _edit_config(build_pass(step, index, arch), cfg)
        if not stage.layer_steps:
            continue
        config = _config_from_dict(cfg, md, opts.trust_remote_code)
        model = build_skeleton(config, is_encoder(config.model_type), opts.trust_remote_code, opts.dtype)
        _plan(model, config.model_type, stage.layer_steps)
        break  # later stages' models exist only once the earlier stages have run


NO_DATA = "none"  # calibration.data: run without calibration text (passes that need none)


def _any_needs_data(stages: list[_Stage], arch: Arch | None) -> bool:
    return any(build_pass(step, index, arch).needs_data for stage in stages for index, step in stage.layer_steps)


def _check_data_free(stages: list[_Stage], arch: Arch | None) -> None:
    """With ``calibration.data: none`` every layer pass must work without data (magnitude, RTN weight-only)."""
    for stage in stages:
        for index, step in stage.layer_steps:
            p = build_pass(step, index, arch)
            if p.needs_data:
                raise SparsifyError(
                    f"pass {index} ({p.describe()}) needs calibration data; calibration.data is 'none'"
                    " (data-free: magnitude pruning, RTN weight-only quantization)"
                )


def _check_order(passes: list[Pass]) -> None:
    """No layer pass after a terminal one (quantization), in any stage of the recipe."""
    last = None
    for p in passes:
        if last is not None and p.layerwise:
            raise SparsifyError(
                f"pass {p.index} ({p.config.type}) cannot follow pass {last.index} ({last.describe()}):"
                f" {last.config.type} must be the last layer pass of a recipe"
            )
        if p.terminal:
            last = p


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
