"""A Linear stored the way compressed-tensors stores it, and the kernels that run it.

:class:`QuantizedLinear` holds exactly the tensors a compressed-tensors checkpoint holds for one
Linear (so the layer-wise writer saves it as it is) and computes what the checkpoint means:

- ``int-quantized`` (8-bit weights): ``weight`` int8 ``(out, in)`` + ``weight_scale``;
- ``pack-quantized`` (weight-only, 4 or 8 bits): ``weight_packed`` int32 ``(out, in * bits / 32)`` +
  ``weight_shape`` + ``weight_scale`` (packed with compressed-tensors' own ``pack_to_int32``);
- ``weight_zero_point`` when asymmetric (packed along the output dimension in ``pack-quantized``),
  ``weight_g_idx`` when another tool wrote GPTQ activation-order groups, ``input_scale`` for static
  activations.

Weights are ``(q - zp) * scale`` per channel or group; activations (W8A8) are quantized to int8 per
token at run time (dynamic) or with the calibrated ``input_scale`` (static), symmetric. These are
compressed-tensors' formulas (:mod:`sparsify.algorithms.quant`), so sparsify's simulated model, a
transformers model loading the checkpoint and sparsify's int8 kernels compute the same function.

Kernels (``QuantizedLinear.kernel``):

- ``reference``: dequantize the weight, fake-quantize the input, float matmul (what calibration
  uses; exact);
- ``int_mm``: int8 x int8 → int32 with ``torch._int_mm``, rescaled per token and channel (exact up to
  float rounding of the rescale); fast where the CPU has VNNI / AMX or on CUDA, 30× slower than fp32
  on plain AVX2;
- ``fbgemm``: PyTorch's x86 dynamic quantized Linear (per-channel int8 weights; activations
  quantized per *tensor* with a 7-bit range, not per token: results differ slightly);
- ``dequantized``: the weight dequantized once at load (weight-only schemes; float matmul, the
  file's size saving but not its memory saving).

:func:`choose_kernels` measures the candidates on the CPU at hand, per distinct shape, and keeps the
fastest that is faster than the float matmul it replaces; otherwise the float path, and it says so.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsify.algorithms.quant import (
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    QuantArgs,
    choose_qparams,
    dequantize,
    fake_quantize,
)

log = logging.getLogger(__name__)

Activations = Literal["dynamic", "static"] | None
KERNELS = ("reference", "int_mm", "fbgemm", "dequantized")
ACT_ARGS = QuantArgs(bits=8, symmetric=True, granularity=PerToken())  # W8A8 activations: int8, symmetric
STATIC_ACT_ARGS = QuantArgs(bits=8, symmetric=True, granularity=PerTensor())


@dataclass(frozen=True)
class QuantScheme:
    """What one Linear's quantization is: its weights' arguments and its activations' mode."""

    weights: QuantArgs
    activations: Activations = None  # None: weight-only (the activations stay float)
    layout: Literal["", "int", "packed"] = ""  # "": packed for weight-only schemes, int8 for W8A8 (as llm-compressor)

    @property
    def packed(self) -> bool:
        """Weight-only schemes are written packed (``pack-quantized``), W8A8 as int8 (``int-quantized``)."""
        return self.layout == "packed" if self.layout else self.activations is None

    @property
    def format(self) -> str:
        return "pack-quantized" if self.packed else "int-quantized"

    @property
    def group_size(self) -> int | None:
        g = self.weights.granularity
        return g.size if isinstance(g, PerGroup) else None

    @property
    def name(self) -> str:
        a = "a16" if self.activations is None else "a8" + ("-static" if self.activations == "static" else "")
        return f"w{self.weights.bits}{a}"

    def describe(self) -> str:
        g = self.weights.granularity
        where = f"group {g.size}" if isinstance(g, PerGroup) else "channel" if isinstance(g, PerChannel) else "tensor"
        sym = "" if self.weights.symmetric else ", asymmetric"
        acts = {None: "", "dynamic": ", int8 activations per token", "static": ", int8 activations (static scale)"}
        return f"int{self.weights.bits} weights per {where}{sym}{acts[self.activations]}"


def _pack(q: Tensor, bits: int, dim: int = 1) -> Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(q.to(torch.int8).contiguous(), bits, packed_dim=dim)


def _unpack(packed: Tensor, bits: int, shape: tuple[int, int], dim: int = 1) -> Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(packed, bits, torch.Size(shape), packed_dim=dim)


