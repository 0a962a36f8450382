"""The layer-wise sweeps: :meth:`LayerwiseRunner.run` compresses, :meth:`LayerwiseRunner.observe` only looks.

Per layer: load it, compress it (:mod:`.compress`), feed the calibration data forward through it
(:mod:`.forward`), hand it back to the provider; the layers' inputs come from one recorded forward of the
backbone (:mod:`.capture`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from sparsify import interrupts
from sparsify.calibration.capture import Captured, calibration_batches, capture_inputs
from sparsify.calibration.compress import Resolver, compress_layer
from sparsify.calibration.experts import FILL, ExpertCalibration
from sparsify.calibration.forward import feed_forward
from sparsify.calibration.gather import gather_stats
from sparsify.calibration.work import LayerCall, LayerProvider, LayerWork, RunOutput, run_layer
from sparsify.distributed import SINGLE, World
from sparsify.modules import is_linear, weight_matrix
from sparsify.progress import NoProgress, Progress

log = logging.getLogger(__name__)

# (first layer to compress, hidden states entering it, the dense model's hidden states or None, the probe's
# (token windows, hidden states) per batch or None)
Probe = list[tuple[Tensor, Tensor]]
ResumePoint = tuple[int, list[Tensor], list[Tensor] | None, Probe | None]
Checkpoint = Callable[[int, list[Tensor], list[Tensor] | None, Probe | None], None]


def resumed_probe(probe: list[Tensor] | None, saved: Probe | None, device: torch.device) -> Probe | None:
    """The probe's saved (token windows, hidden states) on ``device``, if saved for these very windows."""
    if probe is None or saved is None or len(saved) != len(probe):
        return None
    if not all(torch.equal(t, s) for t, (s, _) in zip(probe, saved, strict=True)):
        return None  # another evaluation text, window length or count than the interrupted run's
    return [(t, h.to(device)) for t, (_, h) in zip(probe, saved, strict=True)]


