"""The byte budget's knapsack (`sparsify.algorithms.allocate`) against exhaustive search, and the size parser."""

from __future__ import annotations

import itertools
import random

import pytest

from sparsify.algorithms.allocate import Option, allocate, largest, smallest
from sparsify.sizes import parse_size


def _brute(menus: list[list[Option]], budget: int) -> float:
    """The least total damage of any choice within ``budget``: every combination tried."""
    best = float("inf")
    for pick in itertools.product(*(range(len(m)) for m in menus)):
        if sum(m[j].bytes for m, j in zip(menus, pick, strict=True)) <= budget:
            best = min(best, sum(m[j].damage for m, j in zip(menus, pick, strict=True)))
    return best


def _instance(seed: int, tensors: int = 5, options: int = 4) -> list[list[Option]]:
    """Menus as types give them: more bytes, less damage, but not convex (a type can be dominated)."""
    rng = random.Random(seed)
    menus = []
    for _ in range(tensors):
        sizes = sorted(rng.sample(range(1, 40), options))
        damages = sorted((rng.uniform(0, 10) for _ in range(options)), reverse=True)
        if rng.random() < 0.5:  # a dominated option: more bytes and more damage than a smaller one
            damages[-1] = damages[0] + 1
        menus.append([Option(b, d) for b, d in zip(sizes, damages, strict=True)])
    return menus


def _cost(menus, chosen):
    return (
        sum(m[j].bytes for m, j in zip(menus, chosen, strict=True)),
        sum(m[j].damage for m, j in zip(menus, chosen, strict=True)),
    )


@pytest.mark.parametrize("seed", range(12))
def test_the_allocation_is_the_exhaustive_optimum_when_units_are_bytes(seed):
    menus = _instance(seed)
    for budget in range(smallest(menus), largest(menus) + 2, 7):
        chosen = allocate(menus, budget, cells=budget)  # one unit per byte: the programme is exact
        used, damage = _cost(menus, chosen)
        assert used <= budget
        assert damage == pytest.approx(_brute(menus, budget))


@pytest.mark.parametrize("seed", range(6))
def test_with_coarse_units_it_stays_within_the_budget_and_near_the_optimum(seed):
    menus = _instance(seed, tensors=6)
    for budget in range(smallest(menus), largest(menus), 5):
        chosen = allocate(menus, budget, cells=64)  # units of budget/64 bytes: rounding up loses < 1 unit per tensor
        used, damage = _cost(menus, chosen)
        assert used <= budget
        lost = 6 * budget / 64
        assert damage <= _brute(menus, int(budget - lost)) + 1e-9


def test_the_leftover_bytes_are_spent():
    """Rounding up leaves bytes; the greedy pass spends them on what they buy."""
    menus = [[Option(10, 5.0), Option(11, 1.0)] for _ in range(8)]
    chosen = allocate(menus, 84, cells=8)  # units of 10.5 bytes: 11 bytes round up to 2, so only 10s fit in 8 units
    assert _cost(menus, chosen) == (84, 4 * 1.0 + 4 * 5.0)  # the 4 bytes left buy 4 upgrades


def test_a_budget_below_the_smallest_is_refused_by_the_caller():
    menus = [[Option(10, 1.0)]]
    with pytest.raises(ValueError, match="below the smallest"):
        allocate(menus, 9)
    assert allocate(menus, 10) == [0]


SIZES = [("105MB", 105_000_000), ("105M", 105_000_000), ("100MiB", 100 * 2**20), ("2 GB", 2 * 10**9),
         ("4096", 4096), ("1.5GiB", int(1.5 * 2**30)), ("64kb", 64_000)]  # fmt: skip


@pytest.mark.parametrize("text, n", SIZES)
def test_sizes_as_people_write_them(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "MB", "-5MB", "0", "5XB", "5 MB extra"])
def test_what_is_not_a_size(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)
