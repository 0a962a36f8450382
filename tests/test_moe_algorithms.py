"""Dense → MoE maths (partitions, routers, the flat router scale) against naive loops and planted structure."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsify.algorithms.moe import (
    analytic_router,
    balanced_assign,
    balanced_kmeans,
    centroid_router,
    check_partition,
    cluster_partition,
    coactivation_partition,
    flat_router_scale,
    partition,
    random_partition,
    shared_neurons,
    topk_recall,
    train_router,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second thread only adds contention (tenfold on a busy machine); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _coact_stats(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``coact = A^T A`` and ``counts`` of 0/1 activity ``A: (tokens, n)``."""
    A = A.float()
    return A.T @ A, A.sum(0)


def _random_coact(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    A = torch.rand(200, n, generator=_gen(seed)) < 0.2
    A[:, 0] = False  # a neuron never active: count 0
    return _coact_stats(A)


SPLITTERS = {
    "random": lambda n, g, seed: random_partition(n, g, seed=seed),
    "kmeans": lambda n, g, seed: balanced_kmeans(torch.randn(n, 8, generator=_gen(n)), g, seed=seed),
    "cluster": lambda n, g, seed: cluster_partition(torch.randn(n, 6, generator=_gen(n)), g, seed=seed),
    "coactivation": lambda n, g, seed: coactivation_partition(*_random_coact(n, n), g, seed=seed),
}
SIZES = [(12, 1), (12, 3), (64, 8), (96, 16), (20, 20)]


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two labelings make the same groups, up to renaming the labels."""

    def groups(labels: torch.Tensor) -> set[frozenset[int]]:
        return {frozenset((labels == v).nonzero().flatten().tolist()) for v in labels.unique().tolist()}

    return groups(a) == groups(b)


def _within_ss(X: torch.Tensor, labels: torch.Tensor) -> float:
    """Within-cluster sum of squared distances, one cluster at a time."""
    return sum(float((X[labels == v] - X[labels == v].mean(0)).pow(2).sum()) for v in labels.unique().tolist())


# ---- partitions -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "groups"), SIZES)
@pytest.mark.parametrize("splitter", SPLITTERS)
def test_partitions_cover_every_neuron_once_and_are_balanced(splitter, n, groups):
    labels = SPLITTERS[splitter](n, groups, 0)
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert int(labels.min()) >= 0 and int(labels.max()) < groups
    assert torch.bincount(labels, minlength=groups).tolist() == [n // groups] * groups
    idx = partition(labels, groups)
    assert len(idx) == groups and all(g.numel() == n // groups for g in idx)
    assert all(torch.equal(g, g.sort().values) for g in idx)
    assert all(bool((labels[g] == e).all()) for e, g in enumerate(idx))
    check_partition(idx, n)


@pytest.mark.parametrize("splitter", SPLITTERS)
def test_partitions_are_deterministic_for_a_seed(splitter):
    a, b = SPLITTERS[splitter](64, 8, 3), SPLITTERS[splitter](64, 8, 3)
    assert torch.equal(a, b)


def test_random_partition_depends_on_the_seed():
    assert not torch.equal(random_partition(64, 8, seed=0), random_partition(64, 8, seed=1))


@pytest.mark.parametrize(("n", "groups"), [(10, 3), (10, 0), (10, -2)])
def test_splitters_refuse_unequal_groups(n, groups):
    with pytest.raises(ValueError):
        random_partition(n, groups)
    with pytest.raises(ValueError):
        balanced_kmeans(torch.randn(n, 4), groups)
    with pytest.raises(ValueError):
        cluster_partition(torch.randn(n, 4), groups)
    with pytest.raises(ValueError):
        coactivation_partition(*_random_coact(n, 0), groups)


def test_check_partition_refuses_missing_doubled_and_outside_neurons():
    check_partition([torch.tensor([0, 2]), torch.tensor([1, 3])], 4)
    for bad in (
        [torch.tensor([0, 2]), torch.tensor([1])],  # 3 missing
        [torch.tensor([0, 2]), torch.tensor([1, 3, 2])],  # 2 twice
        [torch.tensor([0, 2]), torch.tensor([1, 3, 4])],  # 4 outside
        [torch.tensor([0, 2]), torch.tensor([-1, 1, 3])],
    ):
        with pytest.raises(ValueError):
            check_partition(bad, 4)


def _naive_greedy(D: torch.Tensor) -> torch.Tensor:
    """The greedy balanced assignment as a walk over all (point, group) pairs by distance, then flat index."""
    n, g = D.shape
    cap, flat = n // g, D.flatten().tolist()
    label, fill = [-1] * n, [0] * g
    for i in sorted(range(n * g), key=lambda i: (flat[i], i)):
        p, c = divmod(i, g)
        if label[p] < 0 and fill[c] < cap:
            label[p], fill[c] = c, fill[c] + 1
    return torch.tensor(label)


@pytest.mark.parametrize("seed", range(8))
def test_balanced_assign_equals_the_greedy_walk(seed):
    n, g = [(12, 3), (64, 8), (100, 10), (30, 30)][seed % 4]
    D = torch.randn(n, g, generator=_gen(seed)).abs()
    if seed % 2:
        D = D.mul(2).round()  # many ties: broken by the flat index on both sides
    assert torch.equal(balanced_assign(D), _naive_greedy(D))


def test_balanced_kmeans_recovers_planted_blobs_and_beats_random():
    n, groups, d = 96, 8, 16
    centres = torch.randn(groups, d, generator=_gen(0)) * 10  # (groups, d)
    planted = random_partition(n, groups, seed=5)  # (n,)
    X = centres[planted] + 0.1 * torch.randn(n, d, generator=_gen(1))  # (n, d)
    labels = balanced_kmeans(X, groups, seed=0)
    assert _same_partition(labels, planted)
    Y = torch.randn(n, d, generator=_gen(2))  # no structure: still tighter than a random split
    assert _within_ss(Y, balanced_kmeans(Y, groups)) < 0.9 * _within_ss(Y, random_partition(n, groups))


def test_cluster_partition_uses_unit_rows():
    W = torch.randn(48, 12, generator=_gen(3))
    scaled = W * torch.rand(48, 1, generator=_gen(4)).add(0.1) * 100  # each neuron's row rescaled
    assert torch.equal(cluster_partition(W, 4, seed=1), cluster_partition(scaled, 4, seed=1))


def test_coactivation_partition_groups_neurons_that_fire_together():
    n, groups, tokens = 64, 4, 2000
    planted = random_partition(n, groups, seed=7)  # (n,)
    topic = torch.randint(groups, (tokens,), generator=_gen(8))  # (tokens,): which group a token wakes
    p = torch.where(topic[:, None] == planted[None, :], 0.8, 0.05)  # (tokens, n)
    A = torch.rand(tokens, n, generator=_gen(9)) < p
    labels = coactivation_partition(*_coact_stats(A), groups, seed=0)
    assert _same_partition(labels, planted)


def test_shared_neurons_pick_the_top_counts_ties_by_index():
    counts = torch.tensor([3, 5, 5, 1, 5, 0])
    assert shared_neurons(counts, 2).tolist() == [1, 2]
    assert shared_neurons(counts, 4).tolist() == [0, 1, 2, 4]
    assert shared_neurons(counts, 0).tolist() == []
    c = torch.randint(0, 20, (200,), generator=_gen(10)).float()
    naive = sorted(sorted(range(200), key=lambda i: (-float(c[i]), i))[:30])
    assert shared_neurons(c, 30).tolist() == naive
    with pytest.raises(ValueError):
        shared_neurons(counts, 7)


# ---- experts reassemble the FFN -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_shared", [0, 8])
def test_experts_sum_to_the_dense_swiglu_ffn(n_shared):
    n, d, E = 48, 16, 4  # width, hidden, routed experts
    W_g = torch.randn(n, d, generator=_gen(11)) / math.sqrt(d)  # (n, d): outputs of order 1
    W_u = torch.randn(n, d, generator=_gen(12)) / math.sqrt(d)  # (n, d)
    W_d = torch.randn(d, n, generator=_gen(13)) / math.sqrt(n)  # (d, n)
    x = torch.randn(5, d, generator=_gen(14))  # (tokens, d)
    counts = torch.randint(0, 100, (n,), generator=_gen(15))
    shared = shared_neurons(counts, n_shared)
    rest = torch.ones(n, dtype=torch.bool)
    rest[shared] = False
    rest = rest.nonzero().flatten()  # (n - n_shared,)
    labels = cluster_partition(torch.cat([W_g, W_u], 1)[rest], E)
    experts = [rest[g] for g in partition(labels, E)]
    check_partition([*experts, shared], n)
    dense = (F.silu(x @ W_g.T) * (x @ W_u.T)) @ W_d.T  # (tokens, d)
    total = sum((F.silu(x @ W_g[g].T) * (x @ W_u[g].T)) @ W_d[:, g].T for g in [*experts, shared])
    torch.testing.assert_close(total, dense, rtol=0, atol=1e-5)


# ---- routers --------------------------------------------------------------------------------------------------------


def test_centroid_router_equals_a_loop():
    W = torch.randn(24, 10, generator=_gen(16))
    idx = partition(random_partition(24, 4, seed=2), 4)
    R = centroid_router(W, idx)
    assert R.shape == (4, 10)
    for e, g in enumerate(idx):
        rows = [W[j] / W[j].norm() for j in g.tolist()]
        torch.testing.assert_close(R[e], sum(rows) / len(rows), rtol=1e-6, atol=1e-6)


def _planted(tokens: int, d: int, n: int, seed: int, noise: float = 0.5):
    """Inputs ``X`` and activations ``|A|`` whose expert masses are linear in ``X`` plus noise and a constant."""
    Wn = torch.randn(n, d, generator=_gen(1000))  # (n, d): one model; the seed draws the tokens
    X = torch.randn(tokens, d, generator=_gen(seed))  # (T, d)
    A_abs = (X @ Wn.T + 50 + noise * torch.randn(tokens, n, generator=_gen(seed + 1))).abs()  # (T, n)
    return X, A_abs


def _masses(A_abs: torch.Tensor, idx: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([A_abs[:, g].sum(1) for g in idx], 1)  # (T, E)


def test_analytic_router_equals_ridge_lstsq():
    X = torch.randn(300, 12, generator=_gen(17), dtype=F64)  # (N, d)
    A_abs = torch.randn(300, 24, generator=_gen(18), dtype=F64).abs() + X[:, :1].abs()  # (N, n)
    idx = partition(random_partition(24, 4, seed=3), 4)
    ridge = 0.05
    R = analytic_router(X.T @ X, X.T @ A_abs, idx, ridge=ridge)
    lam = ridge * float((X * X).sum(0).mean())
    aug_X = torch.cat([X, math.sqrt(lam) * torch.eye(12, dtype=F64)])  # (N + d, d)
    aug_S = torch.cat([_masses(A_abs, idx), torch.zeros(12, 4, dtype=F64)])  # (N + d, E)
    ref = torch.linalg.lstsq(aug_X, aug_S).solution.T  # (E, d)
    assert R.shape == (4, 12) and R.dtype == torch.float32
    torch.testing.assert_close(R, ref.float(), rtol=1e-5, atol=1e-6)


def test_analytic_router_recalls_held_out_top_k():
    d, n, E, k = 32, 64, 8, 2
    idx = partition(random_partition(n, E, seed=4), E)
    X, A_abs = _planted(4000, d, n, seed=0)
    R = analytic_router(X.T @ X, X.T @ A_abs, idx)
    X_test, A_test = _planted(1000, d, n, seed=50)
    assert topk_recall(X_test @ R.T, _masses(A_test, idx), k) > 0.9


def test_analytic_router_refuses_a_singular_system():
    with pytest.raises(ValueError):
        analytic_router(torch.zeros(4, 4), torch.zeros(4, 8), partition(random_partition(8, 2), 2))


def test_train_router_improves_recall_and_reports_every_step():
    d, n, E, k, steps = 32, 64, 8, 2, 100
    idx = partition(random_partition(n, E, seed=4), E)
    X, A_abs = _planted(4096, d, n, seed=0)
    init = 0.01 * torch.randn(E, d, generator=_gen(19))
    seen: list[tuple[int, float]] = []
    R = train_router(X, A_abs, idx, init, top_k=k, steps=steps, lr=1e-2, callback=lambda s, v: seen.append((s, v)))
    assert [s for s, _ in seen] == list(range(steps)) and all(math.isfinite(v) for _, v in seen)
    assert sum(v for _, v in seen[-10:]) < sum(v for _, v in seen[:10])
    X_test, A_test = _planted(1000, d, n, seed=50)
    S = _masses(A_test, idx)
    before, after = topk_recall(X_test @ init.T, S, k), topk_recall(X_test @ R.T, S, k)
    assert after > 0.8 and after > before + 0.3
    short = [train_router(X, A_abs, idx, init, top_k=k, steps=5, lr=1e-2, seed=1) for _ in range(2)]
    assert torch.equal(short[0], short[1]) and not torch.equal(short[0], init)  # seeded


def test_train_router_without_steps_returns_the_init():
    idx = partition(random_partition(16, 4), 4)
    X, A_abs = _planted(64, 8, 16, seed=1)
    init = torch.randn(4, 8, generator=_gen(20))
    calls: list[int] = []
    R = train_router(X, A_abs, idx, init, top_k=2, steps=0, callback=lambda s, v: calls.append(s))
    assert torch.equal(R, init) and calls == []


def test_topk_recall_matches_set_overlap():
    logits, S = torch.randn(50, 8, generator=_gen(21)), torch.randn(50, 8, generator=_gen(22))
    for k in (1, 3, 8):
        naive = sum(
            len(set(torch.topk(a, k).indices.tolist()) & set(torch.topk(b, k).indices.tolist()))
            for a, b in zip(logits, S, strict=True)
        ) / (50 * k)
        assert topk_recall(logits, S, k) == pytest.approx(naive)
        assert topk_recall(S, S, k) == 1.0


# ---- flat router ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flatness", [1e-5, 1e-3])
@pytest.mark.parametrize("logits_range", [2e-3, 0.7, 1.0, 3.0, 37.5, 1e4])
def test_flat_router_scale_is_the_largest_power_of_two_within_the_bound(logits_range, flatness):
    eps = flat_router_scale(logits_range, flatness)
    assert math.frexp(eps)[0] == 0.5  # a power of two
    assert eps <= 1.0 and eps * logits_range <= flatness
    assert eps == 1.0 or 2 * eps * logits_range > flatness


def test_flat_router_scale_edges():
    assert flat_router_scale(0.0) == 1.0 and flat_router_scale(1e-6, 1e-5) == 1.0
    for bad in [(-1.0, 1e-5), (math.inf, 1e-5), (math.nan, 1e-5), (1.0, 0.0)]:
        with pytest.raises(ValueError):
            flat_router_scale(*bad)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("flatness", [1e-5, 1e-3])
def test_flat_router_softmax_is_uniform_and_keeps_the_ranking(k, flatness):
    logits = 5 * torch.randn(500, 16, generator=_gen(23))  # (T, E)
    eps = flat_router_scale(float(logits.max() - logits.min()), flatness)
    scaled = logits * eps
    assert torch.equal(scaled / eps, logits)  # exact
    top, top_scaled = torch.topk(logits, k, dim=1), torch.topk(scaled, k, dim=1)
    assert torch.equal(top.indices, top_scaled.indices)
    weights = torch.softmax(top_scaled.values, dim=1)  # Mixtral: renormalised over the selected experts
    assert float((weights - 1 / k).abs().max()) <= 2 * flatness
    R = torch.randn(16, 32, generator=_gen(24))  # and through a router's matmul: the scaled weight ranks alike
    x = torch.randn(200, 32, generator=_gen(25))
    assert torch.equal(torch.topk(x @ R.T, k).indices, torch.topk(x @ (R * eps).T, k).indices)
