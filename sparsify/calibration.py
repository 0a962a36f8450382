"""The one layer-wise calibration loop every data-driven pass runs through.

1. Embed the calibration batch by running the model's own backbone with each layer replaced by a
   recorder that stores the layer's inputs (hidden states plus whatever the backbone passes a
   layer: position embeddings, masks) and returns the hidden states unchanged. No exception is
   raised to stop the forward; no architecture-specific code.
2. For each layer in turn: materialize it, and for each pass in recipe order resolve its targets by
   name on the layer as it is now (an earlier pass may have reshaped or replaced modules), gather the
   statistics the pass declares about their inputs (:mod:`sparsify.statistics`), and let the pass
   compress the layer. Then re-run the compressed layer to produce the next layer's inputs (as
   SparseGPT does), measuring on the first batch the layer's output error against the dense layer
   and each Linear's output error where the Linear kept its shape, save the layer and release it.

The loop knows no pass: it calls the hooks of :class:`sparsify.passes.base.Pass`.
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
from sparsify.modules import effective_weight, in_features, is_linear, weight_matrix
from sparsify.progress import NoProgress, Progress
from sparsify.statistics import InputStats

log = logging.getLogger(__name__)

LayerCall = tuple[tuple[Any, ...], dict[str, Any]]  # positional args after hidden_states, kwargs
# (first layer to compress, hidden states entering it, the dense model's hidden states or None)
ResumePoint = tuple[int, list[Tensor], list[Tensor] | None]
Checkpoint = Callable[[int, list[Tensor], list[Tensor] | None], None]
# (pass, layer index, layer module) -> the pass's targets in that layer as it is now, fqn -> module
Resolver = Callable[[Any, int, nn.Module], dict[str, nn.Module]]
ERROR_WINDOWS = 2  # calibration windows on which output errors are measured


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
    errors: dict[str, float] = field(default_factory=dict)  # fqn (a Linear or a layer) -> relative output error


@dataclass
class LayerWork:
    """What a pass sees of one layer: the module, its targets and their input statistics, its inputs."""

    index: int
    layer: nn.Module
    prefix: str  # the layer's fqn, e.g. "model.layers.3"
    targets: dict[str, nn.Module]  # fqn -> module
    stats: dict[str, InputStats]  # fqn -> statistics of its inputs (what the pass declared)
    inputs: list[Tensor]  # hidden states entering the layer, one tensor per calibration batch
    calls: list[LayerCall]  # the other arguments the backbone passes the layer, per batch
    # fqn -> the float weight (out, in) its output error is measured against: the layer's dense weights; a
    # pass that rewrites weights without changing the function (SmoothQuant's migration) updates them
    reference: dict[str, Tensor] = field(default_factory=dict)
    progress: Progress = field(default_factory=NoProgress)  # for a pass's own long loops (QAT steps)

    def run(self, inputs: list[Tensor] | None = None) -> list[Tensor]:
        """The layer's outputs on ``inputs`` (default: the calibration inputs), batch by batch."""
        return _run_layer(self.layer, self.inputs if inputs is None else inputs, self.calls)

    def relative(self, fqn: str) -> str:
        return fqn.removeprefix(self.prefix + ".")


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


def _relative_error(out: list[Tensor], ref: list[Tensor]) -> float:
    num = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(out, ref, strict=True))
    den = sum(float(r.float().pow(2).sum()) for r in ref)
    return num / den if den > 0 else 0.0


