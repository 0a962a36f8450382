"""A type for every tensor within a byte budget: the multiple-choice knapsack, by dynamic programming.

Each tensor ``i`` has a menu of options ``(bytes_ij, damage_ij)`` (one per type it can be written in); choose one
option per tensor minimising ``sum damage`` with ``sum bytes <= budget``. The damages are additive predictions
(:mod:`sparsify.export.budget`: each tensor's Fisher-weighted rounding error), so the sum is the quantity to
minimise and the problem is exactly this knapsack.

Solved by dynamic programming over the budget cut into ``cells`` equal units, every option's bytes rounded *up*
to whole units (so the answer never exceeds the budget; at most one unit per tensor is lost to rounding), then
the bytes left are spent greedily on the upgrades that remove the most damage per byte. With ``cells`` = 65536
and a few hundred tensors the loss to rounding is under half a percent of the budget before the greedy pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CELLS = 65536  # budget units of the dynamic programme


@dataclass(frozen=True)
class Option:
    bytes: int
    damage: float


def smallest(menus: list[list[Option]]) -> int:
    """The fewest bytes any choice reaches."""
    return sum(min(o.bytes for o in menu) for menu in menus)


def largest(menus: list[list[Option]]) -> int:
    return sum(max(o.bytes for o in menu) for menu in menus)


def allocate(menus: list[list[Option]], budget: int, cells: int = CELLS) -> list[int]:
    """The index of the option chosen in each menu: least total damage within ``budget`` bytes.

    ``budget`` must be at least :func:`smallest` (the caller refuses less, naming what can be reached)."""
    if any(not menu for menu in menus):
        raise ValueError("every tensor needs at least one option")
    if budget < smallest(menus):
        raise ValueError(f"budget {budget} below the smallest reachable {smallest(menus)}")
    if budget >= largest(menus):  # everything fits: the least damage of each menu
        return [min(range(len(m)), key=lambda j: (m[j].damage, m[j].bytes)) for m in menus]
    unit = budget / cells
    best = np.zeros(cells + 1)  # best[c]: least damage of the tensors so far within c units
    picks = np.zeros((len(menus), cells + 1), dtype=np.int16)  # (tensors, cells) the option behind best[c]
    for i, menu in enumerate(menus):
        new = np.full(cells + 1, np.inf)
        for j, o in enumerate(menu):
            w = math.ceil(o.bytes / unit - 1e-9)  # units, rounded up: never over the budget
            if w > cells:
                continue
            cand = np.full(cells + 1, np.inf)
            cand[w:] = best[: cells + 1 - w] + o.damage
            better = cand < new
            new[better] = cand[better]
            picks[i, better] = j
        best = new
    if not np.isfinite(best[cells]):  # the rounding up cost the only fitting choice: start from the smallest
        chosen = [min(range(len(m)), key=lambda j: (m[j].bytes, m[j].damage)) for m in menus]
    else:
        chosen, c = [0] * len(menus), cells
        for i in range(len(menus) - 1, -1, -1):
            j = int(picks[i, c])
            chosen[i] = j
            c -= math.ceil(menus[i][j].bytes / unit - 1e-9)
    return _fill(menus, chosen, budget)


def _fill(menus: list[list[Option]], chosen: list[int], budget: int) -> list[int]:
    """Spend the bytes the rounding left: repeatedly take the affordable change that removes the most damage per
    byte (or any damage at no extra bytes)."""
    chosen = list(chosen)
    left = budget - sum(m[j].bytes for m, j in zip(menus, chosen, strict=True))
    while True:
        step = None  # (gain per byte, gain, i, j)
        for i, menu in enumerate(menus):
            now = menu[chosen[i]]
            for j, o in enumerate(menu):
                extra, gain = o.bytes - now.bytes, now.damage - o.damage
                if gain <= 0 or extra > left:
                    continue
                rate = math.inf if extra <= 0 else gain / extra
                if step is None or (rate, gain) > step[:2]:
                    step = (rate, gain, i, j)
        if step is None:
            return chosen
        _, _, i, j = step
        left -= menus[i][j].bytes - menus[i][chosen[i]].bytes
        chosen[i] = j
