"""Orchestration: model folder + recipe → compressed folder + report. One code path for every command."""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsify import __version__
from sparsify.arch import SPARSIFY_TYPE_PREFIX, Arch, find_layers, is_encoder, lookup
from sparsify.calibration import ERROR_WINDOWS, InMemoryLayers, LayerwiseRunner, ResumePoint, RunOutput
from sparsify.checkpoint import (
    DEFAULT_SHARD_BYTES,
    KeyMap,
    LayerFiles,
    ModelDir,
    Partial,
    TensorInfo,
    TensorSource,
    assemble,
    build_skeleton,
    check_output,
    check_tensors,
    copy_aux_files,
    materialize,
    open_model,
    partial_output,
    release,
    set_tensor,
)
from sparsify.checkpoint.output import tensor_digest
from sparsify.data import load_text, sample_windows, tokenize
from sparsify.devices import resolve_device
from sparsify.errors import SparsifyError
from sparsify.evaluate import check_context, embedding_similarity, evaluate, load_tokenizer
from sparsify.passes import build_pass, is_layer_pass
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
    eval_seq_lens: tuple[int, ...] | None = None  # None: 512, plus 2048 when the recipe swaps attention
    eval_max_windows: int | None = None
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    resume: bool = False  # continue an unfinished run into the same output (same model, recipe, settings)
    revision: str | None = None  # branch, tag or commit when the model is a Hugging Face Hub repo id
    progress: Progress = field(default_factory=NoProgress)


