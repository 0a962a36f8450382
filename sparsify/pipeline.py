"""Orchestration: model folder + recipe → compressed folder + report. One code path for every command."""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsify import __version__
from sparsify.arch import Arch, find_layers, is_encoder, lookup
from sparsify.calibration import ERROR_WINDOWS, InMemoryLayers, LayerwiseRunner, RunOutput
from sparsify.checkpoint import (
    DEFAULT_SHARD_BYTES,
    KeyMap,
    ModelDir,
    SafetensorsWriter,
    TensorSource,
    atomic_dir,
    build_skeleton,
    check_output_path,
    copy_aux_files,
    materialize,
    open_model,
    release,
    set_tensor,
)
from sparsify.data import load_text, sample_windows, tokenize
from sparsify.errors import SparsifyError
from sparsify.evaluate import embedding_similarity, evaluate, load_tokenizer
from sparsify.passes import build_pass, is_layer_pass
from sparsify.progress import NoProgress, Progress
from sparsify.recipe import Recipe
from sparsify.report import build_report, write_report
from sparsify.targets import select_targets

log = logging.getLogger(__name__)


@dataclass
class Options:
    """Run settings that are not part of the recipe (they do not change the result's meaning)."""

    overwrite: bool = False
    dtype: torch.dtype = torch.float32  # compute dtype for calibration forwards and the maths
    device: str = "cpu"
    trust_remote_code: bool = False
    eval_data: str | None = None  # perplexity before/after on this text
    eval_seq_lens: tuple[int, ...] | None = None  # None: 512, plus 2048 when the recipe swaps attention
    eval_max_windows: int | None = None
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    progress: Progress = field(default_factory=NoProgress)


