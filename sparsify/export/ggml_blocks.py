"""ggml's Q4_0, Q4_1 and Q8_0 blocks built from integer codes and scales as compressed-tensors stores them.

A block is 32 consecutive weights of a row with an fp16 scale ``d`` (and for Q4_1 an fp16 minimum ``m``):

- Q4_0: ``d``, 16 bytes of nibbles; weight ``j`` is the low nibble of byte ``j``, weight ``j + 16`` the high one;
  value ``(nibble - 8) * d``;
- Q4_1: ``d``, ``m``, the same nibbles; value ``nibble * d + m``;
- Q8_0: ``d``, 32 int8; value ``q * d``.

compressed-tensors' symmetric int4 codes ``c`` in ``[-8, 7]`` are nibbles ``c + 8`` with ``d = scale``;
asymmetric ``(c - zp) * scale`` is ``(c + 8) * scale + m`` with ``m = -(8 + zp) * scale``; symmetric int8
codes are Q8_0's as they are. Nothing is rounded again but ``d`` and ``m`` to fp16: :func:`fp16_changes` says
how many were not exactly representable.

:func:`pack_legacy` writes a :class:`~sparsify.algorithms.legacy_quants.LegacyQuant` (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0 fitted by ``quantize_legacy``, with or without importance) in the same layouts, Q5_0/Q5_1's as
``ggml-common.h`` has them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sparsify.algorithms.legacy_quants import LegacyQuant, legacy_type

BLOCK = 32  # weights per ggml block (Q4_0, Q4_1, Q8_0)


def _nibbles(codes: Tensor) -> np.ndarray:
    """``(rows, blocks, 16)`` uint8 bytes from unsigned 4-bit ``codes: (rows, cols)`` in ``[0, 15]``."""
    q = codes.to(torch.uint8).contiguous().reshape(codes.shape[0], -1, 2, BLOCK // 2).numpy()  # (rows, blocks, 2, 16)
    return q[..., 0, :] | (q[..., 1, :] << np.uint8(4))


def _fp16_bytes(x: Tensor) -> np.ndarray:
    """``(rows, blocks, 2)`` uint8: ``x: (rows, blocks)`` as little-endian fp16."""
    return x.to(torch.float16).contiguous().numpy().astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def q4_0(codes: Tensor, scale: Tensor) -> np.ndarray:
    """Q4_0 rows ``(rows, blocks * 18)`` uint8 from symmetric int4 ``codes: (rows, cols)`` and ``scale: (rows,
    blocks)``."""
    qs = _nibbles(codes.to(torch.int16) + 8)  # (rows, blocks, 16)
    return np.concatenate([_fp16_bytes(scale), qs], axis=-1).reshape(codes.shape[0], -1)


def q4_1_min(scale: Tensor, zero_point: Tensor) -> Tensor:
    """Q4_1's block minimum ``m = -(8 + zp) * scale`` (float32, before its fp16 rounding), ``(rows, blocks)``."""
    return -(zero_point.to(torch.float32) + 8) * scale.to(torch.float32)


def q4_1(codes: Tensor, scale: Tensor, zero_point: Tensor) -> np.ndarray:
    """Q4_1 rows ``(rows, blocks * 20)`` uint8 from asymmetric int4 ``codes``, ``scale`` and ``zero_point`` (both
    ``(rows, blocks)``)."""
    qs = _nibbles(codes.to(torch.int16) + 8)  # (rows, blocks, 16)
    m = q4_1_min(scale, zero_point)
    return np.concatenate([_fp16_bytes(scale), _fp16_bytes(m), qs], axis=-1).reshape(codes.shape[0], -1)