class LazyLayers:
    """Provider that reads each layer from the checkpoint and, when the loop is done with it, saves it.

    Values are written in their stored precision: a tensor no pass changed is written from the input
    as it was stored (a float32 model calibrated in bfloat16 keeps its float32 norms and kept weights);
    values a pass changed are written in the stored dtype.
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
    ):
        self.layers, self.layers_path = layers, layers_path
        self.source, self.keymap, self.store = source, keymap, store
        self.dtype, self.device = dtype, device
        self.stored: dict[str, torch.dtype] = {}

    def _key(self, index: int, name: str) -> str:
        return self.keymap.to_ckpt[f"{self.layers_path}.{index}.{name}"]

    def load(self, index: int) -> nn.Module:
        layer = self.layers[index]
        names = [n for n, _ in layer.named_parameters()]
        prefix = f"{self.layers_path}.{index}"
        stored = materialize(layer, prefix, names, self.source, self.keymap, self.dtype, self.device)
        self.stored = {name: t.dtype for name, t in stored.items()}
        return layer

    @torch.no_grad()
    def round_to_storage(self, index: int, layer: nn.Module) -> None:
        """Make the weights the loop propagates with exactly the ones that will be saved."""
        for name, p in layer.named_parameters():
            stored = self.stored[name]
            if p.is_floating_point() and stored != p.dtype:
                p.copy_(p.to(stored).to(p.dtype))

    def finish(self, index: int, layer: nn.Module, write: bool, info: dict[str, Any] | None = None) -> None:
        if write and self.store is not None:
            params = [(self._key(index, name), p) for name, p in layer.named_parameters()]
            entries = [(key, TensorInfo(self._stored_dtype(key, p), tuple(p.shape))) for key, p in params]
            tensors = ((key, _in_stored_precision(p.detach().cpu(), self.source, key)) for key, p in params)
            self.store.save(index, entries, tensors, info or {})
        release(layer)

    def _stored_dtype(self, key: str, value: torch.Tensor) -> torch.dtype:
        info = self.source.info(key)
        return info.dtype if info.shape == tuple(value.shape) else value.dtype


def _in_stored_precision(value: torch.Tensor, source: TensorSource, key: str) -> torch.Tensor:
    """``value`` in the dtype ``key`` is stored in, taking the stored bits wherever no pass changed a value."""
    info = source.info(key)
    if info.shape != tuple(value.shape):
        return value  # reshaped by a pass: a new tensor, written as computed
    if value.dtype == info.dtype or not value.is_floating_point():
        return value.to(info.dtype)
    original = source.get_many([key])[key]
    untouched = value == original.to(value.dtype)  # the compute copy is the stored value, rounded
    return torch.where(untouched, original, value.to(info.dtype))


def _module_path(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise RuntimeError("module not found under root")


@dataclass
class _Plan:
    arch: Arch | None
    layers_path: str
    layers: nn.ModuleList
    passes: list[Any]
    targets: list[dict[int, dict[str, nn.Module]]]
    notes: list[str]


def _plan(model: nn.Module, model_type: str, recipe: Recipe) -> _Plan:
    """The layer passes of ``recipe`` with their targets resolved on ``model``."""
    arch = lookup(model_type)
    steps = [(index, cfg) for index, cfg in enumerate(recipe.passes) if is_layer_pass(cfg)]
    if arch is None and any(cfg.targets is None for _, cfg in steps):
        select_targets(model, None, "", 0, None, [], model_type)  # raises the "pass --targets" error
    layers_path, layers = find_layers(model, arch)
    notes: list[str] = []
    if arch is None:
        notes.append(f"model_type {model_type!r} is not in the architecture table; layers found at {layers_path}")
    passes, targets = [], []
    for index, cfg in steps:
        selection = select_targets(model, arch, layers_path, len(layers), cfg.targets, cfg.ignore, model_type)
        if selection.outside_layers:
            notes.append(
                f"pass {index} ({cfg.type}): not applied to {', '.join(selection.outside_layers)}:"
                " outside the decoder layers (lm_head and embeddings are never compressed)"
            )
        built = build_pass(cfg, index, arch.stages if arch else None)
        built.validate(selection.per_layer)
        if built.needs_dense_path and passes:
            raise SparsifyError(f"pass {index}: dense_targets is supported on the first pruning pass of a recipe only")
        passes.append(built)
        targets.append(selection.per_layer)
    return _Plan(arch, layers_path, layers, passes, targets, notes)


def _config_passes(md: ModelDir, model_type: str, recipe: Recipe) -> tuple[dict[str, Any], list[dict], list[str]]:
    """Apply the recipe's config passes (attention patterns) to the model's config; validated up front."""
    from transformers import AutoConfig

    cfg = json.loads(md.config_path.read_text())
    arch = lookup(model_type)
    layers_path = arch.layers if arch else "layers"
    records: list[dict] = []
    notes: list[str] = []
    for index, step in enumerate(recipe.passes):
        if is_layer_pass(step):
            continue
        cfg, recs, more = build_pass(step, index).apply(cfg, layers_path)
        records += recs
        notes += more
    if records:
        if str(cfg.get("model_type", "")).startswith(SPARSIFY_TYPE_PREFIX):
            register_model_type(cfg["model_type"])
        try:
            AutoConfig.for_model(**cfg)
        except Exception as e:
            raise SparsifyError(f"the rewritten config does not load in transformers: {e}") from e
    return cfg, records, notes


def _calibration_tokens(recipe: Recipe, tokenizer) -> tuple[torch.Tensor, str]:
    cal = recipe.calibration
    text = load_text(cal.data, text_column=cal.text_column, tokenizer=tokenizer)
    return sample_windows(tokenize(text, tokenizer), cal.samples, cal.seq_len, cal.seed), text.name


def _execute(plan: _Plan, runner: LayerwiseRunner, start: ResumePoint | None = None, checkpoint=None) -> RunOutput:
    for p, targets in zip(plan.passes, plan.targets, strict=True):
        p.prepare(runner, targets)
    return runner.run(plan.passes, plan.targets, start, checkpoint)


def _finish_records(plan: _Plan, output: RunOutput) -> None:
    for record in output.records:
        record["rel_error"] = output.errors.get(record["name"]) if record.get("status") == "pruned" else None
    for p in plan.passes:
        ratios = getattr(p, "outlier_ratios", None)
        if ratios is not None:
            plan.notes.append(
                f"pass {p.index}: OWL layer sparsities "
                + ", ".join(f"{s:.3f}" for s in p.layer_sparsity)
                + " (outlier ratios "
                + ", ".join(f"{r:.4f}" for r in ratios)
                + ")"
            )
    skipped = [r["name"] for r in output.records if r.get("status", "").startswith("skipped")]
    if skipped:
        plan.notes.append(f"{len(skipped)} Linear(s) skipped, see their status: {', '.join(skipped[:5])}")


def compress_model(
    model: nn.Module,
    recipe: Recipe,
    tokens: torch.Tensor,
    progress: Progress | None = None,
) -> tuple[RunOutput, list[str]]:
    """Compress an in-memory model in place with the same loop as :func:`compress` (for tests, notebooks)."""
    if not all(is_layer_pass(step) for step in recipe.passes):
        raise SparsifyError("compress_model runs layer passes only; attention passes rewrite a saved config")
    plan = _plan(model, model.config.model_type, recipe)
    device = next(model.parameters()).device
    runner = LayerwiseRunner(
        model.base_model,
        plan.layers,
        InMemoryLayers(plan.layers),
        tokens,
        recipe.calibration.batch_size,
        progress,
        device,
    )
    output = _execute(plan, runner)
    _finish_records(plan, output)
    return output, plan.notes


ATTENTION_EVAL_LENGTHS = (512, 2048)  # an attention pattern shows at contexts longer than its window


def _eval_lengths(opts: Options, recipe: Recipe, config) -> tuple[list[int], list[str]]:
    """Context lengths for perplexity: the requested ones, or the defaults, within the model's context."""
    attention = any(not is_layer_pass(step) for step in recipe.passes)
    wanted = list(opts.eval_seq_lens or (ATTENTION_EVAL_LENGTHS if attention else (512,)))
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


