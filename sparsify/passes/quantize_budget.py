"""A bit budget for weight-only quantization: int4 or int8 for each Linear, chosen by measured sensitivity.

``target_bpw: 5`` (bits per weight over the quantized Linears, scales and zero points counted) or
``target_size: 100MB`` (every tensor of the written checkpoint: embeddings, norms, LM head, as stored) on a
``w4a16`` quantize pass. Before the first layer is quantized (the pass's ``prepare``):

1. the per-token Fisher diagonal ``F`` of every target's weight on the first calibration windows
   (:mod:`sparsify.calibration.fisher`: a forward and a backward sweep, layer by layer);
2. each target's predicted damage at int4 (the pass's group size) and int8 (per channel): the KL divergence
   ``0.5 * sum(F * (W - Q(W))**2)`` per token, ``Q`` the round-to-nearest grid of that scheme, and its bytes in
   the compressed-tensors checkpoint (packed codes, scales in their stored dtype, zero points);
3. the choice of least total damage within the budget (:func:`sparsify.algorithms.allocate.allocate`, the
   multiple-choice knapsack GGUF's ``--target-size`` also solves).

The choice is a decision of the run (saved; a ``--resume`` takes it back), each layer is then rounded by the
pass's method (GPTQ, RTN) on its chosen grid, and the checkpoint holds one compressed-tensors config group per
scheme (transformers and vLLM load mixed groups). The report draws the weight bits per layer and Linear.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sparsify import interrupts
from sparsify.algorithms.allocate import Option, allocate, largest, smallest
from sparsify.algorithms.quant import PerChannel, QuantArgs
from sparsify.errors import SparsifyError
from sparsify.runtime.quantized import QuantizedLinear, QuantScheme
from sparsify.sizes import fmt_bytes, parse_size

if TYPE_CHECKING:
    from sparsify.calibration import LayerwiseRunner

INT8 = 8


@dataclass(frozen=True)
class Target:
    """One quantized Linear's options: bytes and predicted damage at each scheme, in the order of ``bits``."""

    fqn: str
    layer: int
    params: int
    bits: tuple[int, ...]
    options: tuple[Option, ...]


def int8_scheme(int4: QuantScheme) -> QuantScheme:
    """The budget's larger option beside ``int4``: int8 weights per output channel, the same symmetry."""
    w = int4.weights
    return QuantScheme(QuantArgs(INT8, w.symmetric, PerChannel(), signed_scale=w.signed_scale), None)


def scheme_bytes(out_features: int, in_features: int, scheme: QuantScheme, scale_dtype: torch.dtype) -> int:
    """Bytes of one quantized Linear's weight tensors as written (codes, scales, zero point, shape; no bias):
    the module's own tensors, built on the meta device."""
    m = QuantizedLinear(in_features, out_features, scheme, dtype=scale_dtype, device="meta")
    return sum(t.numel() * t.element_size() for t in m.state_dict().values())


def damage(W: Tensor, fisher: Tensor, Wq: Tensor) -> float:
    """The predicted KL divergence per token of replacing ``W`` by ``Wq``: ``0.5 * sum(F * dW^2)``."""
    return 0.5 * float((fisher * (W.float() - Wq.float()).square()).sum())


def budget_bytes(target_bpw: float | None, target_size: int | None, targets: list[Target], rest: int) -> int:
    """The bytes the targets may take: ``target_bpw`` bits per weight of theirs, or ``target_size`` minus
    ``rest`` (every other tensor of the checkpoint)."""
    if target_size is not None:
        return target_size - rest
    assert target_bpw is not None
    return int(target_bpw * sum(t.params for t in targets) / 8)


def reach(targets: list[Target]) -> tuple[int, int]:
    """The fewest and the most bytes the targets can take."""
    menus = [list(t.options) for t in targets]
    return smallest(menus), largest(menus)


def choose(targets: list[Target], budget: int) -> dict[str, Any]:
    """Each target's bits, least predicted damage within ``budget`` bytes: the run's decision, as saved."""
    picks = allocate([list(t.options) for t in targets], budget)
    chosen = [t.options[j] for t, j in zip(targets, picks, strict=True)]
    return {
        "bits": {t.fqn: t.bits[j] for t, j in zip(targets, picks, strict=True)},
        "budget_bytes": budget,
        "bytes": sum(o.bytes for o in chosen),
        "predicted_kl": sum(o.damage for o in chosen),
        "params": sum(t.params for t in targets),
    }


def mix_text(bits: dict[str, int]) -> str:
    """Which Linears took int8, per kind (``mlp.down_proj 12/30``), in one line."""
    kinds: dict[str, list[int]] = {}
    for fqn, b in bits.items():
        kinds.setdefault(_kind(fqn), []).append(b)
    parts = [f"{k} {sum(b == INT8 for b in v)}/{len(v)}" for k, v in sorted(kinds.items())]
    return "int8 Linears by kind: " + ", ".join(parts)


