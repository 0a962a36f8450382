"""The statistics a pass declares about its targets' inputs (:mod:`sparsify.statistics`), gathered with
forward hooks while a layer runs over the calibration batches."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from sparsify.calibration.experts import FILL, ExpertCalibration, by_block, every_expert, expert_slots, starved, widened
from sparsify.calibration.work import LayerCall, run_layer
from sparsify.distributed import SINGLE, World
from sparsify.modules import in_features
from sparsify.statistics import InputStats, reduce_all


@contextlib.contextmanager
def hooked(modules: dict[str, nn.Module], make_hook: Callable[[str], Callable]) -> Iterator[None]:
    """Forward hooks on ``modules`` (one per fqn) for the duration of the block."""
    handles = [m.register_forward_hook(make_hook(fqn)) for fqn, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def gather_stats(
    layer: nn.Module,
    targets: dict[str, nn.Module],
    needs: set[str] | frozenset[str],
    hidden: list[Tensor],
    calls: list[LayerCall],
    device: torch.device,
    custom: dict[str, Callable] | None = None,
    outputs: list[Tensor] | None = None,
    world: World = SINGLE,
    experts: ExpertCalibration = FILL,
) -> dict[str, InputStats]:
    """Accumulate the statistics ``needs`` of ``targets``' inputs over all batches (the layer's outputs are
    appended to ``outputs`` when one is given: the same forward serves as the next layer's inputs), combined
    over the ranks of ``world`` (each ran its own windows).

    Linears fed the very same tensor (q/k/v after one norm, gate/up) share one accumulator: the
    statistics (``X^T X`` above all) are computed once per input, not once per Linear.

    Routed experts of sparse MoE blocks are calibrated as ``experts`` says (:mod:`.experts`): in ``fill`` mode
    an expert routed fewer than ``experts.min_tokens`` tokens is gathered again on all of its layer's tokens
    (its statistics' ``routed`` then holds the routed count).
    """
    slots = expert_slots(layer, targets) if experts.mode != "routed" else {}
    with widened(every_expert(slots) if experts.mode == "all" else {}):
        stats = _gather(layer, targets, needs, hidden, calls, device, custom, outputs, world)
    short = starved(slots, {f: stats[f].tokens for f in slots}, experts.min_tokens) if experts.mode == "fill" else {}
    if short:
        with widened(by_block(short)):
            again = _gather(layer, {f: targets[f] for f in short}, needs, hidden, calls, device, custom, None, world)
        for fqn in short:
            again[fqn].routed = stats[fqn].tokens
        stats.update(again)
    return stats


def _gather(
    layer: nn.Module,
    targets: dict[str, nn.Module],
    needs: set[str] | frozenset[str],
    hidden: list[Tensor],
    calls: list[LayerCall],
    device: torch.device,
    custom: dict[str, Callable] | None,
    outputs: list[Tensor] | None,
    world: World,
) -> dict[str, InputStats]:
    stats = {fqn: InputStats.empty(in_features(m), set(needs), device, custom=custom) for fqn, m in targets.items()}
    # fqn -> None (an accumulator of its own) or the fqn whose accumulator it shares, decided the first time it
    # runs (a routed expert may run in no batch before a later one)
    role: dict[str, str | None] = {}
    seen: dict[int, tuple[Tensor, str]] = {}  # id(input) -> (input kept alive, first fqn) this batch

    def hook(fqn: str) -> Callable:
        def record(_module: nn.Module, args: tuple, _output: Tensor) -> None:
            x = args[0]
            owner = seen.get(id(x))
            if owner is None:
                seen[id(x)] = (x, fqn)  # holding x keeps its id from being reused this batch
                if role.setdefault(fqn, None) is not None:
                    raise RuntimeError(f"{fqn}: input sharing changed between calibration batches")
                stats[fqn].add(x)
            elif role.setdefault(fqn, owner[1]) != owner[1]:
                raise RuntimeError(f"{fqn}: input sharing changed between calibration batches")

        return record

    with hooked(targets, hook):
        for h, call in zip(hidden, calls, strict=True):
            out = run_layer(layer, [h], [call])
            if outputs is not None:
                outputs += out
            seen.clear()
    if world.active:  # one sharing on every rank (a routed expert may run on one rank and not another), so
        # that every rank reduces the same accumulators in the same order
        mine, role = role, {}
        for part in world.gather_objects(mine):
            for fqn, leader in part.items():
                if role.get(fqn) is None:
                    role[fqn] = leader
        for fqn, leader in role.items():
            if leader is not None and mine.get(fqn, leader) is None:
                raise RuntimeError(f"{fqn}: input sharing differs between ranks")
    for follower, leader in role.items():
        if leader is not None:
            stats[follower] = stats[leader]
    reduce_all(stats, world)
    return stats


@torch.no_grad()
def gather_paired_stats(
    layer: nn.Module,
    targets: dict[str, nn.Module],
    needs: set[str] | frozenset[str],
    dense_hidden: list[Tensor],
    hidden: list[Tensor],
    calls: list[LayerCall],
    device: torch.device,
    world: World = SINGLE,
) -> tuple[dict[str, InputStats], list[Tensor]]:
    """Statistics of the compressed path plus their cross term with the dense model's path.

    Batch by batch, the (still dense) layer runs on the dense model's hidden states, then on the
    compressed model's; each Linear pairs the two inputs token by token. Returns the statistics
    and the dense path's outputs, i.e. the dense model's next hidden states.
    """
    stats = {fqn: InputStats.empty(in_features(m), set(needs), device, cross=True) for fqn, m in targets.items()}
    dense_inputs: dict[str, Tensor] = {}
    on_dense_path = [True]

    def hook(fqn: str) -> Callable:
        def record(_module: nn.Module, args: tuple, _output: Tensor) -> None:
            if on_dense_path[0]:
                dense_inputs[fqn] = args[0]
            else:
                stats[fqn].add(args[0], dense_inputs.pop(fqn))

        return record

    dense_out = []
    with hooked(targets, hook):
        for hd, h, call in zip(dense_hidden, hidden, calls, strict=True):
            on_dense_path[0] = True
            dense_out += run_layer(layer, [hd], [call])
            on_dense_path[0] = False
            run_layer(layer, [h], [call])
    reduce_all(stats, world)
    return stats, dense_out