@dataclass
class _Skeleton:
    model: nn.Module
    keymap: KeyMap
    plan: _Plan | None = None  # None when the recipe has no layer pass
    layer_keys: list[str] = field(default_factory=list)  # checkpoint keys of the layers' parameters
    notes: list[str] = field(default_factory=list)


def _skeleton(md: ModelDir, config, recipe: Recipe, opts: Options) -> _Skeleton:
    """The model on the meta device, every tensor of the checkpoint checked against it, and only the
    tensors outside its layers read in (when the recipe has layer passes)."""
    model = build_skeleton(config, is_encoder(config.model_type), opts.trust_remote_code, opts.dtype)
    keymap = KeyMap(model, md.source)
    arch = lookup(config.model_type)
    absent, unexpected = check_tensors(model, md.source, keymap, arch.optional if arch else ())
    notes = []
    if unexpected:
        notes.append(
            f"{len(unexpected)} tensor(s) the {config.model_type} model does not use, copied unchanged:"
            f" {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else "")
        )
    if not any(is_layer_pass(step) for step in recipe.passes):
        return _Skeleton(model, keymap, notes=notes)
    plan = _plan(model, config.model_type, recipe)
    base_path = _module_path(model, model.base_model)
    base_prefix = f"{base_path}." if base_path else ""
    layer_prefix = plan.layers_path + "."
    outside = [n for n, _ in model.named_parameters() if n.startswith(base_prefix) and not n.startswith(layer_prefix)]
    if absent:  # optional parts (an encoder's pooler): not written, zero for the forward, which never reads them
        notes.append(f"not in the checkpoint and not written (optional): {', '.join(absent)}")
        for name in absent:
            set_tensor(model, name, torch.zeros(model.get_parameter(name).shape, dtype=opts.dtype))
    device = torch.device(opts.device)
    materialize(model, "", [n for n in outside if n not in absent], md.source, keymap, opts.dtype, device)
    for name, buffer in list(model.named_buffers()):
        set_tensor(model, name, buffer.to(device))
    layer_keys = [keymap.to_ckpt[n] for n, _ in model.named_parameters() if n.startswith(layer_prefix)]
    return _Skeleton(model, keymap, plan, layer_keys, notes)


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


def _run_layers(
    work: Partial, model: nn.Module, plan: _Plan, md: ModelDir, keymap: KeyMap, tokens: torch.Tensor,
    recipe: Recipe, opts: Options,
) -> RunOutput:  # fmt: skip
    """The layer-wise loop, continuing from a checkpoint of an earlier run when resuming."""
    device = torch.device(opts.device)
    store = work.layers
    provider = LazyLayers(plan.layers, plan.layers_path, md.source, keymap, store, opts.dtype, device)
    runner = LayerwiseRunner(
        model.base_model, plan.layers, provider, tokens, recipe.calibration.batch_size, opts.progress, device
    )
    start = work.resume_point()
    prior = RunOutput()
    if start is not None:
        for i in range(start[0]):
            info = store.info(i) or {}
            prior.records += info.get("records", [])
            prior.errors.update(info.get("errors", {}))
        plan.notes.append(
            f"resumed at layer {start[0]} of {len(plan.layers)}: earlier layers kept from the interrupted run"
        )
        if start[0] >= len(plan.layers):
            _finish_records(plan, prior)
            return prior
    timer = {"last": 0.0, "cost": 0.0}

    def checkpoint(next_layer: int, hidden: list[torch.Tensor], dense: list[torch.Tensor] | None) -> None:
        # Save the activations entering the next layer unless that costs much and more than ~10% of the run.
        now = time.perf_counter()
        if next_layer == len(plan.layers):  # every layer done: nothing to carry over
            work.checkpoint(next_layer, [], None)
        elif timer["cost"] < 0.05 or now - timer["last"] >= 10 * timer["cost"]:
            work.checkpoint(next_layer, hidden, dense)
            timer["last"], timer["cost"] = time.perf_counter(), time.perf_counter() - now

    output = _execute(plan, runner, start, checkpoint)
    output.records[:0] = prior.records
    output.errors.update(prior.errors)
    _finish_records(plan, output)
    return output