class LazyLayers:
    """Provider that reads each layer from the checkpoint and writes it out when the loop is done."""

    def __init__(
        self,
        layers: nn.ModuleList,
        layers_path: str,
        source: TensorSource,
        keymap: KeyMap,
        writer: SafetensorsWriter | None,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.layers, self.layers_path = layers, layers_path
        self.source, self.keymap, self.writer = source, keymap, writer
        self.dtype, self.device = dtype, device
        self.stored: dict[str, torch.dtype] = {}
        self.written: set[str] = set()

    def load(self, index: int) -> nn.Module:
        layer = self.layers[index]
        names = [n for n, _ in layer.named_parameters()]
        prefix = f"{self.layers_path}.{index}"
        self.stored = materialize(layer, prefix, names, self.source, self.keymap, self.dtype, self.device)
        return layer

    @torch.no_grad()
    def round_to_storage(self, index: int, layer: nn.Module) -> None:
        """Make the weights the loop propagates with exactly the ones that will be saved."""
        for name, p in layer.named_parameters():
            stored = self.stored[name]
            if p.is_floating_point() and stored != p.dtype:
                p.copy_(p.to(stored).to(p.dtype))

    def finish(self, index: int, layer: nn.Module, write: bool) -> None:
        if write and self.writer is not None:
            for name, p in layer.named_parameters():
                key = self.keymap.to_ckpt[f"{self.layers_path}.{index}.{name}"]
                self.writer.write(key, p)
                self.written.add(key)
        release(layer)


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
        try:
            AutoConfig.for_model(**cfg)
        except Exception as e:
            raise SparsifyError(f"the rewritten config does not load in transformers: {e}") from e
    return cfg, records, notes


def _calibration_tokens(recipe: Recipe, tokenizer) -> tuple[torch.Tensor, str]:
    cal = recipe.calibration
    text = load_text(cal.data)
    return sample_windows(tokenize(text, tokenizer), cal.samples, cal.seq_len, cal.seed), text.name


def _execute(plan: _Plan, runner: LayerwiseRunner) -> RunOutput:
    for p, targets in zip(plan.passes, plan.targets, strict=True):
        p.prepare(runner, targets)
    output = runner.run(plan.passes, plan.targets)
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
    return output


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
    return _execute(plan, runner), plan.notes


ATTENTION_EVAL_LENGTHS = (512, 2048)  # an attention pattern shows at contexts longer than its window


def _eval_lengths(opts: Options, recipe: Recipe, config) -> tuple[list[int], list[str]]:
    """Context lengths for perplexity: the requested ones, or the defaults, within the model's context."""
    attention = any(not is_layer_pass(step) for step in recipe.passes)
    wanted = list(opts.eval_seq_lens or (ATTENTION_EVAL_LENGTHS if attention else (512,)))
    limit = getattr(config, "max_position_embeddings", None)
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


def _skeleton(md: ModelDir, config, recipe: Recipe, opts: Options) -> tuple[nn.Module, _Plan, KeyMap]:
    """The model on the meta device with only the tensors outside its layers read in."""
    model = build_skeleton(config, is_encoder(config.model_type), opts.trust_remote_code, opts.dtype)
    plan = _plan(model, config.model_type, recipe)
    keymap = KeyMap(model, md.source)
    base_path = _module_path(model, model.base_model)
    base_prefix = f"{base_path}." if base_path else ""
    # Every layer tensor must be there: fail before any work, not at layer 17. A tensor outside the
    # layers that the checkpoint lacks (a BERT pooler under an MLM checkpoint) is not written and
    # does not influence the layers; it is zero-filled for the forward and reported.
    layer_prefix = plan.layers_path + "."
    keymap.require([n for n, _ in model.named_parameters() if n.startswith(layer_prefix)])
    outside = [n for n, _ in model.named_parameters() if n.startswith(base_prefix) and not n.startswith(layer_prefix)]
    absent = [n for n in outside if n not in keymap.to_ckpt]
    if absent:
        plan.notes.append(f"not in the checkpoint, zero-filled for calibration and not written: {', '.join(absent)}")
        for name in absent:
            set_tensor(model, name, torch.zeros(model.get_parameter(name).shape, dtype=opts.dtype))
    device = torch.device(opts.device)
    materialize(model, "", [n for n in outside if n not in absent], md.source, keymap, opts.dtype, device)
    for name, buffer in list(model.named_buffers()):
        set_tensor(model, name, buffer.to(device))
    return model, plan, keymap


def compress(model_path: str | Path, recipe: Recipe, out: str | Path, options: Options | None = None) -> dict[str, Any]:
    """Run ``recipe`` on the model at ``model_path`` layer by layer and write the result to ``out``.

    The input is never modified; ``out`` appears only when complete. Returns the report.
    """
    opts = options or Options()
    t_start = time.perf_counter()
    md = open_model(model_path)
    out = Path(out).expanduser()
    check_output_path(md.path, out, opts.overwrite)
    config = md.load_config(opts.trust_remote_code)
    encoder = is_encoder(config.model_type)
    new_config, config_records, config_notes = _config_passes(md, config.model_type, recipe)
    layered = any(is_layer_pass(step) for step in recipe.passes)
    if layered:
        tokenizer = load_tokenizer(md.path, opts.trust_remote_code)
        tokens, calib_name = _calibration_tokens(recipe, tokenizer)
    lengths, eval_notes = _eval_lengths(opts, recipe, config)
    eval_before = _perplexity(md.path, opts, lengths) if opts.eval_data is not None and not encoder else None
    if layered:
        model, plan, keymap = _skeleton(md, config, recipe, opts)

    with atomic_dir(out, opts.overwrite) as tmp:
        writer = SafetensorsWriter(tmp, [(k, md.source.info(k)) for k in md.source.keys()], opts.max_shard_bytes)
        try:
            written: set[str] = set()
            output = RunOutput()
            if layered:
                device = torch.device(opts.device)
                provider = LazyLayers(plan.layers, plan.layers_path, md.source, keymap, writer, opts.dtype, device)
                runner = LayerwiseRunner(
                    model.base_model,
                    plan.layers,
                    provider,
                    tokens,
                    recipe.calibration.batch_size,
                    opts.progress,
                    device,
                )
                output = _execute(plan, runner)
                written = provider.written
            totals = _copy_rest(md.source, writer, written)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        copy_aux_files(md.path, tmp)
        if config_records:
            (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
        eval_info = None
        if opts.eval_data is not None and encoder:
            eval_info = embedding_similarity(tmp, md.path, opts.eval_data, dtype=opts.dtype)
        elif eval_before is not None:
            eval_info = _before_after(eval_before, _perplexity(tmp, opts, lengths))
        report = build_report(
            version=__version__,
            model=str(model_path),
            output=str(out),
            model_type=config.model_type,
            recipe=recipe,
            calibration={
                "text": calib_name,
                "windows": int(tokens.shape[0]),
                "seq_len": int(tokens.shape[1]),
                # rel_error is measured on the first ERROR_WINDOWS calibration windows only
                "error_tokens": int(min(ERROR_WINDOWS, tokens.shape[0]) * tokens.shape[1]),
            }
            if layered
            else None,
            records=output.records + config_records,
            totals={
                **totals,
                "bytes": writer.total_bytes,
                "wall_seconds": time.perf_counter() - t_start,
                "peak_rss_bytes": peak_rss_bytes(),
            },
            eval_info=eval_info,
            notes=(plan.notes if layered else []) + config_notes + (eval_notes if eval_before else []),
        )
        write_report(report, tmp / "sparsify_report.json")
    return report


def _copy_rest(source: TensorSource, writer: SafetensorsWriter, written: set[str]) -> dict[str, int]:
    """Copy every tensor the loop did not write (embeddings, norms, heads) and count all parameters."""
    for key, tensor in source.iter_tensors([k for k in source.keys() if k not in written]):
        writer.write(key, tensor)
    return {"parameters": writer.parameters, "nonzeros": writer.nonzeros}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
