"""Layers made trainable within what compression decided: shared by QAT (quantize) and heal.

- :class:`FakeQuantLinear`: a quantized Linear as a float weight and a learnable scale, rounded in the
  forward with straight-through gradients (LSQ); turned back into a :class:`QuantizedLinear` on its grid.
- :class:`TrainableLayer`: every floating parameter of a decoder layer set to train, each quantized Linear
  swapped for a :class:`FakeQuantLinear`; after each optimiser step :meth:`TrainableLayer.project` puts the
  constraints back (pruned weights exactly zero, so N:M patterns hold; scales keep their sign); shapes never
  change, so removed channels, heads and experts stay removed. :meth:`TrainableLayer.finish` re-rounds the
  quantized weights and freezes the layer again.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsify.algorithms.quant import (
    QuantArgs,
    choose_qparams,
    fake_quantize_ste,
    quantize,
)
from sparsify.devices import bf16_speedup, cpu_flags, has_bf16_units
from sparsify.modules import replace_module
from sparsify.passes.quantize_methods import expand_zero_point
from sparsify.runtime.quantized import ACT_ARGS, STATIC_ACT_ARGS, QuantizedLinear, QuantScheme

log = logging.getLogger(__name__)

BF16_MIN_SPEEDUP = 1.3  # precision auto: bf16 autocast where a Linear step measures at least this much faster
BF16_MIN_WEIGHTS = 256 * 256  # ... and is at least this big (tiny ones measure 0.9-1.05x: fp32, not a coin toss)


def fit_precision(layers: nn.ModuleList, device: torch.device, who: str) -> str:
    """A training pass's ``precision: auto``: "bf16" (autocast) on a device with bf16 units (AMX, AVX-512 BF16,
    GPUs) where a step of the model's first Linear measures at least BF16_MIN_SPEEDUP faster in it, else "fp32"."""
    linear = next((m for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)), None)
    small = linear is None or linear.in_features * linear.out_features < BF16_MIN_WEIGHTS
    if small or not has_bf16_units(str(device)):  # too small to gain (or nothing to measure on), no units
        return "fp32"
    speedup = bf16_speedup(linear.in_features, linear.out_features, str(device))
    precision = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    log.info(
        "%s: bf16 autocast runs a %d→%d Linear step %.2f× as fast as fp32 here (%s): fitting in %s",
        who, linear.in_features, linear.out_features, speedup, cpu_flags() if device.type == "cpu" else device,
        precision,
    )  # fmt: skip
    return precision


def error_scaled(loss_before: float) -> float:
    """The learning-rate factor for a layer (or model) whose loss starts at ``loss_before`` (relative output
    error; a distillation's KL divergence, of the same order for small changes): a weight
    change of relative size d changes the output by about d^2 in that measure, so steps are kept within reach
    of the error there is to fix, ``min(1, sqrt(loss) / 0.2)`` (1 for a layer 4% off, as 2:4 pruning leaves
    one; 0.27 for 0.3%, int4; 0.03 for int8's 0.003%)."""
    return min(1.0, math.sqrt(max(loss_before, 0.0)) / 0.2)


