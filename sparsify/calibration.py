"""The one layer-wise calibration loop every data-driven pass runs through.

1. Embed the calibration batch by running the model's own backbone with each layer replaced by a
   recorder that stores the layer's inputs (hidden states plus whatever the backbone passes a
   layer: position embeddings, masks) and returns the hidden states unchanged. No exception is
   raised to stop the forward; no architecture-specific code.
2. For each layer in turn: materialize it, capture the inputs of its target Linears with forward
   hooks, let each pass compress it, re-run the compressed layer to produce the next layer's inputs
   (as SparseGPT does), measure each Linear's output error against its dense weights on the way,
   write the layer out and release it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsify import interrupts
from sparsify.errors import SparsifyError
from sparsify.modules import in_features, weight_matrix
from sparsify.progress import NoProgress, Progress

log = logging.getLogger(__name__)

LayerCall = tuple[tuple[Any, ...], dict[str, Any]]  # positional args after hidden_states, kwargs
# (first layer to compress, hidden states entering it, the dense model's hidden states or None)
ResumePoint = tuple[int, list[Tensor], list[Tensor] | None]
Checkpoint = Callable[[int, list[Tensor], list[Tensor] | None], None]
ERROR_WINDOWS = 2  # calibration windows on which each Linear's output error is measured


@dataclass
class LinearStats:
    """What a pass may need about one Linear's inputs ``X: (N, in)``, accumulated over calibration."""

    sq_norm: Tensor  # (in,)  sum over tokens of x_j^2
    hessian: Tensor | None  # (in, in)  X^T X, when asked for
    cross: Tensor | None = None  # (in, in)  X_dense^T X: dense-model inputs against these inputs
    tokens: int = 0

    @classmethod
    def empty(cls, n_in: int, hessian: bool, device: torch.device, cross: bool = False) -> LinearStats:
        H = torch.zeros(n_in, n_in, device=device) if hessian or cross else None
        C = torch.zeros(n_in, n_in, device=device) if cross else None
        return cls(torch.zeros(n_in, device=device), H, C)

    def add(self, x: Tensor, x_dense: Tensor | None = None) -> None:
        X = x.reshape(-1, x.shape[-1]).float()  # (N, in)
        self.sq_norm += X.pow(2).sum(0)
        if self.hessian is not None:
            self.hessian += X.T @ X
        if self.cross is not None and x_dense is not None:
            self.cross += x_dense.reshape(-1, x.shape[-1]).float().T @ X
        self.tokens += X.shape[0]


class LayerProvider(Protocol):
    """Hands the loop one layer at a time and takes it back when done."""

    def load(self, index: int) -> nn.Module: ...

    def finish(self, index: int, layer: nn.Module, write: bool, info: dict[str, Any] | None = None) -> None:
        """Done with layer ``index``; ``write``: save it (with ``info``, its report data)."""

    def round_to_storage(self, index: int, layer: nn.Module) -> None: ...


class InMemoryLayers:
    """Provider for a model already in memory: layers are used in place."""

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers

    def load(self, index: int) -> nn.Module:
        return self.layers[index]

    def finish(self, index: int, layer: nn.Module, write: bool, info: dict[str, Any] | None = None) -> None:
        pass

    def round_to_storage(self, index: int, layer: nn.Module) -> None:
        pass


class _InputRecorder(nn.Module):
    """Stands in for layer ``index`` during the embedding forward; records its inputs."""

    def __init__(self, index: int, store: _Captured):
        super().__init__()
        self.index, self.store = index, store

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.index == 0:
            self.store.hidden.append(hidden)
        self.store.calls[self.index].append((tuple(args[1:]), kwargs))
        return hidden


@dataclass
class _Captured:
    hidden: list[Tensor]
    calls: list[list[LayerCall]]


@dataclass
class RunOutput:
    records: list[Any] = field(default_factory=list)  # pass records, in order
    errors: dict[str, float] = field(default_factory=dict)  # fqn -> relative output error


