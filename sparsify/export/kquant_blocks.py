"""ggml's K-quant blocks (Q2_K..Q6_K) packed from a :class:`~sparsify.algorithms.kquants.KQuant`; IQ4_NL and IQ4_XS
from a :class:`~sparsify.algorithms.iq4.IQ4Quant` (:func:`pack_iq4`, at the end).

Each super-block of 256 weights is one block, laid out as ``ggml-common.h``'s structs (fp16 little-endian):

- ``block_q2_K`` (84 bytes): ``scales[16]`` (scale in the low nibble, minimum in the high), ``qs[64]``, ``d``,
  ``dmin``;
- ``block_q3_K`` (110): ``hmask[32]``, ``qs[64]``, ``scales[12]`` (16 six-bit values stored ``+ 32``), ``d``;
- ``block_q4_K`` (144): ``d``, ``dmin``, ``scales[12]`` (8 six-bit scales and 8 six-bit minimums), ``qs[128]``;
- ``block_q5_K`` (176): ``d``, ``dmin``, ``scales[12]``, ``qh[32]``, ``qs[128]``;
- ``block_q6_K`` (210): ``ql[128]``, ``qh[64]``, ``scales[16]`` (int8), ``d``.

Bit order, with ``L`` the unsigned code (``q``, or ``q + 4`` for Q3_K, ``q + 32`` for Q6_K) and weights counted
within the super-block:

- 2-bit planes (Q2_K's ``qs``, Q3_K's low bits): byte ``32 h + l`` holds weights ``128 h + 32 k + l`` at bits
  ``2 k`` (``k = 0..3``);
- nibbles (Q4_K, Q5_K): byte ``32 c + l`` holds weight ``64 c + l`` low and ``64 c + 32 + l`` high;
- Q5_K's ``qh[l]`` bit ``s``: the fifth bit of weight ``32 s + l``; Q3_K's ``hmask[l]`` bit ``k``: set when
  weight ``32 k + l`` has ``q >= 0``;
- Q6_K: ``ql[64 h + l]`` holds the low nibbles of weights ``128 h + l`` (low) and ``128 h + 64 + l`` (high),
  ``ql[64 h + 32 + l]`` those of ``128 h + 32 + l`` and ``128 h + 96 + l``; ``qh[32 h + l]`` bits ``2 k`` the top
  two bits of weight ``128 h + 32 k + l``;
- Q4_K/Q5_K ``scales``: bytes 0-3 scales 0-3 (bits 0-5) with the top two bits of scales 4-7 (bits 6-7); bytes 4-7
  the same for minimums; bytes 8-11 the low nibbles of scale ``4 + k`` (low) and minimum ``4 + k`` (high);
- Q3_K ``scales``: bytes 0-7 the low nibbles of values ``k`` (low) and ``8 + k`` (high); byte ``8 + k`` bits
  ``2 g`` the top two bits of value ``4 g + k``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sparsify.algorithms.iq4 import IQ4Quant
from sparsify.algorithms.kquants import KTYPES, QK_K, KQuant

TYPE_SIZE = {"q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}  # bytes per 256-weight block


def _u8(x: Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.int16).numpy().astype(np.uint8)


def _fp16_bytes(x: Tensor) -> np.ndarray:
    """``(rows, blocks, 2)`` uint8: fp16 ``x: (rows, blocks)`` little-endian."""
    return x.detach().to("cpu", torch.float16).contiguous().numpy().astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def _codes(kq: KQuant, offset: int) -> np.ndarray:
    """``(rows, blocks, 256)`` uint8 codes ``q + offset``."""
    rows, cols = kq.q.shape
    return (_u8(kq.q.to(torch.int16) + offset)).reshape(rows, cols // QK_K, QK_K)


def _planes2(u: np.ndarray) -> np.ndarray:
    """``(rows, blocks, 64)``: 2-bit values ``u & 3`` of ``(rows, blocks, 256)``, four to a byte."""
    p = (u & np.uint8(3)).reshape(*u.shape[:2], 2, 4, 32)  # (rows, blocks, half, k, byte)
    out = p[:, :, :, 0] | (p[:, :, :, 1] << 2) | (p[:, :, :, 2] << 4) | (p[:, :, :, 3] << 6)  # (rows, blocks, 2, 32)
    return out.reshape(*u.shape[:2], 64)


def _nibbles(u: np.ndarray) -> np.ndarray:
    """``(rows, blocks, 128)``: low nibbles of ``(rows, blocks, 256)``, weight ``64 c + l`` low, ``+ 32`` high."""
    p = (u & np.uint8(0xF)).reshape(*u.shape[:2], 4, 2, 32)  # (rows, blocks, chunk, half, byte)
    return (p[:, :, :, 0] | (p[:, :, :, 1] << 4)).reshape(*u.shape[:2], 128)


def _scales_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes from six-bit ``sc, mn: (rows, blocks, 8)``."""
    lo_s, hi_s, lo_m, hi_m = sc[..., :4], sc[..., 4:], mn[..., :4], mn[..., 4:]
    return np.concatenate(
        [lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & np.uint8(0xF)) | ((hi_m & np.uint8(0xF)) << 4)],
        axis=-1,
    )  # (rows, blocks, 12)


