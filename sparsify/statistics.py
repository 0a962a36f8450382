"""What a pass can ask the calibration loop to measure about a target Linear's inputs ``X: (N, in)``.

A pass declares the statistics it needs by name (``needs = {"sq_norm", "hessian"}``); the loop gathers
only those, once per distinct input tensor (q/k/v after one norm share one set), and hands each pass
an :class:`InputStats` per Linear. A pass with an unusual need registers its own :class:`Stat`
(``custom_stats``). All accumulate in float32 on the calibration device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sparsify.distributed import SINGLE, World


class Stat:
    """An accumulator over calibration tokens; ``value()`` is the raw accumulated tensor (float32).

    Under torchrun each rank accumulates its own batches; ``reduce`` combines them (by default the ``acc``
    tensor summed, or ``op = "max"``), so every rank holds the statistic of all the windows. Sums accumulate each
    batch's float32 contribution in float64: the order in which batches (or ranks) are added then changes
    nothing once rounded back to float32, so one process and several give the same statistic."""

    op = "sum"

    def __init__(self, n_in: int, device: torch.device):
        self.n_in, self.device = n_in, device

    def add(self, X: Tensor) -> None:  # X: (N, in), float32
        raise NotImplementedError

    def value(self) -> Tensor:
        raise NotImplementedError

    def reduce(self, world: World) -> None:
        world.all_reduce_(self.acc, self.op)  # type: ignore[attr-defined]


class SqNorm(Stat):
    """``sum_t x_tj^2``, ``(in,)``: Wanda, RIA, OWL."""

    def __init__(self, n_in: int, device: torch.device):
        super().__init__(n_in, device)
        self.acc = torch.zeros(n_in, device=device, dtype=torch.float64)

    def add(self, X: Tensor) -> None:
        self.acc += X.pow(2).sum(0)  # float32 per batch, float64 across batches

    def value(self) -> Tensor:
        return self.acc.float()


class Sum(Stat):
    """``sum_t x_tj``, ``(in,)``: the mean input (FLAP's fluctuation and bias compensation)."""

    def __init__(self, n_in: int, device: torch.device):
        super().__init__(n_in, device)
        self.acc = torch.zeros(n_in, device=device, dtype=torch.float64)

    def add(self, X: Tensor) -> None:
        self.acc += X.sum(0)

    def value(self) -> Tensor:
        return self.acc.float()


class Hessian(Stat):
    """``X^T X``, ``(in, in)``: SparseGPT, GPTQ."""

    def __init__(self, n_in: int, device: torch.device):
        super().__init__(n_in, device)
        self.acc = torch.zeros(n_in, n_in, device=device, dtype=torch.float64)

    def add(self, X: Tensor) -> None:
        self.acc += X.T @ X  # (in, in): float32 per batch, float64 across batches

    def value(self) -> Tensor:
        return self.acc.float()


class AbsMax(Stat):
    """``max_t |x_tj|``, ``(in,)``: SmoothQuant's migration strength, activation ranges."""

    op = "max"

    def __init__(self, n_in: int, device: torch.device):
        super().__init__(n_in, device)
        self.acc = torch.zeros(n_in, device=device)

    def add(self, X: Tensor) -> None:
        torch.maximum(self.acc, X.abs().amax(0), out=self.acc)

    def value(self) -> Tensor:
        return self.acc


class ActiveCount(Stat):
    """``sum_t [x_tj > 0]``, ``(in,)``: how often each input (an FFN neuron, at the down projection) fires."""

    def __init__(self, n_in: int, device: torch.device):
        super().__init__(n_in, device)
        self.acc = torch.zeros(n_in, device=device)

    def add(self, X: Tensor) -> None:
        self.acc += (X > 0).sum(0, dtype=torch.float32)

    def value(self) -> Tensor:
        return self.acc


SAMPLE_ROWS = 4096  # calibration tokens kept per input (static activation scales' percentile / MSE, AWQ)


class InputSample(Stat):
    """Up to ``SAMPLE_ROWS`` calibration tokens of an input, ``(rows, in)``, kept by seeded reservoir sampling."""

    def __init__(self, n_in: int, device: torch.device):
        super().__init__(n_in, device)
        self.rows: Tensor = torch.empty(0, n_in, device=device)
        self.seen = 0
        self.gen = torch.Generator(device="cpu").manual_seed(0)

    def add(self, X: Tensor) -> None:
        n = X.shape[0]
        room = SAMPLE_ROWS - self.rows.shape[0]
        if room > 0:
            self.rows = torch.cat([self.rows, X[:room]])
        rest = X[max(room, 0) :]
        if rest.shape[0]:
            idx = self.seen + max(room, 0) + torch.arange(rest.shape[0])  # global index of each row
            slot = (torch.rand(rest.shape[0], generator=self.gen) * (idx + 1)).long()  # reservoir: keep w.p. K/(i+1)
            keep = slot < SAMPLE_ROWS
            self.rows[slot[keep].to(self.rows.device)] = rest[keep.to(rest.device)]
        self.seen += n

    def value(self) -> Tensor:
        return self.rows

    def reduce(self, world: World) -> None:
        """Every rank's sample, then ``SAMPLE_ROWS`` of them by the same seeded draw on every rank."""
        rows = world.all_gather_cat(self.rows)  # (sum of ranks' rows, in)
        if rows.shape[0] > SAMPLE_ROWS:
            keep = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))[:SAMPLE_ROWS]
            rows = rows[keep.sort().values.to(rows.device)]
        self.rows = rows


