"""Everything decided before any work: the plan, the calibration windows, the checks of memory, world and data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from sparsify.arch import is_encoder, lookup
from sparsify.calibration import (
    ERROR_WINDOWS,
    batch_count,
    tracks_dense_path,
)
from sparsify.checkpoint import (
    ModelDir,
    check_layer_count,
    copy_aux_files,
)
from sparsify.checkpoint.stage_model import open_stage_model
from sparsify.data import (
    BUILTIN_CALIB,
    BUILTIN_EVAL,
    check_token_ids,
    load_text,
    sample_windows,
    tokenize,
)
from sparsify.devices import available_memory
from sparsify.distributed import World
from sparsify.errors import SparsifyError
from sparsify.evaluate import (
    DEFAULT_EVAL_WINDOWS,
    eval_lengths,
    load_tokenizer,
)
from sparsify.pipeline.options import NO_DATA, Options, _Run
from sparsify.plan import Plan, config_from_dict, make_plan
from sparsify.recipe import Recipe
from sparsify.verify import check_finite


def _before_work(md: ModelDir, recipe: Recipe, opts: Options) -> _Run:
    """Everything that can refuse the run, before any work: the config, the whole plan (on the config alone),
    the input's tensors (against the config, and finite), the calibration and evaluation data."""
    config = md.load_config(opts.trust_remote_code)
    if (arch := lookup(config.model_type)) is not None:  # before building a model of the size it claims
        check_layer_count(md.source, arch.layers, int(config.num_hidden_layers))
    md.code_files()  # refuses an auto_map whose code is missing
    cfg = json.loads(md.config_path.read_text())
    if opts.dtype is not None:
        recipe = recipe.model_copy(update={"dtype": str(opts.dtype).removeprefix("torch.")})
    plan = make_plan(recipe, cfg, _config_of(md, cfg, opts), opts.trust_remote_code, _dtype(recipe))
    # the defaults the plan resolved on this model (w4a16's group size) written into OUT/recipe.yaml as numbers
    recipe = recipe.model_copy(update={"passes": [p.config for p in plan.passes]})
    layered = bool(plan.layer_passes)
    _check_world(plan, recipe, opts.world)
    notes: list[str] = list(plan.notes)
    if layered:
        recipe, fitted = _fit_context(recipe, config)
        notes += fitted
        _check_memory(plan, recipe, config, opts)
    lengths, eval_notes = eval_lengths(
        opts.eval_seq_lens, [p.eval_lengths or () for p in plan.passes], config, opts.evaluate
    )
    encoder = is_encoder(config.model_type)
    tokens, calib_name, stream, why = None, None, None, ""
    if layered and recipe.calibration.data == NO_DATA:
        _check_data_free(plan)
    elif layered:
        tokenizer = load_tokenizer(md.path, opts.trust_remote_code)
        tokens, calib_name, stream, calib_notes = _calibration_tokens(
            recipe, tokenizer, lengths if _held_out(opts, encoder) else None
        )
        notes += calib_notes
        if not any(p.needs_data for p in plan.weight_passes) and tokens.shape[0] > ERROR_WINDOWS:
            tokens = tokens[:ERROR_WINDOWS]  # statistics unused: run only the windows errors are measured on
            why = (
                f"only {ERROR_WINDOWS} of the {recipe.calibration.samples} windows ran: no pass here learns from"
                " calibration data, the layers' output errors are measured on these"
            )
    rows = getattr(config, "vocab_size", None)  # the embedding's rows (checked against its tensor next)
    check_token_ids(tokens, rows, calib_name)
    open_stage_model(md, config, opts.trust_remote_code, None)  # every tensor against the config's model
    check_finite(md.source, opts.progress)
    eval_name = f"{calib_name} (held-out windows, not calibrated on)" if stream is not None else None
    if opts.evaluate and not encoder:
        notes += eval_notes
        if stream is None:  # --eval FILE, or no calibration text of the user's: the embedded one's held-out part
            tokenizer = load_tokenizer(md.path, opts.trust_remote_code)
            text = load_text(opts.eval_data, default=BUILTIN_EVAL, tokenizer=tokenizer)
            stream, eval_name = tokenize(text, tokenizer), text.name
        check_token_ids(stream, rows, eval_name)
    return _Run(recipe, plan, config, cfg, tokens, calib_name, why, lengths, stream, eval_name, notes)


def _check_world(plan: Plan, recipe: Recipe, world: World) -> None:
    """Under torchrun: each rank has calibration windows."""
    if not world.active:
        return
    cal = recipe.calibration
    batches = batch_count(cal.samples, cal.batch_size)
    if plan.layer_passes and batches < world.size:
        raise SparsifyError(
            f"torchrun: {world.size} ranks for {batches} calibration batch(es) ({cal.samples} windows, batch size"
            f" {cal.batch_size}); every rank needs one at least (more --samples or a smaller --batch-size)"
        )