@contextlib.contextmanager
def _hooked(modules: dict[str, nn.Module], make_hook: Callable[[str], Callable]) -> Iterator[None]:
    """Forward hooks on ``modules`` (one per fqn) for the duration of the block."""
    handles = [m.register_forward_hook(make_hook(fqn)) for fqn, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run_layer(layer: nn.Module, hidden: list[Tensor], calls: list[LayerCall]) -> list[Tensor]:
    outs = []
    for h, (args, kwargs) in zip(hidden, calls, strict=True):
        out = layer(h, *args, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


class LayerwiseRunner:
    """Runs calibration token windows through a model one layer at a time."""

    def __init__(
        self,
        backbone: nn.Module,
        layers: nn.ModuleList,
        provider: LayerProvider,
        tokens: Tensor,
        batch_size: int = 8,
        progress: Progress | None = None,
        device: torch.device | str = "cpu",
    ):
        self.backbone = backbone
        self.layers = layers
        self.provider = provider
        self.tokens = tokens  # (samples, seq_len)
        self.batch_size = batch_size
        self.progress = progress or NoProgress()
        self.device = torch.device(device)

    def _batches(self) -> list[Tensor]:
        """The first batch holds ``ERROR_WINDOWS`` windows: output errors are measured on it alone."""
        head, rest = self.tokens[:ERROR_WINDOWS], self.tokens[ERROR_WINDOWS:]
        return [head, *rest.split(self.batch_size)] if rest.numel() else [head]

    @torch.no_grad()
    def _capture(self) -> _Captured:
        store = _Captured(hidden=[], calls=[[] for _ in self.layers])
        originals = list(self.layers)
        try:
            for i in range(len(originals)):
                self.layers[i] = _InputRecorder(i, store)
            for batch in self._batches():
                self.backbone(input_ids=batch.to(self.device), use_cache=False)
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
        return store

    @torch.no_grad()
    def _collect(
        self,
        layer: nn.Module,
        targets: dict[str, nn.Module],
        hidden: list[Tensor],
        calls: list[LayerCall],
        hessian: bool,
    ) -> dict[str, LinearStats]:
        """Accumulate input statistics of ``targets`` over all batches.

        Linears fed the very same tensor (q/k/v after one norm, gate/up) share one accumulator: the
        ``X^T X`` products are computed once per input, not once per Linear.
        """
        stats = {fqn: LinearStats.empty(in_features(m), hessian, self.device) for fqn, m in targets.items()}
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

        with _hooked(targets, hook):
            for h, call in zip(hidden, calls, strict=True):
                _run_layer(layer, [h], [call])
                seen.clear()
                first_batch[0] = False
        for follower, leader in leader_of.items():
            stats[follower] = stats[leader]
        return stats

    @torch.no_grad()
    def _collect_paired(
        self,
        layer: nn.Module,
        targets: dict[str, nn.Module],
        dense_hidden: list[Tensor],
        hidden: list[Tensor],
        calls: list[LayerCall],
    ) -> tuple[dict[str, LinearStats], list[Tensor]]:
        """Statistics of the compressed path plus their cross term with the dense model's path.

        Batch by batch, the (still dense) layer runs on the dense model's hidden states, then on the
        compressed model's; each Linear pairs the two inputs token by token. Returns the statistics
        and the dense path's outputs, i.e. the dense model's next hidden states.
        """
        stats = {fqn: LinearStats.empty(in_features(m), True, self.device, cross=True) for fqn, m in targets.items()}
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
        with _hooked(targets, hook):
            for hd, h, call in zip(dense_hidden, hidden, calls, strict=True):
                on_dense_path[0] = True
                dense_out += _run_layer(layer, [hd], [call])
                on_dense_path[0] = False
                _run_layer(layer, [h], [call])
        return stats, dense_out

    @torch.no_grad()
    def observe(
        self,
        targets: dict[int, dict[str, nn.Module]],
        fn: Callable[[int, dict[str, nn.Module], dict[str, LinearStats]], Any],
        description: str,
        hessian: bool = False,
    ) -> list[Any]:
        """A dense sweep: per layer, collect statistics and call ``fn``; nothing is modified or written."""
        cap = self._capture()
        hidden = cap.hidden
        results = []
        for i in self.progress.track(range(len(self.layers)), len(self.layers), description):
            interrupts.check()
            layer = self.provider.load(i)
            stats = self._collect(layer, targets[i], hidden, cap.calls[i], hessian)
            results.append(fn(i, targets[i], stats))
            hidden = _run_layer(layer, hidden, cap.calls[i])
            self.provider.finish(i, layer, write=False)
        return results

    @torch.no_grad()
    def run(
        self,
        passes: list[Any],
        targets: list[dict[int, dict[str, nn.Module]]],
        start: ResumePoint | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> RunOutput:
        """The compressing sweep: every pass is applied to each layer in turn, in recipe order.

        ``start`` continues an earlier run from a layer with the activations saved for it;
        ``checkpoint(next_layer, hidden, dense_hidden)`` is called after each layer is saved.
        """
        output = RunOutput()
        cap = self._capture()
        hidden = cap.hidden
        dense_hidden = hidden if any(p.needs_dense_path for p in passes) else None  # the dense model's path
        first = 0
        if start is not None:
            first, hidden, saved_dense = start
            hidden = [h.to(self.device) for h in hidden]
            if dense_hidden is not None:
                dense_hidden = [h.to(self.device) for h in (saved_dense or [])]
        n = len(self.layers)
        for i in self.progress.track(range(first, n), n - first, "compressing layers"):
            interrupts.check()
            t0 = time.perf_counter()
            layer = self.provider.load(i)
            touched = {fqn: m for per_pass in targets for fqn, m in per_pass[i].items()}
            dense = {fqn: weight_matrix(m).detach().float().clone() for fqn, m in touched.items()}  # (out, in) each
            done = len(output.records)
            dense_hidden = self._apply_passes(i, layer, passes, targets, hidden, dense_hidden, cap.calls[i], output)
            hidden = self._propagate(layer, touched, dense, hidden, cap.calls[i], output.errors)
            info = {"records": output.records[done:], "errors": {f: output.errors[f] for f in touched}}
            self.provider.finish(i, layer, write=True, info=info)
            if checkpoint is not None:
                checkpoint(i + 1, hidden, dense_hidden)
            log.debug("layer %d done in %.2fs", i, time.perf_counter() - t0)
        return output

    def _apply_passes(
        self,
        i: int,
        layer: nn.Module,
        passes: list[Any],
        targets: list[dict[int, dict[str, nn.Module]]],
        hidden: list[Tensor],
        dense_hidden: list[Tensor] | None,
        calls: list[LayerCall],
        output: RunOutput,
    ) -> list[Tensor] | None:
        """Every pass on layer ``i``, stage by stage; returns the dense model's next hidden states (if tracked)."""
        next_dense = None
        if dense_hidden is not None and not (passes[0].needs_dense_path and targets[0][i]):
            next_dense = _run_layer(layer, dense_hidden, calls)  # the layer is still dense here
        for p, pass_targets in zip(passes, targets, strict=True):
            layer_targets = pass_targets[i]
            if not layer_targets:
                continue
            for stage in p.stages(layer_targets):
                if p.needs_dense_path:  # the first pass only (checked when the plan is made)
                    stats, next_dense = self._collect_paired(layer, stage, dense_hidden, hidden, calls)
                elif p.needs_data:
                    stats = self._collect(layer, stage, hidden, calls, p.needs_hessian)
                else:
                    stats = {}
                output.records.extend(p.compress(i, stage, stats))
                self.provider.round_to_storage(i, layer)
            for fqn, m in layer_targets.items():
                if not torch.isfinite(m.weight).all():
                    raise SparsifyError(
                        f"{fqn}: NaN/inf after pass {p.index} ({p.describe()}); check the input weights"
                        " or raise dampening"
                    )
        return next_dense

    def _propagate(
        self,
        layer: nn.Module,
        touched: dict[str, nn.Module],
        dense: dict[str, Tensor],
        hidden: list[Tensor],
        calls: list[LayerCall],
        errors: dict[str, float],
    ) -> list[Tensor]:
        """Run the compressed layer over every batch; on the first batch (``ERROR_WINDOWS`` windows)
        also measure each Linear's relative output error ``||y - y_dense||^2 / ||y_dense||^2``: one
        extra matmul per Linear on a few windows rather than on all of them."""
        sums = {fqn: [0.0, 0.0] for fqn in touched}

        def hook(fqn: str) -> Callable:
            def measure(module: nn.Module, args: tuple, out: Tensor) -> None:
                bias = getattr(module, "bias", None)
                ref = F.linear(args[0].float(), dense[fqn], None if bias is None else bias.float())  # (.., out)
                sums[fqn][0] += float((out.float() - ref).pow(2).sum())
                sums[fqn][1] += float(ref.pow(2).sum())

            return measure

        with _hooked(touched, hook):
            first = _run_layer(layer, hidden[:1], calls[:1])
        for fqn, (num, den) in sums.items():
            errors[fqn] = num / den if den > 0 else 0.0
        return first + _run_layer(layer, hidden[1:], calls[1:])
