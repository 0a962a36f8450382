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

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sparsify.algorithms.allocate import Option, allocate, largest, smallest
from sparsify.algorithms.quant import PerChannel, QuantArgs
from sparsify.runtime.quantized import QuantizedLinear, QuantScheme

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


def weight_of(module: nn.Module) -> Tensor:
    return module.weight.detach().float()  # (out, in)