class FakeQuantLinear(nn.Module):
    """A Linear whose weight (and, for W8A8, input) is fake-quantized with straight-through rounding (QAT)."""

    def __init__(self, W: Tensor, scale: Tensor, zp: Tensor, bias: Tensor | None, args: QuantArgs, acts, input_scale):
        super().__init__()
        self.weight = nn.Parameter(W.clone(), requires_grad=True)  # (out, in)
        self.scale = nn.Parameter(scale.clone(), requires_grad=True)
        self.register_buffer("zp", zp.clone())
        self.register_buffer("sign", torch.where(scale < 0, -1.0, 1.0))  # signed-max grids have negative scales
        self.bias = None if bias is None else nn.Parameter(bias.float().clone(), requires_grad=False)
        self.args, self.acts, self.input_scale = args, acts, input_scale

    @classmethod
    def from_quantized(cls, m: QuantizedLinear) -> FakeQuantLinear:
        """Starts exactly where ``m`` is: the dequantized weight rounds back to ``m``'s codes."""
        scale = m.weight_scale.detach().float()
        W0 = m.dequantize_weight().detach().float()  # (out, in)
        bias = None if m.bias is None else m.bias.detach()
        input_scale = getattr(m, "input_scale", None)
        return cls(W0, scale, m.zero_point(), bias, m.scheme.weights, m.scheme.activations, input_scale)

    def to_quantized(self, scheme: QuantScheme, keep: Tensor | None, dtype: torch.dtype) -> QuantizedLinear:
        """The weight rounded on the learned grid; where ``keep: (out, in)`` is False the code decodes to 0."""
        scale = self.scale.detach().to(dtype)
        q = quantize(self.weight.detach(), scale.float(), self.zp, self.args)  # (out, in) int8
        if keep is not None:
            q = torch.where(keep, q, expand_zero_point(self.zp, q.shape, self.args))
        bias = None if self.bias is None else self.bias.detach().to(dtype)
        return QuantizedLinear.from_quantized(q, scale, self.zp, scheme, bias, self.input_scale)

    @torch.no_grad()
    def keep_scale_sign(self) -> None:
        """After a step: every scale keeps its sign and stays at least eps from zero."""
        self.scale.copy_(self.sign * (self.scale * self.sign).clamp(min=torch.finfo(torch.float32).eps))

    def forward(self, x: Tensor) -> Tensor:
        W = fake_quantize_ste(self.weight, self.scale, self.zp, self.args)
        if self.acts == "dynamic":
            with torch.no_grad():
                s, z = choose_qparams(x.detach(), ACT_ARGS)
            x = fake_quantize_ste(x, s, z, ACT_ARGS)
        elif self.acts == "static":
            s = self.input_scale.to(x.dtype)
            x = fake_quantize_ste(x, s, torch.zeros_like(s, dtype=torch.int8), STATIC_ACT_ARGS)
        return F.linear(x, W.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def rows_of(kwargs: dict[str, Any], rows: list[int], batch: int) -> dict[str, Any]:
    """The layer's keyword arguments for a subset of the batch's windows (masks and such sliced, shared ones kept)."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch and batch > 1:
            out[k] = v[rows]
        elif isinstance(v, tuple) and all(isinstance(t, Tensor) for t in v):
            out[k] = tuple(t[rows] if t.dim() > 0 and t.shape[0] == batch and batch > 1 else t for t in v)
        else:
            out[k] = v
    return out


class TrainableLayer:
    """``layer`` with its floating parameters set to train (see the module docstring).

    ``lr`` is relative: each tensor (Linear and expert weights, quantization scales, and with ``vectors`` the
    norms and biases) gets the learning rate ``lr * RMS(tensor)`` (over its kept entries), so every tensor moves
    by about the same fraction of its size per Adam step, whatever its scale: a router scaled down to a flat
    softmax and an RMSNorm weight near 1 alike.
    ``keep_quantized_zeros``: a quantized weight whose code decodes to 0 stays 0 (the zeros of a pruning
    before the quantization); float matrices always keep their exact zeros.
    """

    def __init__(self, layer: nn.Module, lr: float, vectors: bool = True, keep_quantized_zeros: bool = False):
        self.layer = layer
        self.proxies: dict[str, tuple[FakeQuantLinear, QuantizedLinear, Tensor | None]] = {}
        for name, m in list(layer.named_modules()):
            if isinstance(m, QuantizedLinear):
                if getattr(m, "weight_g_idx", None) is not None:
                    raise ValueError(f"{name}: weights with a g_idx (another tool's GPTQ order) cannot be trained")
                proxy = FakeQuantLinear.from_quantized(m)
                keep = proxy.weight.detach() != 0 if keep_quantized_zeros else None  # (out, in)
                self.proxies[name] = (proxy, m, keep)
                replace_module(layer, name, proxy)
        self.masks: list[tuple[nn.Parameter, Tensor]] = []
        scale_ids = {id(p.scale) for p, _, _ in self.proxies.values()}
        kept = {id(proxy.weight): keep for proxy, _, keep in self.proxies.values() if keep is not None}
        self.groups: list[dict[str, Any]] = []
        for p in layer.parameters():
            if not p.is_floating_point() or (p.dim() < 2 and id(p) not in scale_ids and not vectors):
                continue
            p.requires_grad_(True)
            mask = kept.get(id(p), p.detach() != 0) if p.dim() >= 2 and id(p) not in scale_ids else None
            if mask is not None and not bool(mask.all()):
                self.masks.append((p, mask))
                p.register_hook(lambda g, mask=mask: g * mask)  # Adam never moves a kept zero
            values = p.detach()[mask] if mask is not None else p.detach()
            rms = float(values.float().pow(2).mean().sqrt()) if values.numel() else 0.0
            self.groups.append({"params": [p], "lr": lr * (rms if rms > 0 else 1.0)})  # steps relative to size

    def parameters(self) -> int:
        return sum(p.numel() for g in self.groups for p in g["params"])

    @torch.no_grad()
    def project(self) -> None:
        """The constraints after an optimiser step: kept zeros exactly zero, scales keep their sign."""
        for p, mask in self.masks:
            p.mul_(mask)
        for proxy, _, _ in self.proxies.values():
            proxy.keep_scale_sign()

    @torch.no_grad()
    def finish(self) -> None:
        """Quantized Linears back on their grid (as :class:`QuantizedLinear`), everything frozen."""
        for name, (proxy, original, keep) in self.proxies.items():
            new = proxy.to_quantized(original.scheme, keep, original.weight_scale.dtype)
            new.kernel = original.kernel
            replace_module(self.layer, name, new)
        for p in self.layer.parameters():
            p.requires_grad_(False)
            p.grad = None