def _param(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` (and, for W8A8, ``x``) quantized; see the module docstring."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        g_idx: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.kernel = "reference"
        self._dense: Tensor | None = None  # the dequantized weight, kept by the "dequantized" kernel
        self._packed_fbgemm: Any = None
        self._act_cache: dict[str, Any] | None = None  # the int8 input, shared by Linears fed the same tensor
        w = scheme.weights
        n_scales = in_features // w.granularity.size if isinstance(w.granularity, PerGroup) else 1
        scale_shape = (1,) if isinstance(w.granularity, PerTensor) else (out_features, n_scales)
        empty = {"device": device}
        if scheme.packed:
            cols = -(-in_features * w.bits // 32)
            self.weight_packed = _param(torch.zeros(out_features, cols, dtype=torch.int32, **empty))
            self.weight_shape = _param(torch.tensor([out_features, in_features], dtype=torch.int64, device=device))
        else:
            self.weight = _param(torch.zeros(out_features, in_features, dtype=torch.int8, **empty))
        self.weight_scale = _param(torch.ones(scale_shape, dtype=dtype, **empty))
        if not w.symmetric:
            if scheme.packed:  # packed along the output dimension, as compressed-tensors packs zero points
                zp = torch.zeros(-(-out_features * w.bits // 32), scale_shape[-1], dtype=torch.int32, **empty)
            else:
                zp = torch.zeros(scale_shape, dtype=torch.int8, **empty)
            self.weight_zero_point = _param(zp)
        if g_idx:
            self.weight_g_idx = _param(torch.zeros(in_features, dtype=torch.int32, **empty))
        if scheme.activations == "static":
            self.input_scale = _param(torch.ones(1, dtype=dtype, **empty))
        self.bias = _param(torch.zeros(out_features, dtype=dtype, **empty)) if bias else None

    # ----------------------------------------------------------------------------- the tensors

    @classmethod
    @torch.no_grad()
    def from_quantized(
        cls,
        q: Tensor,
        scale: Tensor,
        zero_point: Tensor | None,
        scheme: QuantScheme,
        bias: Tensor | None = None,
        input_scale: Tensor | None = None,
    ) -> QuantizedLinear:
        """The module for integer weights ``q: (out, in)`` with their ``scale`` / ``zero_point``."""
        out_f, in_f = q.shape
        m = cls(in_f, out_f, scheme, bias is not None, scale.dtype, q.device)
        m.set_codes(q, scale, zero_point)
        if bias is not None:
            m.bias = _param(bias.detach().clone())
        if scheme.activations == "static":
            if input_scale is None:
                raise ValueError("static activations need an input_scale")
            m.input_scale = _param(input_scale.detach().reshape(1).to(scale.dtype).clone())
        return m

    @torch.no_grad()
    def set_codes(self, q: Tensor, scale: Tensor, zero_point: Tensor | None) -> None:
        w = self.scheme.weights
        if self.scheme.packed:
            self.weight_packed = _param(_pack(q, w.bits))
        else:
            self.weight = _param(q.to(torch.int8).contiguous())
        self.weight_scale = _param(scale.detach().reshape(self.weight_scale.shape).clone())
        if not w.symmetric:
            if zero_point is None:
                raise ValueError("asymmetric weights need a zero point")
            zp = zero_point.reshape(self.out_features, -1).to(torch.int8)
            self.weight_zero_point = _param(_pack(zp, w.bits, dim=0) if self.scheme.packed else zp.contiguous())
        self._dense = None

    def codes(self) -> Tensor:
        """The integer weights, ``(out, in)`` int8."""
        if self.scheme.packed:
            return _unpack(self.weight_packed, self.scheme.weights.bits, (self.out_features, self.in_features))
        return self.weight

    def zero_point(self) -> Tensor:
        """The integer zero points, shaped as the scales (zeros when symmetric)."""
        if self.scheme.weights.symmetric:
            return torch.zeros(self.weight_scale.shape, dtype=torch.int8, device=self.weight_scale.device)
        zp = self.weight_zero_point
        if self.scheme.packed:
            return _unpack(zp, self.scheme.weights.bits, tuple(self.weight_scale.shape), dim=0)
        return zp

    def dequantize_weight(self) -> Tensor:
        """``(q - zp) * scale``, ``(out, in)``, in the scale's dtype."""
        q, scale, zp = self.codes(), self.weight_scale, self.zero_point()
        g_idx = getattr(self, "weight_g_idx", None)
        if g_idx is not None:  # groups given per input column (another tool's GPTQ activation order)
            s = scale[:, g_idx.long()]  # (out, in)
            return (q.to(s.dtype) - zp[:, g_idx.long()].to(s.dtype)) * s
        return dequantize(q, scale, zp, self.scheme.weights)

    def dense_weight(self) -> Tensor:
        """The weight the module computes with, ``(out, in)`` (for error measurement and reference maths)."""
        return self._dense if self._dense is not None else self.dequantize_weight()

    # ------------------------------------------------------------------------------- forward

    def quantize_input(self, x: Tensor) -> Tensor:
        """The input as the checkpoint's activation quantization sees it (fake-quantized, float)."""
        if self.scheme.activations == "dynamic":
            scale, zp = choose_qparams(x, ACT_ARGS)
            return fake_quantize(x, scale, zp, ACT_ARGS)
        if self.scheme.activations == "static":
            scale = self.input_scale.to(x.dtype)
            return fake_quantize(x, scale, torch.zeros_like(scale, dtype=torch.int8), STATIC_ACT_ARGS)
        return x

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel == "int_mm":
            return self._int_mm(x)
        if self.kernel == "fbgemm":
            return self._fbgemm(x)
        W = self.dense_weight().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(self.quantize_input(x), W, bias)

    def _int8_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_q: (M, in) int8, scale: (M, 1))``, compressed-tensors' symmetric int8 of ``x``; shared with the
        other Linears fed the very same tensor (q/k/v, gate/up) through ``_act_cache``."""
        cache = self._act_cache
        if cache is not None and cache.get("x") is x and cache.get("version") == x._version:
            return cache["q"], cache["s"]
        x2 = x.reshape(-1, x.shape[-1])  # (M, in)
        if self.scheme.activations == "static":
            s = self.input_scale.to(x.dtype).reshape(1, 1).expand(x2.shape[0], 1)
        else:
            s = x2.abs().amax(-1, keepdim=True).div_(127.5)  # (M, 1): compressed-tensors' per-token scale
            s = torch.where(s == 0, torch.finfo(x.dtype).eps, s)
        q = (x2 / s).round_().clamp_(-128, 127).to(torch.int8)  # (M, in)
        if cache is not None:
            cache.update(x=x, version=x._version, q=q, s=s)
        return q, s

    def _int_mm(self, x: Tensor) -> Tensor:
        shape = x.shape
        xq, s = self._int8_input(x)
        acc = torch._int_mm(xq, self.weight.t())  # (M, out) int32
        y = acc.to(x.dtype).mul_(s).mul_(self.weight_scale.to(x.dtype).reshape(1, -1))
        if self.bias is not None:
            y.add_(self.bias.to(x.dtype))
        return y.reshape(*shape[:-1], self.out_features)

    def _fbgemm(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float(), self._packed_fbgemm, True)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    # -------------------------------------------------------------------------------- kernels

    def kernels(self) -> list[str]:
        """The kernels that can run this module on this build of torch."""
        w = self.scheme.weights
        if self.scheme.activations is None:
            return ["reference", "dequantized"]
        out = ["reference", "dequantized"]
        per_channel = isinstance(w.granularity, PerChannel | PerTensor)
        if w.symmetric and per_channel and w.bits == 8 and getattr(self, "weight_g_idx", None) is None:
            out.append("int_mm")
            if self.scheme.activations == "dynamic" and "fbgemm" in torch.backends.quantized.supported_engines:
                out.append("fbgemm")
        return out

    @torch.no_grad()
    def use(self, kernel: str) -> None:
        """Switch to ``kernel`` (precomputing what it needs)."""
        if kernel not in self.kernels():
            raise ValueError(f"kernel {kernel!r} cannot run {self.scheme.describe()}; try {self.kernels()}")
        self._dense = self.dequantize_weight() if kernel == "dequantized" else None
        self._packed_fbgemm = None
        if kernel == "fbgemm":
            torch.backends.quantized.engine = (
                "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "x86"
            )
            scale = self.weight_scale.float().reshape(-1).expand(self.out_features).contiguous()
            with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors; fbgemm's kernel takes only them
                warnings.filterwarnings(
                    "ignore", message=".*quantized tensor creation functions.*", category=UserWarning
                )
                qw = torch._make_per_channel_quantized_tensor(
                    self.weight.cpu(), scale.double(), torch.zeros(self.out_features, dtype=torch.int64), 0
                )
            bias = None if self.bias is None else self.bias.float()
            self._packed_fbgemm = torch.ops.quantized.linear_prepack(qw, bias)
        self.kernel = kernel

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.scheme.describe()}, kernel={self.kernel}"


# ------------------------------------------------------------------------------------ kernels


@dataclass
class KernelChoice:
    """What :func:`choose_kernels` decided for one shape, and the timings it decided on (seconds)."""

    shape: tuple[int, int]  # (in, out)
    scheme: str
    kernel: str
    seconds: dict[str, float] = field(default_factory=dict)
    modules: int = 0

    @property
    def speedup(self) -> float:
        base = self.seconds.get("float")
        return base / self.seconds[self.kernel] if base and self.seconds.get(self.kernel) else 1.0


def _time(fn, *args: Any, repeats: int = 5) -> float:
    """The best of ``repeats`` timings of ``fn(*args)``, after one warm-up call."""
    fn(*args)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def choose_kernels(
    modules: Iterable[QuantizedLinear], kernel: str = "auto", tokens: int = 512, dtype: torch.dtype = torch.float32
) -> list[KernelChoice]:
    """Give every module a kernel; ``auto`` measures, per distinct shape and scheme, each candidate
    against the float matmul on ``tokens`` rows and keeps the fastest that beats it; ``exact`` does the
    same among the kernels that compute the checkpoint's own numerics (no ``fbgemm``: what evaluation uses).

    The exact ``int_mm`` is taken whenever it beats float; ``fbgemm``, whose per-tensor activations differ
    from the checkpoint's per-token ones, only where ``int_mm`` does not (e.g. AVX2 without VNNI). Weight-only schemes are dequantized once (no CPU kernel reads packed
    int4 faster than float here; the choice is reported).
    """
    groups: dict[tuple, list[QuantizedLinear]] = {}
    cache: dict[str, Any] = {}  # one int8 input at a time, for the whole model
    for m in modules:
        groups.setdefault((m.in_features, m.out_features, m.scheme), []).append(m)
        m._act_cache = None  # measured without sharing (the same x is timed over and over)
    choices = []
    for (n_in, n_out, scheme), members in groups.items():
        first = members[0]
        candidates = [k for k in first.kernels() if k != "reference" and not (kernel == "exact" and k == "fbgemm")]
        seconds: dict[str, float] = {}
        if kernel not in ("auto", "exact"):
            chosen = kernel
        elif scheme.activations is None:
            chosen = "dequantized"
        else:
            x = torch.randn(tokens, n_in, dtype=dtype, generator=torch.Generator().manual_seed(0))
            W = first.dequantize_weight().to(dtype)
            seconds["float"] = _time(F.linear, x, W)
            for k in candidates:
                if k == "dequantized":
                    continue
                try:
                    first.use(k)
                    seconds[k] = _time(first, x)
                except RuntimeError as e:  # a kernel this build or CPU cannot run
                    log.debug("kernel %s unavailable for %s: %s", k, (n_in, n_out), e)
            # exact int_mm whenever it beats float (in a model it also shares the int8 input of q/k/v and
            # gate/up, which this measurement does not); fbgemm's per-tensor activations only where it cannot
            faster = [k for k in ("int_mm", "fbgemm") if k in seconds and seconds[k] < seconds["float"]]
            chosen = faster[0] if faster else "dequantized"
        for m in members:
            m.use(chosen)
            m._act_cache = cache
        choices.append(KernelChoice((n_in, n_out), scheme.name, chosen, seconds, len(members)))
    return choices


def describe_choices(choices: list[KernelChoice]) -> list[str]:
    """One line per shape: the kernel and, where measured, its speed against the float matmul."""
    lines = []
    for c in choices:
        timing = f" ({c.speedup:.2f}x float)" if "float" in c.seconds else ""
        why = {
            "dequantized": " (weights dequantized at load; no faster int kernel here)"
            if c.seconds
            else " (weights dequantized at load)",
            "fbgemm": ", activations quantized per tensor (7-bit range) instead of per token",
        }.get(c.kernel, "")
        lines.append(f"{c.scheme} {c.shape[0]}->{c.shape[1]} x{c.modules}: {c.kernel}{timing}{why}")
    return lines
