"""Every routed expert calibrated: statistics for the experts of sparse MoE blocks that routing starves.

A routed expert sees only the tokens its router sends it; on a few hundred calibration windows some experts
of a large MoE see few or none, and a method that reads input statistics (Wanda's norms, GPTQ's Hessian, a
static activation scale) has nothing to read. As llm-compressor's all-expert calibration does, such an expert
is also run on the layer's other tokens while its statistics are gathered, its output thrown away: the
block's output stays the routed one, so the layers after calibrate on what the model really computes.

Modes (the recipe's ``calibration.experts``):

- ``fill``: each expert's statistics are those of its routed tokens; an expert routed fewer than
  ``expert_min_tokens`` (counted over every batch and every rank) is gathered again on all of its layer's
  tokens (one more forward of the layer, only where an expert is starved).
- ``all``: every expert sees every token of its layer (one forward; the experts' cost × experts / top-k).
- ``routed``: strictly routed statistics; an expert that sees no token is rounded or pruned without
  calibration (the pass says so in its records).

The decision is made on counts combined over the ranks, so a torchrun run widens the very experts one
process widens.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from sparsify.expert_modes import FILL, ExpertCalibration, ExpertMode
from sparsify.runtime.moe import MoEBlock


@dataclass(frozen=True)
class ExpertSlot:
    block: MoEBlock
    index: int  # the expert's index among the block's routed experts


def expert_slots(layer: nn.Module, targets: dict[str, nn.Module]) -> dict[str, ExpertSlot]:
    """fqn → the routed expert it belongs to, for the targets that are a routed expert's Linears."""
    owner: dict[int, ExpertSlot] = {}
    for block in (m for m in layer.modules() if isinstance(m, MoEBlock)):
        for e, expert in enumerate(block.experts):
            for linear in expert.modules():
                owner[id(linear)] = ExpertSlot(block, e)
    return {fqn: owner[id(m)] for fqn, m in targets.items() if id(m) in owner}


def _wide_forward(block: MoEBlock, wide: frozenset[int], x: Tensor) -> Tensor:
    """The block's routed output, unchanged; besides, each expert of ``wide`` also runs on the tokens not
    routed to it (its output discarded), so that hooks on its Linears see every token of the layer."""
    out = MoEBlock.forward(block, x)
    h = x.reshape(-1, x.shape[-1])  # (N, d)
    _, index = block.route(h)  # (N, k)
    for e in sorted(wide):
        others = ~(index == e).any(-1)  # (N,) tokens the router did not send to e
        if others.any():
            block.experts[e](h[others])
    return out


@contextlib.contextmanager
def widened(blocks: dict[MoEBlock, set[int]]) -> Iterator[None]:
    """Within: each block's experts named in ``blocks`` also see the tokens not routed to them."""
    patched = []
    try:
        for block, experts in blocks.items():
            if experts:
                block.forward = functools.partial(_wide_forward, block, frozenset(experts))
                patched.append(block)
        yield
    finally:
        for block in patched:
            del block.forward


def starved(slots: dict[str, ExpertSlot], tokens: dict[str, int], min_tokens: int) -> dict[str, ExpertSlot]:
    """The experts' Linears whose expert was routed fewer than ``min_tokens`` tokens (``tokens``: fqn → count)."""
    short = {s for fqn, s in slots.items() if tokens[fqn] < min_tokens}
    return {fqn: s for fqn, s in slots.items() if s in short}


def by_block(slots: dict[str, ExpertSlot]) -> dict[MoEBlock, set[int]]:
    blocks: dict[MoEBlock, set[int]] = {}
    for s in slots.values():
        blocks.setdefault(s.block, set()).add(s.index)
    return blocks


def every_expert(slots: dict[str, ExpertSlot]) -> dict[MoEBlock, set[int]]:
    return {s.block: set(range(len(s.block.experts))) for s in slots.values()}


# ------------------------------------------------------------------------------------------ report


def expert_name(fqn: str) -> str:
    """``model.layers.0.mlp.experts.3.w1`` → ``model.layers.0.mlp.experts.3``."""
    return fqn.rpartition(".")[0]


def _in_order(name: str) -> list[tuple[int, int | str]]:
    """``layers.2.mlp.experts.10`` after ``layers.2.mlp.experts.9``: numbers compared as numbers."""
    return [(0, int(t)) if t.isdigit() else (1, t) for t in name.split(".")]


def calibration_notes(records: list[dict[str, Any]]) -> list[str]:
    """Report notes naming the experts whose statistics were widened to their layer's other tokens, and those
    compressed without calibration (records' ``calibrated_on``), per pass."""
    notes = []
    passes = sorted({r.get("pass", 0) for r in records if r.get("calibrated_on")})
    for p in passes:
        rows = [r for r in records if r.get("pass", 0) == p and r.get("calibrated_on")]
        for kind, what in (
            ("all tokens", "calibrated on all of their layer's tokens (routed fewer than expert_min_tokens)"),
            ("none", "saw no calibration token: compressed without calibration"),
        ):
            ours = [r for r in rows if str(r["calibrated_on"]).startswith(kind)]
            if not ours:
                continue
            names = sorted({expert_name(r["name"]) for r in ours}, key=_in_order)
            fallback = sorted({str(r["calibrated_on"]).removeprefix("none: ") for r in ours})
            how = f" ({'; '.join(fallback)})" if kind == "none" else ""
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            notes.append(f"pass {p}: {len(names)} routed expert(s) {what}{how}: {shown}")
    return notes


__all__ = [
    "FILL",
    "ExpertCalibration",
    "ExpertMode",
    "ExpertSlot",
    "by_block",
    "calibration_notes",
    "every_expert",
    "expert_slots",
    "starved",
    "widened",
]
