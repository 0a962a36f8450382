"""Heal: block-wise reconstruction after compression, in the same layer-wise sweep.

```yaml
- type: prune            # any compressing layer pass (prune, quantize, moe) ...
  method: sparsegpt
  pattern: "2:4"
- type: heal             # ... then each compressed layer is fitted to the dense model's hidden states
  steps: 128             # Adam steps per layer
  windows: 2             # calibration windows per step
  lr: 1.0e-2             # peak learning rate, relative to each tensor's RMS (warm-up, cosine decay)
  target: model          # model: the dense model's hidden states after the layer (each layer also corrects
                         # what the layers before it got wrong); layer: the dense layer on the compressed
                         # model's inputs
  vectors: true          # norms and biases train too
  precision: auto        # the fit's forward and backward: bf16 autocast where the chip runs it faster
                         # (measured at the start), else fp32; or fp32 / bf16
```

Per layer, after the passes before it compressed it: the teacher outputs come from the dense layers on the
fly (the dense model's hidden states tracked through each layer before the first pass touches it, or the dense
layer on the compressed inputs: no second model in memory), the layer's free
parameters train to reproduce them (:func:`sparsify.algorithms.reconstruct.fit_block`), and the next layer
gets the healed layer's outputs. What compression decided holds (:class:`~sparsify.passes.trainable.TrainableLayer`):
pruned weights stay exactly zero (N:M patterns hold), removed channels, heads, experts and layers stay removed
(shapes never change), quantized weights are trained as float weights and scales through straight-through
rounding and re-rounded on their grid at the end (EfficientQAT's Block-AP), MoE experts and routers train.

Papers: BRECQ (arXiv:2102.05426), EfficientQAT Block-AP (arXiv:2407.11062), Wanda++ regional optimisation
(arXiv:2503.04992), and the block-wise recovery of arXiv:2510.14444.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sparsify import interrupts
from sparsify.algorithms.reconstruct import fit_block
from sparsify.errors import SparsifyError
from sparsify.passes.base import Pass, register
from sparsify.passes.heal_config import HealConfig
from sparsify.passes.trainable import TrainableLayer, error_scaled, fit_precision, rows_of

if TYPE_CHECKING:
    from sparsify.arch import Arch
    from sparsify.calibration import LayerwiseRunner, LayerWork

log = logging.getLogger(__name__)

LOSS_WINDOWS = 16  # the layer loss before and after a fit: on the first batches holding this many windows


@register("heal")
class HealPass(Pass):
    config_cls = HealConfig
    config: HealConfig
    requires = frozenset()  # quantized Linears train as float weights and scales, re-rounded on their grid
    needs_grad = True
    recovers = "healing"
    uses_targets = False
    kind = "heal"
    title = "heal (block-wise reconstruction)"
    columns = (
        ("name", "layer", "text"),
        ("loss_before", "loss before", "err"),
        ("loss_after", "loss after", "err"),
        ("params", "parameters trained", "text"),
        ("seconds", "time", "s"),
    )

    def __init__(self, config: HealConfig, index: int, arch: Arch | None = None):
        super().__init__(config, index, arch)
        self.teacher = config.target
        self.keep_quantized_zeros = False
        self.precision = config.precision  # auto: decided in prepare (kept for --resume)

    def after(self, earlier: list[Pass]) -> None:
        compressing = [p for p in earlier if not isinstance(p, HealPass)]
        if not compressing:
            raise SparsifyError(
                f"pass {self.index} (heal) has nothing to heal: it fits the layers that the layer passes before"
                " it in the recipe compressed (prune, quantize, moe); put it after one of them"
            )
        self.keep_quantized_zeros = any(p.leaves_zeros for p in compressing)

    def prepare(self, runner: LayerwiseRunner) -> None:
        if self.precision != "auto":
            return
        # under torchrun: rank 0's measurement
        self.precision = runner.world.gather_objects(fit_precision(runner.layers, runner.device, "heal"))[0]

    def decisions(self) -> dict[str, Any]:
        return {"precision": self.precision}

    def restore(self, decisions: dict[str, Any]) -> None:
        self.precision = decisions.get("precision", self.config.precision)

    def targets_in(self, layer: nn.Module, prefix: str) -> dict[str, nn.Module]:
        return {prefix: layer}  # the whole layer is fitted

    def describe(self) -> str:
        c = self.config
        return (
            f"heal ({c.steps} steps × {c.windows} windows per layer, lr {c.lr:g}, target {c.target}, {self.precision})"
        )

    def compress_layer(self, work: LayerWork) -> list[dict[str, Any]]:
        c = self.config
        if work.teacher is None:
            raise SparsifyError(f"{work.prefix}: heal got no teacher outputs")  # the loop provides them
        t0 = time.perf_counter()
        # under torchrun each rank fits its share of the first ``samples`` windows (one at least)
        samples = c.samples if c.samples is None else max(1, work.world.share(c.samples))
        inputs, targets, calls = _first_windows(work.inputs, work.teacher, work.calls, samples)
        compressed = {k: v.clone() for k, v in work.layer.state_dict().items()}  # kept if the fit does not help
        trainable = TrainableLayer(work.layer, c.lr, c.vectors, keep_quantized_zeros=self.keep_quantized_zeros)
        layer = work.layer

        def run(b: int, rows: list[int]) -> Tensor:
            pos, kw = calls[b]
            out = layer(inputs[b][rows], *pos, **rows_of(kw, rows, inputs[b].shape[0]))
            return out[0] if isinstance(out, tuple) else out

        # the loss before and after: on the first batches holding LOSS_WINDOWS windows (under torchrun, each rank's
        # share of them), all where fewer
        measured = _batches_holding(targets, work.world.share(LOSS_WINDOWS))
        held = torch.tensor([float(sum(t.shape[0] for t in targets[:measured]))], dtype=torch.float64)
        loss_windows = int(work.world.all_reduce_(held).item())
        gen = torch.Generator().manual_seed(work.index)
        try:
            result = fit_block(
                run, targets, trainable.groups, c.steps, c.windows, gen, project=trainable.project,
                between_steps=interrupts.check, step_scale=error_scaled,
                step_iter=work.progress.track(range(c.steps), c.steps, f"heal {work.prefix}"),
                autocast=torch.bfloat16 if self.precision == "bf16" else None, all_sum=work.world.all_reduce_,
                measured=measured,
            )  # fmt: skip
        finally:
            trainable.finish()
        kept = result.loss_after < result.loss_before
        if not kept:  # never worse than compression left it: back to that layer, exactly
            work.layer.load_state_dict(compressed)
            log.warning(
                "heal %s: the fit did not lower the layer loss (%.3g → %.3g); the layer is kept as"
                " compressed (try a lower --heal-lr)",
                work.prefix,
                result.loss_before,
                result.loss_after,
            )
        return [
            {
                "kind": self.kind,
                "name": work.prefix,
                "layer": work.index,
                "pass": self.index,
                "loss_before": result.loss_before,
                "loss_after": result.loss_after if kept else result.loss_before,
                "params": f"{trainable.parameters():,}",
                "steps": result.steps,
                "loss_windows": loss_windows,
                "seconds": time.perf_counter() - t0,
                "precision": self.precision,
                "status": "healed" if kept else "kept as compressed",
            }
        ]

    @classmethod
    def summary(cls, records: list[dict[str, Any]]) -> list[tuple[str, str, str | None, Any]]:
        done = [r for r in records if r.get("status") == "healed"]
        if not done:
            return []
        before = sum(r["loss_before"] for r in done) / len(done)
        after = sum(r["loss_after"] for r in done) / len(done)
        change = f" ({after / before - 1:+.0%})" if before > 0 else ""
        return [
            ("healed layers", f"{len(done)}, {done[0]['steps']} steps each", "healed_layers", len(done)),
            (
                "layer loss",
                f"mean {before:.3g} → {after:.3g}{change} (output error relative to the teacher's, on"
                f" {done[0].get('loss_windows', 'the')} calibration windows)",
                "heal_loss",
                {"before": before, "after": after},
            ),
        ]


def _batches_holding(batches: list[Tensor], windows: int) -> int:
    """How many of the first ``batches`` hold at least ``windows`` windows (all of them if they hold fewer;
    none for none)."""
    if windows <= 0:
        return 0
    held = 0
    for k, b in enumerate(batches, 1):
        held += b.shape[0]
        if held >= windows:
            return k
    return len(batches)


def _first_windows(
    inputs: list[Tensor], teacher: list[Tensor], calls: list[Any], samples: int | None
) -> tuple[list[Tensor], list[Tensor], list[Any]]:
    """The batches cut to the first ``samples`` windows (all of them when None)."""
    if samples is None:
        return inputs, teacher, calls
    out_i, out_t, out_c, left = [], [], [], samples
    for h, y, (pos, kw) in zip(inputs, teacher, calls, strict=True):
        if left <= 0:
            break
        k = min(left, h.shape[0])
        rows = list(range(k))
        out_i.append(h[:k])
        out_t.append(y[:k])
        out_c.append((pos, rows_of(kw, rows, h.shape[0]) if k < h.shape[0] else kw))
        left -= k
    return out_i, out_t, out_c