def q8_0(codes: Tensor, scale: Tensor) -> np.ndarray:
    """Q8_0 rows ``(rows, blocks * 34)`` uint8 from symmetric int8 ``codes: (rows, cols)`` and ``scale``."""
    qs = (
        codes.to(torch.int8).contiguous().reshape(codes.shape[0], -1, BLOCK).numpy().view(np.uint8)
    )  # (rows, blocks, 32)
    return np.concatenate([_fp16_bytes(scale), qs], axis=-1).reshape(codes.shape[0], -1)


def fp16_changes(x: Tensor) -> tuple[int, float]:
    """``(count, largest relative change)`` of the values of ``x`` that fp16 does not hold exactly."""
    x32 = x.to(torch.float32)
    diff = (x32.to(torch.float16).to(torch.float32) - x32).abs()
    changed = diff > 0
    n = int(changed.sum())
    if not n:
        return 0, 0.0
    rel = diff[changed] / x32.abs()[changed].clamp_min(torch.finfo(torch.float32).tiny)
    return n, float(rel.max())


# ---- a LegacyQuant (sparsify.algorithms.legacy_quants.quantize_legacy) as ggml blocks ----------------------------------
# ``block_q5_0`` (22 bytes): ``d``, ``qh`` (uint32 little-endian, bit ``j`` the fifth bit of weight ``j``), ``qs[16]``
# (the low nibbles as Q4_0's); ``block_q5_1`` (24): ``d``, ``m``, ``qh``, ``qs``; Q4_0 (18), Q4_1 (20), Q8_0 (34)
# as above, with the codes as the LegacyQuant holds them (unsigned nibbles, signed int8).

LEGACY_TYPE_SIZE = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34}  # bytes per 32-weight block


def pack_legacy(lq: LegacyQuant) -> np.ndarray:
    """``(rows, cols // 32 * LEGACY_TYPE_SIZE)`` uint8: ``lq``'s rows as ggml blocks of its type, ready for the file
    (``GGUFWriter.add_tensor(name, data, raw_dtype=GGMLQuantizationType.Q5_0)`` takes it with this byte shape)."""
    t = legacy_type(lq.qtype)
    q = lq.q.detach().to("cpu", torch.int8)
    if q.numel() and (int(q.min()) < t.qmin or int(q.max()) > t.qmax):
        raise ValueError(f"{t.name} codes must lie in [{t.qmin}, {t.qmax}], got [{int(q.min())}, {int(q.max())}]")
    if t.affine != (lq.m is not None):
        raise ValueError(f"{t.name} {'needs' if t.affine else 'takes no'} block minimum m")
    rows, cols = q.shape
    u = q.contiguous().numpy().view(np.uint8).reshape(rows, cols // BLOCK, BLOCK)  # (rows, blocks, 32) as held
    parts = [_fp16_bytes(lq.d.detach().cpu())]  # d: (rows, blocks, 2)
    if lq.m is not None:
        parts.append(_fp16_bytes(lq.m.detach().cpu()))  # m
    if t.name == "q8_0":
        parts.append(u)  # 32 int8
    else:
        if t.qmax > 15:  # qh: uint32 little-endian, bit j the fifth bit of weight j
            bits = ((u >> np.uint8(4)) & np.uint8(1)).astype(np.uint32)  # (rows, blocks, 32)
            qh = (bits << np.arange(BLOCK, dtype=np.uint32)).sum(-1, dtype=np.uint32)  # (rows, blocks), distinct bits
            parts.append(qh.astype("<u4").view(np.uint8).reshape(rows, cols // BLOCK, 4))
        lo = u & np.uint8(0xF)  # (rows, blocks, 32)
        parts.append(lo[..., : BLOCK // 2] | (lo[..., BLOCK // 2 :] << np.uint8(4)))  # qs: weight j low, j + 16 high
    out = np.concatenate(parts, axis=-1)  # (rows, blocks, type size)
    assert out.shape[-1] == LEGACY_TYPE_SIZE[t.name], (t.name, out.shape)
    return np.ascontiguousarray(out.reshape(rows, cols // BLOCK * LEGACY_TYPE_SIZE[t.name]))
