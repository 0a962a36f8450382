"""One stage: config passes, the skeleton, prepare or restore, the layer-wise sweep (or a whole-model pass), the
layer files assembled into shards."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsify.calibration import (
    LayerwiseRunner,
    ModelWork,
    Probe,
    ResumePoint,
    RunOutput,
    resumed_probe,
)
from sparsify.checkpoint import (
    LazyLayers,
    ModelDir,
    assemble,
)
from sparsify.checkpoint.stage_model import Layers, StageModel, load_outside_layers, open_stage_model, rest_keys
from sparsify.checkpoint.stage_state import StageState
from sparsify.distributed import World
from sparsify.passes import Pass
from sparsify.pipeline.layers import _finish_records, _prepare, _resolver
from sparsify.pipeline.options import Options, _Run
from sparsify.pipeline.prepare import _dtype
from sparsify.pipeline.probe import RecoveryProbe
from sparsify.plan import Stage, checked_config, config_from_dict


def _run_stage(
    stage: Stage,
    md: ModelDir,
    cfg: dict[str, Any],
    out_dir: Path,
    state: StageState,
    run: _Run,
    opts: Options,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[str], Any, dict[str, Any] | None]:
    """One stage: config passes, the sweep of its layer passes, their config edits; the stage's output
    (weights and config) written to ``out_dir``. Returns the config it leaves, its records, notes and counts,
    and where a recovery pass runs, its name and the perplexity of the model before it (None: not measured)."""
    records: list[dict[str, Any]] = []
    before_recovery = None
    for p in stage.config_passes:
        cfg = checked_config(p, p.edit_config(cfg))
        records += p.config_records()
    dtype = _dtype(run.recipe)
    skel = _stage_skeleton(md, cfg, opts, dtype)
    notes = list(skel.notes)
    layers = None
    if stage.layer_passes:
        layers = Layers.of(skel.model)
        load_outside_layers(skel, layers, md, dtype, opts.device)
        device = torch.device(opts.device)
        provider = LazyLayers(layers.modules, layers.path, md.source, skel.keymap, state.layers, dtype, device)
        runner = LayerwiseRunner(
            skel.model.base_model, layers.modules, provider, run.tokens, run.recipe.calibration.batch_size,
            opts.progress, device, layers.path, run.recipe.calibration.inputs, opts.world,
            run.recipe.calibration.experts,
        )  # fmt: skip
        runner.whole = _with_head(skel, layers, md, dtype, opts.device)
        saved = state.decisions()
        # under torchrun every rank must take the same path from here (prepare or restore, sweep or not)
        opts.world.same(
            "state of the unfinished run (decisions saved, stage complete)", [saved is not None, state.complete]
        )
        decisions = _prepare(skel.model, layers, stage.layer_passes, runner, saved)
        if saved is None:
            state.save_decisions(decisions)
        step = next((p.recovers for p in stage.layer_passes if p.recovers), None)  # a recovery pass: its name
        probe = RecoveryProbe.of(step, run, opts)  # before it: the model as it was
        if state.complete:
            output = _saved_output(state, len(layers.modules))
            before_recovery = probe.saved(state)
        else:
            output = _sweep(runner, stage, layers, state, opts.world, probe.windows)
        if output.probe is not None:
            load_outside_layers(skel, layers, md, dtype, opts.device, head=True)
            before_recovery = probe.measure(skel.model, layers, output.probe, state)
        if (start := state.resumed_at) is not None:
            notes.append(
                f"resumed at layer {start} of {len(layers.modules)}: earlier layers kept from the interrupted run"
            )
        if (missing := probe.missing(before_recovery)) is not None:
            notes.append(missing)
        _finish_records(output)
        records += output.records
        for p in stage.layer_passes:
            cfg = checked_config(p, p.edit_config(cfg))
    counts = _assemble_stage(out_dir, state, md, skel, layers, opts)
    return cfg, records, notes, counts, before_recovery


def _with_head(skel: StageModel, layers: Layers, md: ModelDir, dtype: torch.dtype, device: str):
    def whole() -> nn.Module:
        load_outside_layers(skel, layers, md, dtype, device, head=True)
        return skel.model

    return whole


def _stage_skeleton(md: ModelDir, cfg: dict[str, Any], opts: Options, dtype: torch.dtype) -> StageModel:
    """The model a stage works on (config ``cfg``, tensors from ``md``), on the meta device, checked."""
    config = config_from_dict(
        cfg, json.loads(md.config_path.read_text()), lambda: md.load_config(opts.trust_remote_code)
    )
    return open_stage_model(md, config, opts.trust_remote_code, dtype)


def _assemble_stage(
    out_dir: Path, state: StageState, md: ModelDir, skel: StageModel, layers: Layers | None, opts: Options
) -> Any:
    """The stage's output shards in ``out_dir`` from its saved layers and the input's other tensors; the
    stage marked complete. Returns the counts."""
    counts = assemble(
        out_dir, state.layers, md.source, rest_keys(md, skel.keymap, layers), state.dir, opts.max_shard_bytes
    )
    state.mark_complete()
    return counts


def _run_model_stage(
    p: Pass,
    md: ModelDir,
    dense: ModelDir,
    cfg: dict[str, Any],
    out_dir: Path,
    state: StageState,
    run: _Run,
    opts: Options,
) -> tuple[list[dict[str, Any]], list[str], Any, dict[str, Any] | None]:
    """A whole-model pass (distillation): the model the stages before wrote (``md``), read whole; the dense
    input model's (``dense``) hidden states after its last layer on the calibration windows, one layer in memory
    at a time; the pass trains; the layers saved and the output assembled as a sweep's. An interrupted stage
    starts again from ``md`` (same bytes), unless every trained layer was saved: then only the assembly is redone.
    Returns records, notes, counts and the perplexity of the model before it (None: not measured)."""
    dtype, device = _dtype(run.recipe), torch.device(opts.device)
    skel = _stage_skeleton(md, cfg, opts, dtype)
    layers = Layers.of(skel.model)
    n = len(layers.modules)
    recovered = None
    saved = state.decisions()
    trained = state.resumed and state.progress() == n  # every trained layer saved: nothing to train again
    # under torchrun every rank must take the same path from here (decide or restore, train or not)
    opts.world.same(
        "state of the unfinished run (decisions saved, stage trained, stage complete)",
        [saved is not None, trained, state.complete],
    )
    if state.complete or trained:
        records = _saved_output(state, n).records
        recovered = (state.layers.info(0) or {}).get("recovered")
    else:
        tokens, teacher = _dense_final_states(dense, run, opts)
        load_outside_layers(skel, layers, md, dtype, opts.device, head=True)
        provider = LazyLayers(layers.modules, layers.path, md.source, skel.keymap, state.layers, dtype, device)
        for i in range(n):
            provider.load(i)
        recovered = RecoveryProbe.of(p.recovers, run, opts).measure_model(skel.model, device)
        work = ModelWork(skel.model, layers.modules, tokens, teacher, device, opts.progress, opts.world)
        if saved is None:
            p.prepare_model(work)
            state.save_decisions(p.decisions())
        else:
            p.restore(saved)
        records = p.fit_model(work)
        first = {"records": records, "errors": {}, "recovered": recovered}  # what a resumed run reports
        for i, layer in enumerate(layers.modules):
            provider.finish(i, layer, write=True, info=first if i == 0 else {"records": [], "errors": {}})
        state.checkpoint(n, [], None)
    return records, list(skel.notes), _assemble_stage(out_dir, state, md, skel, layers, opts), recovered


def _dense_final_states(dense: ModelDir, run: _Run, opts: Options) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(windows, hidden)`` per calibration batch (this rank's share under torchrun): the token windows
    ``(B, L)`` and the input model's hidden states after its last layer on them ``(B, L, d)``, computed one
    layer at a time."""
    dtype, device = _dtype(run.recipe), torch.device(opts.device)
    skel = open_stage_model(dense, dense.load_config(opts.trust_remote_code), opts.trust_remote_code, dtype)
    layers = Layers.of(skel.model)
    load_outside_layers(skel, layers, dense, dtype, opts.device)
    provider = LazyLayers(layers.modules, layers.path, dense.source, skel.keymap, None, dtype, device)
    runner = LayerwiseRunner(
        skel.model.base_model, layers.modules, provider, run.tokens, run.recipe.calibration.batch_size,
        opts.progress, device, layers.path, world=opts.world,
    )  # fmt: skip
    last = len(layers.modules) - 1
    states = runner.observe(lambda work, outs: outs if work.index == last else None, "the dense model's outputs")
    return [t.to(device) for t in runner.batches()], states[-1]


