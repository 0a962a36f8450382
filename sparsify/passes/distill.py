"""Distill: end-to-end recovery of the whole compressed model from the dense model's logits.

```yaml
- type: prune            # any compressing layer passes (prune, quantize, moe), optionally healed block-wise ...
  method: sparsegpt
  pattern: "2:4"
- type: heal
- type: distill          # ... then the whole model is trained to match the dense model's next-token distribution
  tokens: 65536          # budget: calibration tokens the training steps read (steps = tokens / (windows × seq_len))
  windows: 2             # calibration windows per step
  lr: 1.0e-3             # peak learning rate, relative to each tensor's RMS (warm-up, cosine decay)
  temperature: 1.0       # of both distributions (the loss is scaled by its square)
  vectors: true          # norms and biases train too
  precision: auto        # bf16 autocast where the chip runs it faster (measured at the start), else fp32
```

Knowledge distillation (Hinton et al. 2015, arXiv:1503.02531) as the recovery stage of LLM-Pruner
(arXiv:2305.11627), Sheared LLaMA (arXiv:2310.06694) and CMoE (arXiv:2502.04416): after the layer passes
(and block-wise healing, which fits each layer alone), every decoder layer is trained at once so that the
model's next-token distribution matches the dense model's, ``KL(p_dense || p_student)`` per token, on the
run's calibration windows. The teacher is the dense model's hidden states after its last layer, computed
layer by layer before the stage (no second model in memory); the model's own final norm and head (frozen,
never compressed) turn them into the teacher's logits at each step. What compression decided holds as in
``heal`` (:class:`~sparsify.passes.trainable.TrainableLayer`): pruned weights stay zero (N:M patterns hold),
shapes never change, quantized weights train through straight-through rounding and are re-rounded on their
grid, MoE experts and routers train. A run whose loss does not go down keeps the model as it came (warning).

The whole model is in memory for this stage (its layers, their Adam state and the activations of one step):
unlike the layer passes, its peak memory grows with depth.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsify import interrupts
from sparsify.algorithms.reconstruct import fit_block
from sparsify.errors import SparsifyError
from sparsify.modules import replaying
from sparsify.passes.base import Pass, register
from sparsify.passes.distill_config import DistillConfig
from sparsify.passes.trainable import TrainableLayer, error_scaled, fit_precision

if TYPE_CHECKING:
    from sparsify.arch import Arch
    from sparsify.calibration import ModelWork

log = logging.getLogger(__name__)

MEASURED_GROUPS = 4  # the KL before and after (which decides whether training is kept): on the first 4 steps' worth


@register("distill")
class DistillPass(Pass):
    config_cls = DistillConfig
    config: DistillConfig
    requires = frozenset()  # quantized Linears train as float weights and scales, re-rounded on their grid
    recovers = "distillation"
    uses_targets = False
    kind = "distill"
    title = "distillation (end to end)"
    columns = (
        ("name", "model", "text"),
        ("loss_before", "KL before", "err"),
        ("loss_after", "KL after", "err"),
        ("params", "parameters trained", "text"),
        ("steps", "steps", "text"),
        ("seconds", "time", "s"),
    )

    def __init__(self, config: DistillConfig, index: int, arch: Arch | None = None):
        super().__init__(config, index, arch)
        self.keep_quantized_zeros = False
        self.precision = config.precision  # auto: decided in prepare_model (kept for --resume)

    def after(self, earlier: list[Pass]) -> None:
        if self.arch is not None and not self.arch.causal:
            raise SparsifyError(
                f"pass {self.index} (distill) matches the dense model's next-token distribution; this model is an"
                " encoder (no next-token logits): use heal"
            )
        compressing = [p for p in earlier if p.layerwise and not p.recovers]
        if not compressing:
            raise SparsifyError(
                f"pass {self.index} (distill) has nothing to recover: it trains the model that the layer passes"
                " before it in the recipe compressed (prune, quantize, moe); put it after one of them"
            )
        self.keep_quantized_zeros = any(p.leaves_zeros for p in compressing)

    def describe(self) -> str:
        c = self.config
        return f"distill ({c.tokens:,} tokens, {c.windows} windows per step, lr {c.lr:g}, T {c.temperature:g})"

    def prepare_model(self, work: ModelWork) -> None:
        if self.precision == "auto":  # under torchrun: rank 0's measurement
            self.precision = work.world.gather_objects(fit_precision(work.layers, work.device, "distill"))[0]

    def decisions(self) -> dict[str, Any]:
        return {"precision": self.precision}

    def restore(self, decisions: dict[str, Any]) -> None:
        self.precision = decisions.get("precision", self.config.precision)

    def fit_model(self, work: ModelWork) -> list[dict[str, Any]]:
        c = self.config
        t0 = time.perf_counter()
        tokens, teacher = _regroup(work.tokens, c.windows), _regroup(work.teacher, c.windows)
        work.teacher.clear()  # held once, regrouped
        if not tokens:
            raise SparsifyError("distill: this process got no calibration windows")
        seq_len = int(tokens[0].shape[1])
        steps = max(1, math.ceil(c.tokens / (c.windows * seq_len * work.world.size)))
        precision = self.precision if self.precision != "auto" else "fp32"
        # the model as it came, if training does not help (on the CPU: not beside the model on a GPU)
        kept = {k: v.to("cpu", copy=True) for k, v in work.layers.state_dict().items()}
        trainables = [
            TrainableLayer(layer, c.lr, c.vectors, keep_quantized_zeros=self.keep_quantized_zeros)
            for layer in work.layers
        ]
        T = c.temperature

        def run(b: int, rows: list[int]) -> Tensor:
            return work.model(input_ids=tokens[b][rows], use_cache=False).logits  # (rows, L, vocab)

        def kl(student: Tensor, hidden: Tensor) -> Tensor:
            with torch.no_grad(), replaying(work.layers, [hidden]):  # the dense model's logits from its last states
                ids = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)  # shape only: replayed
                target = work.model(input_ids=ids, use_cache=False)
            if target.logits.shape != student.shape:  # a family whose forward does not take the replayed states
                raise SparsifyError(
                    f"distill: the teacher's logits {tuple(target.logits.shape)} do not match the model's"
                    f" {tuple(student.shape)}: this architecture cannot be distilled here"
                )
            log_p, log_q = _log_probs(target.logits, T), _log_probs(student, T)  # (rows, L, vocab)
            per_token = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / (hidden.shape[0] * hidden.shape[1])
            return per_token * T * T

        gen = torch.Generator().manual_seed(self.index)
        try:
            result = fit_block(
                run, teacher, [g for t in trainables for g in t.groups], steps, c.windows, gen,
                project=lambda: [t.project() for t in trainables], between_steps=interrupts.check,
                step_scale=error_scaled,
                step_iter=work.progress.track(range(steps), steps, "distilling"),
                autocast=torch.bfloat16 if precision == "bf16" else None, all_sum=work.world.all_reduce_,
                criterion=kl, measured=MEASURED_GROUPS,
            )  # fmt: skip
        finally:
            for t in trainables:
                t.finish()
        better = result.loss_after < result.loss_before
        if not better:
            work.layers.load_state_dict({k: v.to(work.device) for k, v in kept.items()})
            log.warning(
                "distill: training did not lower the KL divergence to the dense model (%.4g → %.4g); the model is"
                " kept as it came (try a lower --distill-lr)",
                result.loss_before,
                result.loss_after,
            )
        return [
            {
                "kind": self.kind,
                "name": "whole model",
                "pass": self.index,
                "loss_before": result.loss_before,
                "loss_after": result.loss_after if better else result.loss_before,
                "params": f"{sum(t.parameters() for t in trainables):,}",
                "steps": result.steps,
                "tokens": result.steps * c.windows * seq_len * work.world.size,
                "seconds": time.perf_counter() - t0,
                "precision": precision,
                "status": "distilled" if better else "kept as compressed",
            }
        ]

    @classmethod
    def summary(cls, records: list[dict[str, Any]]) -> list[tuple[str, str, str | None, Any]]:
        done = [r for r in records if r.get("kind") == cls.kind]
        if not done:
            return []
        r = done[-1]
        return [
            (
                "distillation",
                f"KL to the dense model {r['loss_before']:.4g} → {r['loss_after']:.4g} per token ({r['steps']} steps,"
                f" {r['tokens']:,} tokens, {r['status']})",
                "distill_kl",
                {"before": r["loss_before"], "after": r["loss_after"]},
            )
        ]


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    """``log_softmax(logits / T)`` in float32 (no scaled copy at T = 1)."""
    z = logits.float()
    return F.log_softmax(z * (1.0 / temperature) if temperature != 1 else z, -1)


def _regroup(batches: list[Tensor], size: int) -> list[Tensor]:
    """The windows of ``batches`` (each ``(B, ...)``) cut again into groups of ``size`` (the last may be smaller)."""
    if not batches:
        return []
    return list(torch.cat(batches).split(size))