STATS: dict[str, Callable[[int, torch.device], Stat]] = {
    "sq_norm": SqNorm,
    "sum": Sum,
    "hessian": Hessian,
    "abs_max": AbsMax,
    "active_count": ActiveCount,
    "sample": InputSample,
}


@dataclass
class InputStats:
    """One Linear's input statistics: ``tokens`` seen and each requested statistic by name."""

    tokens: int = 0
    values: dict[str, Stat] = field(default_factory=dict)
    cross: Tensor | None = None  # (in, in) X_dense^T X (float64), when a pass fits the dense model's outputs
    # a routed expert's statistics widened to its layer's other tokens (sparsify.calibration.experts): the
    # tokens routed to it (None: the statistics are of the tokens it was routed, as the model computes)
    routed: int | None = None

    def __getitem__(self, name: str) -> Tensor:
        return self.values[name].value()

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def mean(self, name: str) -> Tensor:
        """A statistic divided by the token count (``sq_norm`` → mean of squares, ``hessian`` → ``X^T X / N``)."""
        return self[name] / max(self.tokens, 1)

    def add(self, x: Tensor, x_dense: Tensor | None = None) -> None:
        X = x.reshape(-1, x.shape[-1]).float()  # (N, in)
        for stat in self.values.values():
            stat.add(X)
        if self.cross is not None and x_dense is not None:
            self.cross += x_dense.reshape(-1, x.shape[-1]).float().T @ X  # float64 across batches
        self.tokens += X.shape[0]

    def reduce(self, world: World = SINGLE) -> None:
        """Combine the ranks' accumulations (a no-op in one process)."""
        if not world.active:
            return
        for stat in self.values.values():
            stat.reduce(world)
        if self.cross is not None:
            world.all_reduce_(self.cross)
        self.tokens = int(world.all_reduce_(torch.tensor([self.tokens], dtype=torch.float64)).item())

    @classmethod
    def empty(
        cls,
        n_in: int,
        names: set[str],
        device: torch.device,
        cross: bool = False,
        custom: dict[str, Callable[[int, torch.device], Stat]] | None = None,
    ) -> InputStats:
        factories = {**STATS, **(custom or {})}
        unknown = sorted(set(names) - set(factories))
        if unknown:
            raise KeyError(f"unknown statistic(s) {unknown}; known: {sorted(factories)}")
        values = {name: factories[name](n_in, device) for name in sorted(names)}
        return cls(values=values, cross=torch.zeros(n_in, n_in, device=device, dtype=torch.float64) if cross else None)


def reduce_all(stats: dict[str, InputStats], world: World) -> None:
    """Every distinct accumulator of ``stats`` reduced once (Linears fed the same input share one)."""
    for s in {id(s): s for s in stats.values()}.values():
        s.reduce(world)
