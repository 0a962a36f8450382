"""Pruning methods by name: a prune step's ``method:`` is a key of :data:`PRUNE_METHODS`, its
``structured:`` a key of :data:`STRUCTURED`.

An unstructured / N:M method is the calibration statistics it reads plus one function that prunes one
weight matrix with them; the maths lives in :mod:`sparsify.algorithms`, imported by each function when it runs
(the table and the config load without torch: ``sparsify -h``). A new method is a file there and one entry here
(the config's choices, the CLI's ``--method`` and the docs' contract test follow)::

    @prune_method("mine", needs={"sq_norm"}, options=())  # options: config keys only it reads
    def _mine(W, stats, sparsity, nm, options):  # W: (out, in) -> the pruned (out, in)
        from sparsify.algorithms.mine import my_scores

        return W * unstructured_mask(my_scores(W, stats.mean("sq_norm")), sparsity, "row")

Structured pruning removes whole FFN channels, attention head groups or layers; each kind takes the
importance metrics :data:`STRUCTURED` lists (channel metrics: :data:`~sparsify.algorithms.structured.CHANNEL_METRICS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the functions import the maths when they run: the table and the config load without torch
    from torch import Tensor

    from sparsify.statistics import InputStats

NM = tuple[int, int]  # (n, m): n non-zeros in every m consecutive inputs


class SolverOptions(Protocol):
    """The prune config's settings a method may read (:class:`~sparsify.passes.prune_config.PruneConfig` has them)."""

    blocksize: int
    dampening: float


PruneFn = Callable[["Tensor", "InputStats | None", float, "NM | None", SolverOptions], "Tensor"]


@dataclass(frozen=True)
class PruneMethod:
    name: str
    needs: frozenset[str]  # the statistics it reads of each target's inputs (empty: data-free)
    options: tuple[str, ...]  # config keys only this method reads (refused with another method)
    prune: PruneFn  # (W: (out, in), stats, sparsity, nm, options) -> the pruned W; ValueError for bad input


PRUNE_METHODS: dict[str, PruneMethod] = {}  # in the order the docs and the CLI list them


def prune_method(
    name: str, needs: set[str] | frozenset[str] = frozenset(), options: tuple[str, ...] = ()
) -> Callable[[PruneFn], PruneFn]:
    """Register an unstructured / N:M method under ``name`` (the YAML ``method:``)."""

    def add(fn: PruneFn) -> PruneFn:
        if name in PRUNE_METHODS:
            raise ValueError(f"prune method {name!r} is registered twice")
        PRUNE_METHODS[name] = PruneMethod(name, frozenset(needs), options, fn)
        return fn

    return add


def _by_scores(scores: Tensor, W: Tensor, sparsity: float, nm: NM | None) -> Tensor:
    """``W`` keeping the highest ``scores: (out, in)``: per N:M group, or the same count in every row."""
    from sparsify.algorithms import nm_mask, unstructured_mask

    keep = nm_mask(scores, *nm) if nm else unstructured_mask(scores, sparsity, "row")
    return W * keep


@prune_method("magnitude")
def _magnitude(W: Tensor, stats: InputStats | None, sparsity: float, nm: NM | None, options: SolverOptions) -> Tensor:
    from sparsify.algorithms import magnitude_mask

    return W * magnitude_mask(W, sparsity, nm)


@prune_method("wanda", needs={"sq_norm"})
def _wanda(W: Tensor, stats: InputStats | None, sparsity: float, nm: NM | None, options: SolverOptions) -> Tensor:
    from sparsify.algorithms import wanda_scores

    assert stats is not None
    return _by_scores(wanda_scores(W, stats.mean("sq_norm")), W, sparsity, nm)  # scores: (out, in)


@prune_method("ria", needs={"sq_norm"})
def _ria(W: Tensor, stats: InputStats | None, sparsity: float, nm: NM | None, options: SolverOptions) -> Tensor:
    from sparsify.algorithms import ria_scores

    assert stats is not None
    return _by_scores(ria_scores(W, stats.mean("sq_norm")), W, sparsity, nm)  # scores: (out, in)


@prune_method("sparsegpt", needs={"hessian"}, options=("blocksize", "dampening", "dense_targets"))
def _sparsegpt(W: Tensor, stats: InputStats | None, sparsity: float, nm: NM | None, options: SolverOptions) -> Tensor:
    from sparsify.algorithms import dense_output_target, sparsegpt_prune

    assert stats is not None
    H = stats.mean("hessian")  # (in, in)
    if stats.cross is not None:  # dense_targets: fit the dense model's outputs
        C = stats.cross.float() / max(stats.tokens, 1)  # (in, in), rounded as H is: equal to it where inputs agree
        W = dense_output_target(W, C, H, options.dampening)
    W_new, _ = sparsegpt_prune(W, H, sparsity, nm, options.blocksize, options.dampening, inplace=True)
    return W_new


@dataclass(frozen=True)
class StructuredKind:
    metrics: tuple[str, ...]  # the importance metrics it takes
    default_metric: str


# the names of sparsify.algorithms.structured's CHANNEL_METRICS and LAYER_METRICS (a test holds them equal): the
# config lists them without importing the maths
CHANNEL_METRIC_NAMES = ("magnitude", "wanda", "flap")
LAYER_METRIC_NAMES = ("block-influence", "angular")
STRUCTURED: dict[str, StructuredKind] = {  # what structured pruning removes
    "channels": StructuredKind(CHANNEL_METRIC_NAMES, "wanda"),  # FFN channels
    "heads": StructuredKind(CHANNEL_METRIC_NAMES, "wanda"),  # attention head groups (whole KV groups)
    "layers": StructuredKind(LAYER_METRIC_NAMES, "block-influence"),  # whole layers
}
