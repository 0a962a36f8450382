"""One checkpoint weight as GGUF export reads it: a float tensor, or a compressed-tensors Linear's integer codes,
scales and zero points (:class:`Stored`), and the quantization layout read from tensor headers alone
(:class:`Layout`), which decides the GGUF type before any data is read."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from sparsify.errors import SparsifyError
from sparsify.export import ggml_blocks as blocks


@dataclass
class Stored:
    """One weight as the checkpoint holds it: a float tensor, or integer codes with scales (compressed-tensors)."""

    tensor: Tensor | None = None  # float, any shape
    codes: Tensor | None = None  # (..., rows, cols) int8
    scale: Tensor | None = None  # (..., rows, groups)
    zero_point: Tensor | None = None  # (..., rows, groups) int8; None: symmetric
    bits: int = 0
    group: int = 0  # input columns per scale (the row's length: one scale per row)

    @property
    def quantized(self) -> bool:
        return self.codes is not None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple((self.codes if self.codes is not None else self.tensor).shape)  # type: ignore[union-attr]

    def dense(self) -> Tensor:
        """The float32 weight it means: ``(q - zp) * scale``."""
        if not self.quantized:
            return self.tensor.to(torch.float32)  # type: ignore[union-attr]
        q = self.codes.to(torch.float32).unflatten(-1, (-1, self.group))  # type: ignore[union-attr]  # (..., rows, groups, g)
        zp = 0 if self.zero_point is None else self.zero_point.to(torch.float32).unsqueeze(-1)
        return ((q - zp) * self.scale.to(torch.float32).unsqueeze(-1)).flatten(-2)  # type: ignore[union-attr]

    def rows(self, index: Tensor) -> Stored:
        """The rows ``index`` (along the second-to-last dim of a matrix; a vector: its entries)."""
        if not self.quantized:
            t = self.tensor
            return replace(self, tensor=t[index] if t.ndim == 1 else t[..., index, :])  # type: ignore[union-attr]
        pick = lambda x: None if x is None else x[..., index, :]  # noqa: E731
        return replace(self, codes=pick(self.codes), scale=pick(self.scale), zero_point=pick(self.zero_point))


def stack(parts: list[Stored]) -> Stored:
    """Experts' weights as one ``(experts, rows, cols)`` weight; quantized only if every part has one layout."""
    first = parts[0]
    same = all(p.quantized and (p.bits, p.group, p.zero_point is None) == (first.bits, first.group,
               first.zero_point is None) for p in parts)  # fmt: skip
    if not same:
        return Stored(tensor=torch.stack([p.dense() for p in parts]))
    zp = None if first.zero_point is None else torch.stack([p.zero_point for p in parts])  # type: ignore[misc]
    return replace(
        first,
        codes=torch.stack([p.codes for p in parts]),  # type: ignore[misc]
        scale=torch.stack([p.scale for p in parts]),  # type: ignore[misc]
        zero_point=zp,
    )


@dataclass(frozen=True)
class Layout:
    """How a compressed-tensors Linear is quantized, read from its tensors' headers (no data)."""

    bits: int
    group: int  # input columns per scale (the row's length: per channel)
    symmetric: bool

    def gguf_type(self):
        """The GGUF block type with exactly this layout (None: none has it)."""
        from gguf import GGMLQuantizationType as Q

        if self.group != blocks.BLOCK:
            return None
        if self.bits == 4:
            return Q.Q4_0 if self.symmetric else Q.Q4_1
        return Q.Q8_0 if self.bits == 8 and self.symmetric else None

    def describe(self, cols: int) -> str:
        where = "per channel" if self.group >= cols else f"in groups of {self.group}"
        return f"int{self.bits} {'symmetric' if self.symmetric else 'asymmetric'} {where}"


def read_layout(source, module: str, keys: set[str]) -> tuple[tuple[int, int], Layout]:
    """``((rows, cols), layout)`` of the compressed-tensors Linear ``module`` (``keys``: the checkpoint's)."""
    scale = source.info(f"{module}.weight_scale").shape
    if f"{module}.weight_packed" in keys:
        shape = source.get_many([f"{module}.weight_shape"])[f"{module}.weight_shape"]
        rows, cols = (int(x) for x in shape.tolist())
        bits = round(source.info(f"{module}.weight_packed").shape[1] * 32 / cols)
    else:
        rows, cols = source.info(f"{module}.weight").shape
        bits = 8
    group = cols // scale[-1] if len(scale) > 1 else cols
    if f"{module}.weight_g_idx" in keys:  # another tool's GPTQ activation order: groups of scattered columns
        g_idx = source.get_many([f"{module}.weight_g_idx"])[f"{module}.weight_g_idx"].long()
        if not torch.equal(g_idx, torch.arange(cols) // group):
            raise SparsifyError(
                f"{module} has activation-order groups (weight_g_idx): GGUF blocks are consecutive columns"
            )
    return (rows, cols), Layout(bits, group, f"{module}.weight_zero_point" not in keys)


def read_quantized(source, module: str, layout: Layout) -> Stored:
    """A compressed-tensors Linear's codes, scales and zero points, unpacked with sparsify's own module."""
    from sparsify.algorithms.quant import PerChannel, PerGroup, QuantArgs
    from sparsify.runtime.quantized import QuantizedLinear, QuantScheme

    names = ("weight", "weight_packed", "weight_shape", "weight_scale", "weight_zero_point")
    t = source.get_many([f"{module}.{n}" for n in names if f"{module}.{n}" in source])
    packed = f"{module}.weight_packed" in t
    scale = t[f"{module}.weight_scale"]
    rows, cols = (int(x) for x in t[f"{module}.weight_shape"].tolist()) if packed else t[f"{module}.weight"].shape
    granularity = PerGroup(layout.group) if layout.group < cols else PerChannel()
    scheme = QuantScheme(QuantArgs(layout.bits, layout.symmetric, granularity), None, "packed" if packed else "int")
    linear = QuantizedLinear(cols, rows, scheme, False, scale.dtype)
    linear.load_state_dict({k.rpartition(".")[2]: v for k, v in t.items()}, strict=False)
    scale = scale.reshape(1, 1).expand(rows, 1) if scale.numel() == 1 else scale  # per tensor: one for every row
    zp = None if layout.symmetric else linear.zero_point().reshape(rows, -1)
    return Stored(codes=linear.codes(), scale=scale.reshape(rows, -1), zero_point=zp, bits=layout.bits,
                  group=layout.group)  # fmt: skip