def _check_memory(plan: Plan, recipe: Recipe, config: Any, opts: Options) -> None:
    """Refuse, before any window is sampled, calibration whose hidden states cannot fit where they are kept: every
    window's, a layer's inputs and outputs at once (twice that where the dense model's path is tracked too), in the
    compute dtype on the run's device, beside the token windows (int64) on the CPU."""
    cal = recipe.calibration
    hidden = getattr(config, "hidden_size", None)
    if cal.data == NO_DATA or not isinstance(hidden, int):
        return
    used = cal.samples if any(p.needs_data for p in plan.weight_passes) else min(cal.samples, ERROR_WINDOWS)
    used = -(-used // opts.world.size)  # a rank's share
    tracked = tracks_dense_path(cal.inputs, plan.passes)
    per_window = cal.seq_len * hidden * _dtype(recipe).itemsize * (4 if tracked else 2)  # bytes of hidden states
    per_token_window = cal.seq_len * 8 + 64  # an int64 window, and its start while sampling
    on_device = opts.device != "cpu"
    needs = [(used * per_window, opts.device, per_window)] if on_device else []
    cpu_bytes = cal.samples * per_token_window + (0 if on_device else used * per_window)
    needs.append((cpu_bytes, "cpu", per_token_window + (0 if on_device else per_window)))
    for need, device, each in needs:
        have = available_memory(device)
        if have is not None and need > have:
            where = "this machine has" if device == "cpu" else f"{device} has"
            raise SparsifyError(
                f"calibration with --samples {cal.samples} (× {cal.seq_len} tokens, hidden size {hidden},"
                f" {recipe.dtype}) needs ~{need / 2**30:,.1f} GiB for its windows and activations; {where}"
                f" {have / 2**30:,.1f} GiB available: at most {max(0, have // each):,} samples fit"
            )


def _held_out(opts: Options, encoder: bool) -> bool:
    """Whether the perplexity is measured on windows held out of the calibration text."""
    return opts.evaluate and opts.eval_data is None and not encoder


def _builtin(path: str) -> bool:
    return str(path).startswith("builtin:")


def _dtype(recipe: Recipe) -> torch.dtype:
    return getattr(torch, recipe.dtype)


def _config_of(md: ModelDir, original: dict[str, Any], opts: Options):
    def config_of(cfg: dict[str, Any]):
        return config_from_dict(cfg, original, lambda: md.load_config(opts.trust_remote_code))

    return config_of


def _write_files(md: ModelDir, run: _Run, cfg: dict[str, Any], folder: Path) -> None:
    """Tokenizer, generation and licence files, remote code, the config (if changed) and the effective recipe."""
    copy_aux_files(md.path, folder)
    for f in md.code_files():  # remote code travels with the checkpoint that needs it
        shutil.copy2(f, folder / f.name)
    if cfg != run.cfg:
        (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (folder / "recipe.yaml").write_text(run.recipe.to_yaml())


def _check_data_free(plan: Plan) -> None:
    """With ``calibration.data: none`` every layer pass must work without data (magnitude, RTN weight-only)."""
    for p in plan.weight_passes:
        if p.needs_data:
            raise SparsifyError(
                f"pass {p.index} ({p.describe()}) needs calibration data; calibration.data is 'none'"
                " (data-free: magnitude pruning, RTN weight-only quantization)"
            )


# ----------------------------------------------------------------------------------- one stage


def _calibration_tokens(
    recipe: Recipe, tokenizer, eval_lengths: list[int] | None
) -> tuple[torch.Tensor, str, torch.Tensor | None, list[str]]:
    """``(windows, text name, held-out stream or None, notes)``: the calibration windows, and (``eval_lengths``
    given) tokens held out of the calibration text for the perplexity before and after.

    The embedded default text has a held-out part of its own (the same the ``eval`` command reads); a user's
    text gives its last ``DEFAULT_EVAL_WINDOWS`` windows (fewer if it is short) and is calibrated on the rest.
    """
    cal = recipe.calibration
    text = load_text(cal.data, text_column=cal.text_column, tokenizer=tokenizer)
    notes = [text.note] if text.note else []
    stream = tokenize(text, tokenizer)
    held = None
    if eval_lengths is not None and text.name != BUILTIN_CALIB:
        length = max(eval_lengths)
        windows = min(DEFAULT_EVAL_WINDOWS, (stream.numel() - cal.seq_len) // length)
        if windows >= 1:
            held, stream = stream[-windows * length :], stream[: -windows * length]
        else:
            notes.append(
                f"perplexity not measured: {text.name} is too short to hold out a {length}-token window besides"
                f" calibration (pass --eval FILE, or more text)"
            )
    return sample_windows(stream, cal.samples, cal.seq_len, cal.seed), text.name, held, notes


def _calibration_info(run: _Run) -> dict[str, Any] | None:
    if run.tokens is None:
        return None
    return {
        "text": run.calib_name,
        "windows": int(run.tokens.shape[0]),
        "seq_len": int(run.tokens.shape[1]),
        # output errors are measured on the first ERROR_WINDOWS calibration windows only
        "error_tokens": int(min(ERROR_WINDOWS, run.tokens.shape[0]) * run.tokens.shape[1]),
        **({"why": run.calib_why} if run.calib_why else {}),
    }


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