def compress(model_path: str | Path, recipe: Recipe, out: str | Path, options: Options | None = None) -> dict[str, Any]:
    """Run ``recipe`` on the model at ``model_path`` layer by layer and write the result to ``out``.

    The input is never modified; ``out`` appears only when complete (see :mod:`sparsify.checkpoint.output`
    for every rule). Returns the report.
    """
    opts = options or Options()
    opts = replace(opts, device=resolve_device(opts.device))
    t_start = time.perf_counter()
    md = open_model(model_path, opts.revision)
    reads = [Path(p) for p in (recipe.calibration.data, opts.eval_data) if p and not str(p).startswith("builtin:")]
    target = check_output(out, md.read_paths() + reads, md.path, opts.overwrite)
    config = md.load_config(opts.trust_remote_code)
    code_files = md.code_files()
    encoder = is_encoder(config.model_type)
    new_config, config_records, config_notes = _config_passes(md, config.model_type, recipe)
    layered = any(is_layer_pass(step) for step in recipe.passes)
    recipe, context_notes = _fit_context(recipe, config) if layered else (recipe, [])
    tokens, calib_name = None, None
    if layered:
        tokenizer = load_tokenizer(md.path, opts.trust_remote_code)
        tokens, calib_name = _calibration_tokens(recipe, tokenizer)
    lengths, eval_notes = _eval_lengths(opts, recipe, config)
    skel = _skeleton(md, config, recipe, opts)

    with partial_output(
        target, _run_info(md, recipe, tokens, opts), overwrite=opts.overwrite, resume=opts.resume
    ) as work:
        eval_before = _perplexity(md.path, opts, lengths) if opts.eval_data is not None and not encoder else None
        output = RunOutput()
        if skel.plan is not None:
            output = _run_layers(work, skel.model, skel.plan, md, skel.keymap, tokens, recipe, opts)
        notes = md.notes + skel.notes + context_notes + (skel.plan.notes if skel.plan else []) + config_notes
        done = set(skel.layer_keys)
        rest = [(k, k) for k in md.source.keys() if k not in done]
        counts = assemble(work.dir, work.layers, md.source, rest, work.state, opts.max_shard_bytes)
        copy_aux_files(md.path, work.dir)
        for f in code_files:  # remote code travels with the checkpoint that needs it
            shutil.copy2(f, work.dir / f.name)
        if config_records:
            (work.dir / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
        (work.dir / "recipe.yaml").write_text(recipe.to_yaml())
        eval_info = None
        if opts.eval_data is not None and encoder:
            eval_info = embedding_similarity(work.dir, md.path, opts.eval_data, dtype=opts.dtype, device=opts.device)
        elif eval_before is not None:
            eval_info = _before_after(eval_before, _perplexity(work.dir, opts, lengths))
        report = build_report(
            version=__version__,
            model=str(model_path),
            output=target.shown,
            model_type=config.model_type,
            recipe=recipe,
            calibration={
                "text": calib_name,
                "windows": int(tokens.shape[0]),
                "seq_len": int(tokens.shape[1]),
                # rel_error is measured on the first ERROR_WINDOWS calibration windows only
                "error_tokens": int(min(ERROR_WINDOWS, tokens.shape[0]) * tokens.shape[1]),
            }
            if tokens is not None
            else None,
            records=output.records + config_records,
            totals={
                "parameters": counts.parameters,
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


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
