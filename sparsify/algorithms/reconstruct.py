"""Block-wise reconstruction: fit one compressed block to reproduce a teacher's outputs on calibration inputs.

The recovery step of BRECQ (Li et al. 2021, arXiv:2102.05426), OmniQuant / EfficientQAT's Block-AP (Chen et
al. 2024, arXiv:2407.11062) and the regional optimisation of Wanda++ (arXiv:2503.04992): after a decoder layer
is compressed, its remaining free parameters are trained with Adam to minimise

    L = mean_b ||f(X_b) - Y_b||^2 / mean_b ||Y_b||^2

over the calibration windows, ``X_b: (windows, seq, hidden)`` the inputs the compressed model gives the
layer and ``Y_b`` the teacher's outputs (the dense layer on the same inputs, or the dense model's hidden
states there). What the compression decided is kept by ``project`` after every step (pruned weights back
to zero, scales keep their sign); the learning rate warms up linearly then follows a cosine to zero.

Everything here is tensors and callables: the caller builds the trainable copy of the block and says how
to run it on a subset of a batch's windows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class FitResult:
    loss_before: float  # the normalised loss over every window, before the first step
    loss_after: float  # the same, after the last step (the parameters kept are the last step's)
    steps: int


def cosine_lr(step: int, steps: int, warmup: int) -> float:
    """The learning-rate factor at ``step`` (0-based): linear warm-up over ``warmup`` steps, then a cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def fit_block(
    run: Callable[[int, list[int]], Tensor],
    targets: list[Tensor],
    groups: list[dict],
    steps: int,
    windows_per_step: int,
    generator: torch.Generator,
    project: Callable[[], None] = lambda: None,
    between_steps: Callable[[], None] = lambda: None,
    warmup: float = 0.05,
    step_iter: Iterable[int] | None = None,
    step_scale: Callable[[float], float] = lambda loss: 1.0,
    autocast: torch.dtype | None = None,
    all_sum: Callable[[Tensor], Tensor] = lambda t: t,
    criterion: Callable[[Tensor, Tensor], Tensor] | None = None,
    measured: int | None = None,
) -> FitResult:
    """Adam on ``groups`` (torch.optim parameter groups, each with its ``lr``) for ``steps`` steps.

    ``run(b, rows)`` is the block's output on windows ``rows`` of batch ``b``, shaped as ``targets[b][rows]``;
    each step draws one batch and ``windows_per_step`` of its windows (seeded by ``generator``), so an epoch
    is ``sum(len(t) for t in targets) / windows_per_step`` steps. ``project()`` runs after every step (the
    constraints), ``between_steps()`` before each (an interruption check); ``step_iter``, if given, is
    ``range(steps)`` wrapped by a progress display. ``step_scale(loss_before)`` multiplies every group's
    learning rate (finer steps for a block that starts closer to its teacher). ``autocast`` (e.g. bf16): the
    training steps' forward and backward run under autocast to that dtype (the parameters, the optimiser and the
    two full-loss measurements stay fp32).

    Data-parallel (each process holding its own share of the batches): ``all_sum(t)`` sums ``t`` over the
    processes in place. The loss normaliser and the full losses are then means over every process's batches,
    and each step's gradients the mean of the processes' (each drew its own windows): every process takes the
    same steps.

    ``criterion(out, target_rows)``: another loss than the normalised squared error (a distillation's KL
    divergence, whose targets are what the teacher's outputs are computed from). ``measured``: the loss before
    and after is measured on the first ``measured`` batches only (None: all of them).
    """
    if steps < 1 or windows_per_step < 1:
        raise ValueError(f"steps and windows per step must be positive, got {steps} and {windows_per_step}")

    def mean_over_batches(per_batch: list[float]) -> float:
        total = all_sum(torch.tensor([sum(per_batch), len(per_batch)], dtype=torch.float64))  # every process's
        return float(total[0] / total[1])

    processes = float(all_sum(torch.ones(1, dtype=torch.float64)))
    if criterion is None:
        norm = mean_over_batches([float(t.float().pow(2).mean()) for t in targets])  # mean ||Y||^2 per element
        norm = norm if norm > 0 else 1.0

    device_type = targets[0].device.type

    def loss_on(b: int, rows: list[int], dtype: torch.dtype | None = None) -> Tensor:
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = run(b, rows)  # (rows, seq, hidden)
        if criterion is not None:
            return criterion(out, targets[b][rows])
        return torch.nn.functional.mse_loss(out.float(), targets[b][rows].float()) / norm

    def full_loss() -> float:
        with torch.no_grad():
            batches = targets if measured is None else targets[:measured]
            return mean_over_batches([float(loss_on(b, list(range(len(t))))) for b, t in enumerate(batches)])

    before = full_loss()
    opt = torch.optim.Adam(groups)
    base = [g["lr"] * step_scale(before) for g in opt.param_groups]
    n_warm = max(1, int(warmup * steps))
    sizes = [len(t) for t in targets]
    for step in step_iter if step_iter is not None else range(steps):
        between_steps()
        factor = cosine_lr(step, steps, n_warm)
        for g, lr in zip(opt.param_groups, base, strict=True):
            g["lr"] = lr * factor
        b = int(torch.randint(len(targets), (1,), generator=generator))
        rows = torch.randperm(sizes[b], generator=generator)[:windows_per_step].tolist()
        opt.zero_grad(set_to_none=True)
        loss_on(b, rows, autocast).backward()
        if processes > 1:
            _mean_grads(opt, all_sum, processes)
        opt.step()
        with torch.no_grad():
            project()
    return FitResult(before, full_loss(), steps)


def _mean_grads(opt: torch.optim.Optimizer, all_sum: Callable[[Tensor], Tensor], processes: float) -> None:
    """Every parameter's gradient averaged over the processes."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            all_sum(p.grad).div_(processes)