def _kind(fqn: str) -> str:
    """``model.layers.3.mlp.down_proj`` -> ``mlp.down_proj`` (experts: ``mlp.experts.down_proj``)."""
    parts = fqn.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    if not digits:
        return fqn
    tail = parts[digits[0] + 1 :]
    return ".".join(p for p in tail if not p.isdigit())


def target(fqn: str, layer: int, shape: torch.Size, scale_dtype: torch.dtype, schemes: list[QuantScheme],
           damages: tuple[float, ...] | None = None) -> Target:  # fmt: skip
    """One Linear's options: its bytes in each of ``schemes`` (int4, int8) and the ``damages`` measured (None: 0)."""
    out_f, in_f = int(shape[0]), int(shape[1])
    sizes = [scheme_bytes(out_f, in_f, s, scale_dtype) for s in schemes]
    options = tuple(Option(b, d) for b, d in zip(sizes, damages or (0.0,) * len(schemes), strict=True))
    return Target(fqn, layer, out_f * in_f, tuple(s.weights.bits for s in schemes), options)


def asked_text(config: Any) -> tuple[str, str]:
    """The flag and the value the user gave (``--target-bpw``, ``5.5``)."""
    if config.target_bpw is not None:
        return "--target-bpw", f"{config.target_bpw:g}"
    return "--target-size", str(config.target_size)


def check_reach(targets: list[Target], asked: int, rest: int, config: Any, side: str = "both") -> None:
    """Refuse a budget the targets cannot meet (``asked``: their share of it; ``rest``: the other bytes;
    ``side``: check the least reachable ("low"), the most ("high") or both)."""
    low, high = reach(targets)
    params = sum(t.params for t in targets)
    flag, value = asked_text(config)
    if asked < low and side != "high":
        raise SparsifyError(
            f"{flag} {value}: below the smallest this model reaches, every Linear int4"
            f" ({fmt_bytes(rest + low)}, {8 * low / params:.3f} bits per weight over the quantized Linears)"
        )
    if asked > high and side != "low":
        raise SparsifyError(
            f"{flag} {value}: above every Linear int8 ({fmt_bytes(rest + high)},"
            f" {8 * high / params:.3f} bits per weight): use --scheme w8a16"
        )


def plan(
    runner: LayerwiseRunner,
    targets_in: Callable[[nn.Module, str], dict[str, nn.Module]],
    schemes: list[QuantScheme],
    config: Any,
    fake_quantize: Callable[[Tensor, QuantArgs], Tensor],
) -> dict[str, Any]:
    """The budget's choice for the targets ``targets_in(layer, prefix)`` finds (see the module docstring): the
    run's decision, as saved. ``fake_quantize(W, args)``: a weight rounded on a scheme's grid, dequantized."""
    from sparsify.calibration.fisher import layer_fisher

    shapes, rest = {}, 0
    for i, layer in enumerate(runner.layers):  # the planned shapes (a meta layer needs no loading)
        for fqn, m in targets_in(layer, runner.prefix(i)).items():
            stored = runner.provider.stored_bytes(i, f"{fqn.removeprefix(runner.prefix(i) + '.')}.weight")
            shapes[fqn] = (i, m.weight.shape, stored[1] if stored else m.weight.dtype)
            rest -= stored[0] if stored else 0
    total = runner.provider.total_bytes()
    if config.target_size is not None and total is None:
        raise SparsifyError("target_size counts a checkpoint's bytes: a model in memory takes target_bpw")
    rest += total or 0
    plain = [target(fqn, i, shape, dtype, schemes) for fqn, (i, shape, dtype) in shapes.items()]
    size = parse_size(config.target_size) if config.target_size is not None else None
    asked = budget_bytes(config.target_bpw, size, plain, rest)
    check_reach(plain, asked, rest, config)
    if runner.whole is None:
        raise SparsifyError("a bit budget needs the model's LM head (its loss): not available here")

    def layer_targets(i: int, layer: nn.Module) -> dict[str, nn.Module]:
        return targets_in(layer, runner.prefix(i))

    fisher = layer_fisher(runner, runner.whole(), layer_targets)
    mean = sum(float(f.mean()) for f in fisher.values()) / max(len(fisher), 1)  # for a Linear no token reached
    targets = []
    for i in runner.progress.track(range(len(runner.layers)), len(runner.layers), "damage of int4 and int8"):
        interrupts.check()
        layer = runner.provider.load(i)
        for fqn, m in layer_targets(i, layer).items():
            W = m.weight.detach().float()  # (out, in)
            F = fisher.get(fqn)
            F = F if F is not None else torch.full_like(W, mean)  # (out, in)
            hurt = tuple(damage(W, F, fake_quantize(W, s.weights)) for s in schemes)
            targets.append(target(fqn, i, W.shape, shapes[fqn][2], schemes, hurt))
        runner.provider.finish(i, layer, write=False)
    return choose(targets, asked) | {"rest_bytes": rest}
