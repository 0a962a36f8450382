"""Step 2 of each layer: every pass in recipe order, stage by stage, on the layer as the passes before left it,
each given the statistics it declared about its targets' inputs."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from sparsify.calibration.experts import FILL, ExpertCalibration
from sparsify.calibration.gather import gather_paired_stats, gather_stats
from sparsify.calibration.work import LayerWork, run_layer
from sparsify.distributed import SINGLE, World
from sparsify.errors import SparsifyError
from sparsify.modules import replace_module
from sparsify.statistics import InputStats

# (pass, layer index, layer module) -> the pass's targets in that layer as it is now, fqn -> module
Resolver = Callable[[Any, int, nn.Module], dict[str, nn.Module]]


def compress_layer(
    layer_work: LayerWork,
    passes: list[Any],
    resolve: Resolver,
    dense_hidden: list[Tensor] | None,
    device: torch.device,
    round_to_storage: Callable[[], None],
    records: list[Any],
    dense_inputs: bool = False,
    world: World = SINGLE,
    before_recovery: Callable[[], None] | None = None,
    experts: ExpertCalibration = FILL,
) -> tuple[list[Tensor] | None, list[Tensor] | None]:
    """Every pass on the layer of ``layer_work`` (its targets and statistics filled in per stage), its report
    rows appended to ``records``. Returns the dense model's next hidden states (if ``dense_hidden`` is tracked)
    and the dense layer's outputs on ``layer_work.inputs`` (computed when a teacher or ``dense_inputs`` needs
    them; with ``dense_inputs``, where the inputs are the dense model's own, they are the next layer's inputs and
    come from the first statistics' forward when there is one: one forward of the layer, not two).

    Under torchrun (``world``) the statistics are combined over the ranks; a pass whose targets are independent
    (``Pass.per_target``) solves its share of each stage's targets on each rank, any other on every rank; either
    way each rank then holds the same layer (broadcast from where it was computed).

    ``before_recovery()`` is called once, before the first recovery pass (heal) that has targets here."""
    i, layer, hidden, calls = layer_work.index, layer_work.layer, layer_work.inputs, layer_work.calls
    next_dense = None
    if dense_hidden is not None and not (passes[0].needs_dense_path and resolve(passes[0], i, layer)):
        next_dense = run_layer(layer, dense_hidden, calls)  # the layer is still dense here
    # The dense layer's outputs on these inputs: the next layer's inputs (dense inputs) or a teacher's targets.
    # The first pass's statistics' forward runs the still-dense layer on these very inputs: taken from there.
    wanted = dense_inputs or any(p.teacher == "layer" for p in passes)
    first = next((p for p in passes if resolve(p, i, layer)), None)
    from_stats = wanted and first is not None and bool(first.needs or first.custom_stats) and not first.needs_dense_path
    dense_layer_out = run_layer(layer, hidden, calls) if wanted and not from_stats else None
    for p in passes:
        targets = resolve(p, i, layer)  # by name, on the layer as the passes before left it
        if not targets:
            continue
        if p.recovers and before_recovery is not None:
            before_recovery()
            before_recovery = None
        for stage in p.stages(targets):
            watched = p.stat_targets(stage)
            stats: dict[str, InputStats] = {}
            if p.needs_dense_path:  # the first pass only (checked when the plan is made)
                assert dense_hidden is not None
                stats, next_dense = gather_paired_stats(
                    layer, watched, p.needs, dense_hidden, hidden, calls, device, world
                )
            elif p.needs or p.custom_stats:
                needs = set(p.needs) | set(p.custom_stats)
                keep = [] if from_stats and dense_layer_out is None else None  # the layer is still dense here
                stats = gather_stats(layer, watched, needs, hidden, calls, device, p.custom_stats, keep, world, experts)
                dense_layer_out = keep if keep is not None else dense_layer_out
            model_path = dense_layer_out if dense_inputs else next_dense
            teacher = {"layer": dense_layer_out, "model": model_path}.get(p.teacher or "")
            work = dataclasses.replace(layer_work, targets=stage, stats=stats, teacher=teacher)
            with torch.enable_grad() if p.needs_grad else contextlib.nullcontext():
                if world.active and p.per_target:
                    records.extend(_spread(p, work, world))
                else:  # a refusal on any rank is every rank's (none waits on the others' broadcast)
                    records.extend(world.checked(lambda p=p, work=work: p.compress_layer(work)))
                    world.broadcast_module_(layer)  # computed alike on every rank: rank 0's is the one written
            round_to_storage()
        _check_finite(layer, layer_work.prefix, p)
    return next_dense, dense_layer_out


def _spread(p: Any, work: LayerWork, world: World) -> list[Any]:
    """A stage's targets dealt round-robin over the ranks; each solves its own, then every target is broadcast
    from the rank that solved it (its tensors, or the whole module where the pass replaced it). Returns the
    report rows of all the targets, in the stage's order."""
    names = list(work.targets)
    owner = {fqn: j % world.size for j, fqn in enumerate(names)}
    mine = {fqn: m for fqn, m in work.targets.items() if owner[fqn] == world.rank}
    rows = world.checked(lambda: p.compress_layer(dataclasses.replace(work, targets=mine)) if mine else [])
    for fqn, module in work.targets.items():
        name = work.relative(fqn)
        now = work.layer.get_submodule(name)  # the pass may have put another module there (a quantized Linear)
        sent = world.broadcast_object(now if now is not module else None, src=owner[fqn])
        if sent is None:
            world.broadcast_module_(module, src=owner[fqn])  # changed in place: its tensors
        elif world.rank != owner[fqn]:  # unpickled on the sender's device: moved to this rank's
            replace_module(work.layer, name, sent.to(next(module.parameters()).device))
    every = [row for part in world.gather_objects(rows) for row in part]
    return sorted(every, key=lambda row: names.index(row["name"]))


def _check_finite(layer: nn.Module, prefix: str, p: Any) -> None:
    bad = [n for n, t in layer.named_parameters() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise SparsifyError(
            f"{prefix}.{bad[0]}: NaN/inf after pass {p.index} ({p.describe()}); check the input"
            " weights and the pass's settings"
        )