def _saved_output(state: StageState, n_layers: int) -> RunOutput:
    output = RunOutput()
    for i in range(n_layers):
        info = state.layers.info(i) or {}
        output.records += info.get("records", [])
        output.errors.update(info.get("errors", {}))
    return output


def _sweep(
    runner: LayerwiseRunner,
    stage: Stage,
    layers: Layers,
    state: StageState,
    world: World,
    probe: list[torch.Tensor] | None = None,
) -> RunOutput:
    """The layer-wise loop, continuing from a checkpoint of an earlier run when resuming (under torchrun every
    rank from its own, all at the same layer: each checkpoint is taken by all of them or none); ``probe``: see
    :meth:`LayerwiseRunner.run` (a resumed sweep takes what the probe's windows became from its checkpoint)."""
    start: ResumePoint | None = state.resume_point()
    world.same("resume point (the layer its unfinished run reached)", start[0] if start is not None else None)
    prior = RunOutput()
    n = len(layers.modules)
    if start is not None:
        prior = _saved_output(state, start[0])
        if start[0] >= n:  # every layer done: what the probe's windows became, if saved
            prior.probe = resumed_probe(probe, start[3], runner.device)
            return prior
    timer = {"last": 0.0, "cost": 0.0}

    def checkpoint(
        next_layer: int, hidden: list[torch.Tensor], dense: list[torch.Tensor] | None, probe: Probe | None
    ) -> None:
        # Save the activations entering the next layer unless that costs much and more than ~10% of the run.
        now = time.perf_counter()
        if next_layer == n:  # every layer done: nothing to carry over but the probe's (a perplexity to measure)
            state.checkpoint(next_layer, [], None, probe)
        elif world.gather_objects(timer["cost"] < 0.05 or now - timer["last"] >= 10 * timer["cost"])[0]:
            state.checkpoint(next_layer, hidden, dense, probe)
            timer["last"], timer["cost"] = time.perf_counter(), time.perf_counter() - now

    output = runner.run(stage.layer_passes, _resolver(layers), start, checkpoint, probe)
    output.records[:0] = prior.records
    output.errors.update(prior.errors)
    return output


# ------------------------------------------------------------------------------------------- helpers