def tracks_dense_path(inputs: str, passes: list[Any]) -> bool:
    """Whether a sweep also carries the dense model's hidden states beside the compressed model's (a pass fits the
    dense model's outputs, or trains against them), as it does on compressed inputs."""
    return inputs == "compressed" and any(p.needs_dense_path or p.teacher == "model" for p in passes)


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
        inputs: str = "compressed",
        world: World = SINGLE,
        experts: ExpertCalibration = FILL,
    ):
        self.backbone = backbone
        self.experts = experts  # how routed experts of MoE blocks are calibrated (see .experts)
        self.layers = layers
        self.provider = provider
        self.tokens = tokens  # (samples, seq_len); None: no calibration data (passes that need none)
        self.world = world
        self.batch_size = batch_size
        self.progress = progress or NoProgress()
        self.device = torch.device(device)
        self.layers_path = layers_path
        self.inputs = (
            inputs  # compressed: each layer calibrated on the compressed layers' outputs; dense: the dense model's
        )
        # the whole model, its LM head loaded (the layers replayed or loaded one at a time), for a pass that
        # needs the loss (a bit budget's Fisher); None: not available
        self.whole: Callable[[], nn.Module] | None = None

    def prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}"

    def capture(self, batches: list[Tensor] | None = None) -> Captured:
        """What enters every layer on the calibration batches (see :mod:`.capture`); under torchrun, on this rank's
        share of them: whole batches, as one process makes them (rank 0 holds the first, which output errors
        are measured on), so each batch's statistics are the very same numbers. ``batches``: only these (the
        first of :meth:`batches`)."""
        return capture_inputs(self.backbone, self.layers, self.batches() if batches is None else batches, self.device)

    def _share(self) -> tuple[list[Tensor], slice]:
        """Every calibration batch, as one process cuts them, and which of them are this rank's."""
        batches = calibration_batches(self.tokens, self.batch_size)
        return batches, self.world.shard(len(batches))

    def batches(self) -> list[Tensor]:
        """This rank's calibration batches (token windows, ``(B, L)`` each): the ones :meth:`capture` runs."""
        batches, mine = self._share()
        return batches[mine]

    def first_window(self) -> int:
        """The calibration index of this rank's first window (0 in one process)."""
        batches, mine = self._share()
        return sum(int(b.shape[0]) for b in batches[: mine.start])

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
        cap = self.capture()
        hidden = cap.hidden
        results = []
        for i in self.progress.track(range(len(self.layers)), len(self.layers), description):
            interrupts.check()
            layer = self.provider.load(i)
            layer_targets = targets(i, layer) if targets is not None else {}
            outputs: list[Tensor] = []  # the statistics' forward gives the outputs too: one forward per layer
            if needs:
                stats = gather_stats(
                    layer, layer_targets, needs, hidden, cap.calls[i], self.device, None, outputs, self.world,
                    self.experts,
                )  # fmt: skip
            else:
                stats, outputs = {}, run_layer(layer, hidden, cap.calls[i])
            work = LayerWork(i, layer, self.prefix(i), layer_targets, stats, hidden, cap.calls[i], world=self.world)
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
        probe: list[Tensor] | None = None,
    ) -> RunOutput:
        """The compressing sweep: every pass is applied to each layer in turn, in recipe order.

        ``resolve(pass, i, layer)`` gives a pass's targets in the layer as it is at that moment.
        ``start`` continues an earlier run from a layer with the activations saved for it;
        ``checkpoint(next_layer, hidden, dense_hidden, probe_hidden)`` is called after each layer is saved.
        ``probe`` (batches of token windows, ``(B, L)``): when a recovery pass (heal) runs, these are fed through
        every layer as it was just before that pass, into ``output.probe`` (on resume, from the probe's hidden
        states saved with ``start``; none saved: not measured).
        """
        output = RunOutput()
        cap = self.capture()
        hidden = cap.hidden
        probe_calls: list[list[LayerCall]] | None = None
        saved_probe = resumed_probe(probe, start[3], self.device) if start is not None else None
        if probe is not None and (start is None or saved_probe) and any(p.recovers for p in passes):
            probed = capture_inputs(self.backbone, self.layers, probe, self.device)
            output.probe = saved_probe or list(zip(probe, probed.hidden, strict=True))
            probe_calls = probed.calls
        dense_hidden = hidden if tracks_dense_path(self.inputs, passes) else None  # the dense model's path
        first = 0
        if start is not None:
            first, hidden, saved_dense, _ = start
            hidden = [h.to(self.device) for h in hidden]
            if dense_hidden is not None:
                dense_hidden = [h.to(self.device) for h in (saved_dense or [])]
        n = len(self.layers)
        for i in self.progress.track(range(first, n), n - first, "compressing layers"):
            interrupts.check()
            t0 = time.perf_counter()
            hidden, dense_hidden = self._sweep_layer(
                i, passes, resolve, hidden, dense_hidden, cap.calls[i], output, probe_calls[i] if probe_calls else None
            )
            if checkpoint is not None:
                checkpoint(i + 1, hidden, dense_hidden, output.probe)
            log.debug("layer %d done in %.2fs", i, time.perf_counter() - t0)
        return output

    def _sweep_layer(
        self,
        i: int,
        passes: list[Any],
        resolve: Resolver,
        hidden: list[Tensor],
        dense_hidden: list[Tensor] | None,
        calls: list[LayerCall],
        output: RunOutput,
        probe_calls: list[LayerCall] | None = None,
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        """Load layer ``i``, compress it, feed the data forward through it, save it; the next layer's inputs
        (the compressed model's, and the dense model's if tracked). With ``probe_calls``, ``output.probe`` goes
        through the layer as it is before a recovery pass (or as it ends, where none has targets here)."""
        prefix = self.prefix(i)
        layer = self.provider.load(i)
        one_forward = self.inputs == "dense"
        # the dense layer's first-batch outputs (with dense inputs: the first of the outputs the passes compute)
        reference = [] if one_forward else run_layer(layer, hidden[:1], calls[:1])
        touched = {fqn: m for p in passes for fqn, m in resolve(p, i, layer).items() if is_linear(m)}
        dense = {fqn: weight_matrix(m).detach().float().clone() for fqn, m in touched.items()}  # (out, in) each
        done = len(output.records)
        work = LayerWork(i, layer, prefix, {}, {}, hidden, calls, dense, self.progress, world=self.world)
        probed = probe_calls is None

        def before_recovery() -> None:
            nonlocal probed
            assert output.probe is not None and probe_calls is not None
            outs = run_layer(layer, [h for _, h in output.probe], probe_calls)
            output.probe = [(t, h) for (t, _), h in zip(output.probe, outs, strict=True)]
            probed = True

        dense_hidden, dense_out = compress_layer(
            work, passes, resolve, dense_hidden, self.device, lambda: self.provider.round_to_storage(i, layer),
            output.records, dense_inputs=one_forward, world=self.world,
            before_recovery=None if probed else before_recovery, experts=self.experts,
        )  # fmt: skip
        if not probed:  # nothing to recover in this layer: as it ends
            before_recovery()
        if one_forward:  # the next layer takes the dense outputs; the compressed layer runs on one batch, for errors
            assert dense_out is not None
            feed_forward(prefix, layer, dense, dense_out[:1], hidden[:1], calls[:1], output.errors)
            hidden = dense_out
        else:
            hidden = feed_forward(prefix, layer, dense, reference, hidden, calls, output.errors)
        errors = {k: v for k, v in output.errors.items() if k == prefix or k.startswith(prefix + ".")}
        self.provider.finish(i, layer, write=True, info={"records": output.records[done:], "errors": errors})
        return hidden, dense_hidden