class LayerwiseRunner:
    """Runs calibration token windows through a model one layer at a time."""

    def __init__(
        self,
        backbone: nn.Module,
        layers: nn.ModuleList,
        provider: LayerProvider,
        tokens: Tensor | None,
        batch_size: int = 8,
        progress: Progress | None = None,
        device: torch.device | str = "cpu",
        layers_path: str = "layers",
    ):
        self.backbone = backbone
        self.layers = layers
        self.provider = provider
        self.tokens = tokens  # (samples, seq_len); None: no calibration data (passes that need none)
        self.batch_size = batch_size
        self.progress = progress or NoProgress()
        self.device = torch.device(device)
        self.layers_path = layers_path

    def prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}"

    def _batches(self) -> list[Tensor]:
        """The first batch holds ``ERROR_WINDOWS`` windows: output errors are measured on it alone."""
        if self.tokens is None:
            return []
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
    def collect(
        self,
        layer: nn.Module,
        targets: dict[str, nn.Module],
        needs: set[str] | frozenset[str],
        hidden: list[Tensor],
        calls: list[LayerCall],
        custom: dict[str, Callable] | None = None,
    ) -> dict[str, InputStats]:
        """Accumulate the statistics ``needs`` of ``targets``' inputs over all batches.

        Linears fed the very same tensor (q/k/v after one norm, gate/up) share one accumulator: the
        statistics (``X^T X`` above all) are computed once per input, not once per Linear.
        """
        stats = {
            fqn: InputStats.empty(in_features(m), set(needs), self.device, custom=custom) for fqn, m in targets.items()
        }
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
    def collect_paired(
        self,
        layer: nn.Module,
        targets: dict[str, nn.Module],
        needs: set[str] | frozenset[str],
        dense_hidden: list[Tensor],
        hidden: list[Tensor],
        calls: list[LayerCall],
    ) -> tuple[dict[str, InputStats], list[Tensor]]:
        """Statistics of the compressed path plus their cross term with the dense model's path.

        Batch by batch, the (still dense) layer runs on the dense model's hidden states, then on the
        compressed model's; each Linear pairs the two inputs token by token. Returns the statistics
        and the dense path's outputs, i.e. the dense model's next hidden states.
        """
        stats = {
            fqn: InputStats.empty(in_features(m), set(needs), self.device, cross=True) for fqn, m in targets.items()
        }
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
        fn: Callable[[LayerWork, list[Tensor]], Any],
        description: str,
        targets: Callable[[int, nn.Module], dict[str, nn.Module]] | None = None,
        needs: set[str] | frozenset[str] = frozenset(),
    ) -> list[Any]:
        """A dense sweep: per layer, gather ``needs`` about ``targets(i, layer)`` and call
        ``fn(work, outputs)`` with the layer's outputs; nothing is modified or written."""
        cap = self._capture()
        hidden = cap.hidden
        results = []
        for i in self.progress.track(range(len(self.layers)), len(self.layers), description):
            interrupts.check()
            layer = self.provider.load(i)
            layer_targets = targets(i, layer) if targets is not None else {}
            stats = self.collect(layer, layer_targets, needs, hidden, cap.calls[i]) if needs else {}
            work = LayerWork(i, layer, self.prefix(i), layer_targets, stats, hidden, cap.calls[i])
            outputs = _run_layer(layer, hidden, cap.calls[i])
            results.append(fn(work, outputs))
            hidden = outputs
            self.provider.finish(i, layer, write=False)
        return results

    @torch.no_grad()
    def run(
        self,
        passes: list[Any],
        resolve: Resolver,
        start: ResumePoint | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> RunOutput:
        """The compressing sweep: every pass is applied to each layer in turn, in recipe order.

        ``resolve(pass, i, layer)`` gives a pass's targets in the layer as it is at that moment.
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
            reference = _run_layer(layer, hidden[:1], cap.calls[i][:1])  # the dense layer's first-batch outputs
            touched = {fqn: m for p in passes for fqn, m in resolve(p, i, layer).items() if is_linear(m)}
            dense = {fqn: weight_matrix(m).detach().float().clone() for fqn, m in touched.items()}  # (out, in) each
            done = len(output.records)
            dense_hidden = self._apply_passes(
                i, layer, passes, resolve, hidden, dense_hidden, cap.calls[i], output, dense
            )
            hidden = self._propagate(i, layer, dense, reference, hidden, cap.calls[i], output.errors)
            errors = {
                k: v for k, v in output.errors.items() if k == self.prefix(i) or k.startswith(self.prefix(i) + ".")
            }
            self.provider.finish(i, layer, write=True, info={"records": output.records[done:], "errors": errors})
            if checkpoint is not None:
                checkpoint(i + 1, hidden, dense_hidden)
            log.debug("layer %d done in %.2fs", i, time.perf_counter() - t0)
        return output

    def _apply_passes(
        self,
        i: int,
        layer: nn.Module,
        passes: list[Any],
        resolve: Resolver,
        hidden: list[Tensor],
        dense_hidden: list[Tensor] | None,
        calls: list[LayerCall],
        output: RunOutput,
        reference: dict[str, Tensor] | None = None,
    ) -> list[Tensor] | None:
        """Every pass on layer ``i``, stage by stage; returns the dense model's next hidden states (if tracked)."""
        next_dense = None
        if dense_hidden is not None and not (passes[0].needs_dense_path and resolve(passes[0], i, layer)):
            next_dense = _run_layer(layer, dense_hidden, calls)  # the layer is still dense here
        for p in passes:
            targets = resolve(p, i, layer)  # by name, on the layer as the passes before left it
            if not targets:
                continue
            for stage in p.stages(targets):
                watched = p.stat_targets(stage)
                if p.needs_dense_path:  # the first pass only (checked when the plan is made)
                    stats, next_dense = self.collect_paired(layer, watched, p.needs, dense_hidden, hidden, calls)
                elif p.needs or p.custom_stats:
                    needs = set(p.needs) | set(p.custom_stats)
                    stats = self.collect(layer, watched, needs, hidden, calls, p.custom_stats)
                else:
                    stats = {}
                work = LayerWork(i, layer, self.prefix(i), stage, stats, hidden, calls, reference or {}, self.progress)
                with torch.enable_grad() if p.needs_grad else contextlib.nullcontext():
                    output.records.extend(p.compress_layer(work))
                self.provider.round_to_storage(i, layer)
            bad = [n for n, t in layer.named_parameters() if t.is_floating_point() and not torch.isfinite(t).all()]
            if bad:
                raise SparsifyError(
                    f"{self.prefix(i)}.{bad[0]}: NaN/inf after pass {p.index} ({p.describe()}); check the input"
                    " weights and the pass's settings"
                )
        return next_dense

    @torch.no_grad()
    def _propagate(
        self,
        i: int,
        layer: nn.Module,
        dense: dict[str, Tensor],
        reference: list[Tensor],
        hidden: list[Tensor],
        calls: list[LayerCall],
        errors: dict[str, float],
    ) -> list[Tensor]:
        """Run the compressed layer over every batch. On the first batch (``ERROR_WINDOWS`` windows) also
        measure the layer's relative output error ``||y - y_dense||^2 / ||y_dense||^2`` and the same for
        each Linear that kept its shape (one extra matmul per Linear on a few windows)."""
        modules = {f"{self.prefix(i)}.{n}": m for n, m in layer.named_modules() if n}
        still = {
            fqn: modules[fqn]
            for fqn, W in dense.items()
            if fqn in modules and (E := effective_weight(modules[fqn])) is not None and E.shape == W.shape
        }
        sums = {fqn: [0.0, 0.0] for fqn in still}

        def hook(fqn: str) -> Callable:
            def measure(module: nn.Module, args: tuple, out: Tensor) -> None:
                bias = getattr(module, "bias", None)
                ref = F.linear(args[0].float(), dense[fqn], None if bias is None else bias.float())  # (.., out)
                sums[fqn][0] += float((out.float() - ref).pow(2).sum())
                sums[fqn][1] += float(ref.pow(2).sum())

            return measure

        with _hooked(still, hook):
            first = _run_layer(layer, hidden[:1], calls[:1])
        if not first:  # no calibration data: nothing measured (never a 0.0 that looks like a result)
            return []
        for fqn, (num, den) in sums.items():
            errors[fqn] = num / den if den > 0 else 0.0
        errors[self.prefix(i)] = _relative_error(first, reference)
        return first + _run_layer(layer, hidden[1:], calls[1:])