def _per_block(x: Tensor, rows: int, per: int) -> np.ndarray:
    return _u8(x).reshape(rows, -1, per)


def q2_k(kq: KQuant) -> np.ndarray:
    rows = kq.q.shape[0]
    assert kq.mins is not None and kq.dmin is not None
    u = _codes(kq, 0)
    scales = _per_block(kq.scales, rows, 16) | (_per_block(kq.mins, rows, 16) << 4)  # (rows, blocks, 16)
    return np.concatenate([scales, _planes2(u), _fp16_bytes(kq.d), _fp16_bytes(kq.dmin)], axis=-1)


def q3_k(kq: KQuant) -> np.ndarray:
    rows = kq.q.shape[0]
    u = _codes(kq, 4)  # (rows, blocks, 256) in [0, 7]
    hb = ((u >> 2) & np.uint8(1)).reshape(*u.shape[:2], 8, 32)  # (rows, blocks, k, byte)
    hmask = np.zeros((*u.shape[:2], 32), dtype=np.uint8)
    for k in range(8):
        hmask |= hb[:, :, k] << k
    v = _per_block(kq.scales.to(torch.int16) + 32, rows, 16)  # (rows, blocks, 16) in [0, 63]
    top = (v >> 4).reshape(*v.shape[:2], 4, 4)  # (rows, blocks, g, k): value 4 g + k
    high = top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)  # (rows, blocks, 4)
    low = (v[..., :8] & np.uint8(0xF)) | ((v[..., 8:] & np.uint8(0xF)) << 4)  # (rows, blocks, 8)
    return np.concatenate([hmask, _planes2(u), low, high, _fp16_bytes(kq.d)], axis=-1)


def q4_k(kq: KQuant) -> np.ndarray:
    rows = kq.q.shape[0]
    assert kq.mins is not None and kq.dmin is not None
    scales = _scales_k4(_per_block(kq.scales, rows, 8), _per_block(kq.mins, rows, 8))
    return np.concatenate([_fp16_bytes(kq.d), _fp16_bytes(kq.dmin), scales, _nibbles(_codes(kq, 0))], axis=-1)


def q5_k(kq: KQuant) -> np.ndarray:
    rows = kq.q.shape[0]
    assert kq.mins is not None and kq.dmin is not None
    u = _codes(kq, 0)  # (rows, blocks, 256) in [0, 31]
    hb = (u >> 4).reshape(*u.shape[:2], 8, 32)  # (rows, blocks, sub-block, byte)
    qh = np.zeros((*u.shape[:2], 32), dtype=np.uint8)
    for s in range(8):
        qh |= hb[:, :, s] << s
    scales = _scales_k4(_per_block(kq.scales, rows, 8), _per_block(kq.mins, rows, 8))
    return np.concatenate([_fp16_bytes(kq.d), _fp16_bytes(kq.dmin), scales, qh, _nibbles(u)], axis=-1)


def q6_k(kq: KQuant) -> np.ndarray:
    rows = kq.q.shape[0]
    u = _codes(kq, 32).reshape(rows, -1, 2, 4, 32)  # (rows, blocks, half, k, byte) in [0, 63]
    lo = u & np.uint8(0xF)
    ql = np.stack([lo[:, :, :, 0] | (lo[:, :, :, 2] << 4), lo[:, :, :, 1] | (lo[:, :, :, 3] << 4)], axis=3)
    hi = u >> 4
    qh = hi[:, :, :, 0] | (hi[:, :, :, 1] << 2) | (hi[:, :, :, 2] << 4) | (hi[:, :, :, 3] << 6)  # (rows, blocks, 2, 32)
    blocks = ql.shape[1]
    sc = kq.scales.detach().to("cpu", torch.int8).numpy().view(np.uint8).reshape(rows, blocks, 16)
    return np.concatenate([ql.reshape(rows, blocks, 128), qh.reshape(rows, blocks, 64), sc, _fp16_bytes(kq.d)], axis=-1)


PACKERS = {"q2_k": q2_k, "q3_k": q3_k, "q4_k": q4_k, "q5_k": q5_k, "q6_k": q6_k}


