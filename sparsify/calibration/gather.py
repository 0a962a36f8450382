"""The statistics a pass declares about its targets' inputs (:mod:`sparsify.statistics`), gathered with
forward hooks while a layer runs over the calibration batches."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

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
) -> dict[str, InputStats]:
    """Accumulate the statistics ``needs`` of ``targets``' inputs over all batches (the layer's outputs are
    appended to ``outputs`` when one is given: the same forward serves as the next layer's inputs), combined
    over the ranks of ``world`` (each ran its own windows).

    Linears fed the very same tensor (q/k/v after one norm, gate/up) share one accumulator: the
    statistics (``X^T X`` above all) are computed once per input, not once per Linear.
    """
    stats = {fqn: InputStats.empty(in_features(m), set(needs), device, custom=custom) for fqn, m in targets.items()}
    leader_of: dict[str, str] = {}  # follower fqn -> fqn whose accumulator it shares (from batch 0)
    seen: dict[int, tuple[Tensor, str]] = {}  # id(input) -> (input kept alive, first fqn) this batch
    first_batch = [True]

    def hook(fqn: str) -> Callable:
        def record(_module: nn.Module, args: tuple, _output: Tensor) -> None:
            x = args[0]
            owner = seen.get(id(x))
            if owner is None:
                seen[id(x)] = (x, fqn)  # holding x keeps its id from being reused this batch
                if fqn in leader_of:
                    raise RuntimeError(f"{fqn}: input sharing changed between calibration batches")
                stats[fqn].add(x)
            elif first_batch[0]:
                leader_of[fqn] = owner[1]
            elif leader_of.get(fqn) != owner[1]:
                raise RuntimeError(f"{fqn}: input sharing changed between calibration batches")

        return record

    with hooked(targets, hook):
        for h, call in zip(hidden, calls, strict=True):
            out = run_layer(layer, [h], [call])
            if outputs is not None:
                outputs += out
            seen.clear()
            first_batch[0] = False
    for follower, leader in leader_of.items():
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