def _check(kq: KQuant) -> None:
    t = KTYPES[kq.ktype]
    ranges = [("codes", kq.q, t.qmin, t.qmax), ("scales", kq.scales, t.smin, t.smax)]
    if t.asymmetric:
        if kq.mins is None or kq.dmin is None:
            raise ValueError(f"{t.name} needs mins and dmin")
        ranges.append(("mins", kq.mins, 0, t.smax))
    for what, x, lo, hi in ranges:
        if x.numel() and (int(x.min()) < lo or int(x.max()) > hi):
            raise ValueError(f"{t.name} {what} must lie in [{lo}, {hi}], got [{int(x.min())}, {int(x.max())}]")


def pack(kq: KQuant) -> np.ndarray:
    """``(rows, cols // 256 * TYPE_SIZE)`` uint8: ``kq``'s rows as ggml blocks of its type, ready for the file
    (``GGUFWriter.add_tensor(name, data, raw_dtype=GGMLQuantizationType.Q4_K)`` takes it with this byte shape)."""
    _check(kq)
    blocks = PACKERS[kq.ktype](kq)  # (rows, blocks, TYPE_SIZE)
    assert blocks.shape[-1] == TYPE_SIZE[kq.ktype], (kq.ktype, blocks.shape)
    return np.ascontiguousarray(blocks.reshape(kq.q.shape[0], -1))


# ---- IQ4_NL and IQ4_XS (sparsify.algorithms.iq4) ----------------------------------------------------------------------
# ``block_iq4_nl`` (18 bytes): ``d``, ``qs[16]``; ``block_iq4_xs`` (136): ``d``, ``scales_h`` (uint16 little-endian,
# bits ``2 s`` the top two bits of sub-block ``s``'s scale ``+ 32``), ``scales_l[4]`` (byte ``k``: the low nibbles of
# sub-blocks ``2 k`` (low) and ``2 k + 1`` (high)), ``qs[128]``. In both, each 32 weights' 16 bytes hold weight ``j``
# in the low nibble of byte ``j`` and weight ``16 + j`` in the high one (the 4-bit index into ``kvalues_iq4nl``).

IQ4_TYPE_SIZE = {"iq4_nl": 18, "iq4_xs": 136}  # bytes per block: 32 (IQ4_NL) or 256 (IQ4_XS) weights


def pack_iq4(iq: IQ4Quant) -> np.ndarray:
    """``(rows, cols // block * IQ4_TYPE_SIZE)`` uint8: ``iq``'s rows as ggml blocks of its type, ready for the file
    (``GGUFWriter.add_tensor(name, data, raw_dtype=GGMLQuantizationType.IQ4_XS)`` takes it with this byte shape)."""
    name = iq.qtype
    if name not in IQ4_TYPE_SIZE:
        raise ValueError(f"unknown IQ4 type {name!r}: expected one of {', '.join(IQ4_TYPE_SIZE)}")
    q = iq.q.detach().to("cpu", torch.int16)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError(f"{name} codes must lie in [0, 15], got [{int(q.min())}, {int(q.max())}]")
    if (name == "iq4_xs") != (iq.scales is not None):
        raise ValueError(f"{name} {'needs' if name == 'iq4_xs' else 'takes no'} sub-block scales")
    rows, cols = q.shape
    u = q.numpy().astype(np.uint8).reshape(rows, cols // 32, 2, 16)  # (rows, blocks of 32, half, byte)
    qs = u[:, :, 0] | (u[:, :, 1] << np.uint8(4))  # (rows, blocks of 32, 16)
    if iq.scales is None:
        out = np.concatenate([_fp16_bytes(iq.d), qs], axis=-1)  # (rows, blocks, 18)
    else:
        sc = iq.scales.detach().to("cpu", torch.int16)
        if sc.numel() and (int(sc.min()) < -32 or int(sc.max()) > 31):
            raise ValueError(f"iq4_xs scales must lie in [-32, 31], got [{int(sc.min())}, {int(sc.max())}]")
        nb = cols // QK_K
        ls = (sc + 32).numpy().astype(np.uint16).reshape(rows, nb, 8)  # (rows, super-blocks, sub-block) in [0, 63]
        high = ((ls >> np.uint16(4)) << (2 * np.arange(8, dtype=np.uint16))).sum(-1, dtype=np.uint16)  # distinct bits
        lo = (ls & np.uint16(0xF)).astype(np.uint8).reshape(rows, nb, 4, 2)
        low = lo[..., 0] | (lo[..., 1] << np.uint8(4))  # (rows, super-blocks, 4)
        scales_h = high.astype("<u2").view(np.uint8).reshape(rows, nb, 2)
        out = np.concatenate([_fp16_bytes(iq.d), scales_h, low, qs.reshape(rows, nb, 128)], axis=-1)
    assert out.shape[-1] == IQ4_TYPE_SIZE[name], (name, out.shape)
    return np.ascontiguousarray(out.reshape(rows, -1))
