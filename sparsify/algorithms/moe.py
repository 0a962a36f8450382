"""Dense → MoE maths: split an FFN's neurons into experts and fit a router for them.

An FFN of intermediate width ``n`` (SwiGLU: ``W_g, W_u: (n, d)``, ``W_d: (d, n)``; or ``fc1: (n, d)``,
``fc2: (d, n)``) is a sum over its neurons, so any partition of the neurons into ``E`` groups gives ``E``
experts whose sum is exactly the FFN (MoEfication, Zhang et al. 2022, arXiv:2110.01786). The groups here
are equal (``n / E`` neurons each), so the experts share one shape:

- ``random_partition``: a seeded random split (the baseline).
- ``cluster_partition``: MoEfication's parameter clustering, balanced k-means over the neurons' unit
  input-weight vectors.
- ``coactivation_partition``: MoEfication's co-activation split (neurons that fire together go together),
  balanced k-means over each neuron's normalised co-activation profile.
- ``shared_neurons``: the most frequently active neurons, always on (CMoE's shared experts, Pei et al. 2025,
  arXiv:2502.04416); the rest are split into routed experts.

A bias-free linear router ``logits = x @ R^T`` with ``R: (E, d)`` picks the top-k routed experts per token:
``centroid_router`` (each expert's cluster centre, as MoEfication and CMoE), ``analytic_router`` (ridge
regression of each expert's activation mass on the input) and ``train_router`` (a listwise fit of the
router's ranking to the experts' activation mass). ``flat_router_scale`` shrinks a router so that Mixtral's
renormalised softmax over the selected experts weights them all alike, as the dense FFN's plain sum does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def _check_groups(n: int, groups: int) -> None:
    if groups < 1:
        raise ValueError(f"groups must be a positive number of experts, got {groups}")
    if n % groups:
        raise ValueError(f"{n} neurons do not split into {groups} equal groups (pick a divisor of {n})")


# ---- partitions -----------------------------------------------------------------------------------------------------


def random_partition(n: int, groups: int, seed: int = 0) -> Tensor:
    """Labels ``(n,)`` int64 in ``[0, groups)``, ``n / groups`` of each, at seeded random positions."""
    _check_groups(n, groups)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (n,)
    labels = torch.empty(n, dtype=torch.int64)
    labels[perm] = torch.arange(n) // (n // groups)
    return labels


def balanced_assign(D: Tensor) -> Tensor:
    """Labels ``(n,)`` for distances ``D: (n, groups)``, ``n / groups`` points per group.

    The greedy balanced assignment: walk all ``(point, group)`` pairs by increasing distance (ties by
    ``point * groups + group``) and put a point in a group when it is still unplaced and the group not full.
    Computed without the walk, by deferred acceptance (Gale-Shapley with capacities): every unplaced point
    proposes to its nearest group that has not yet turned it down; a group keeps the ``n / groups`` nearest
    of its held and new proposers and turns down the others. When both sides rank by one strict order of
    the pairs the stable matching is unique, and the greedy walk finds it too, so the two are the same
    labels; each round is a sort of ``n`` keys instead of a Python step per pair.
    """
    n, groups = D.shape
    _check_groups(n, groups)
    cap = n // groups
    order = torch.argsort(D.reshape(-1), stable=True)  # (n * groups,): the greedy walk
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n * groups)
    rank = rank.reshape(n, groups)  # (n, groups): a strict order of the pairs, shared by both sides
    pref = torch.argsort(rank, dim=1)  # (n, groups): each point's groups, nearest first
    nxt = torch.zeros(n, dtype=torch.int64)  # (n,): the next group in each point's list to propose to
    label = torch.full((n,), -1, dtype=torch.int64)  # (n,): held by a group, or -1
    while True:
        free = (label < 0).nonzero().flatten()  # (f,)
        if free.numel() == 0:
            return label
        proposed = pref[free, nxt[free]]  # (f,): never past the end, as all groups together hold n points
        nxt[free] += 1
        held = (label >= 0).nonzero().flatten()  # (n - f,)
        points = torch.cat([held, free])  # (n,)
        chosen = torch.cat([label[held], proposed])  # (n,)
        key = chosen * (n * groups) + rank[points, chosen]  # by group, then by pair rank
        by_key = torch.argsort(key)
        points, chosen = points[by_key], chosen[by_key]
        count = torch.bincount(chosen, minlength=groups)  # (groups,)
        start = torch.cumsum(count, 0) - count
        place = torch.arange(n) - start[chosen]  # (n,): position in the group's queue
        label[points] = torch.where(place < cap, chosen, -1)


def _sq_dist(X: Tensor, x_sq: Tensor, C: Tensor) -> Tensor:
    """Squared euclidean distances ``(n, k)`` between rows of ``X: (n, d)`` (``x_sq``: their squared norms)
    and ``C: (k, d)``, without the ``(n, k, d)`` difference."""
    return (x_sq[:, None] - 2.0 * (X @ C.T) + C.pow(2).sum(1)[None, :]).clamp_(min=0.0)  # (n, k)


def _kmeans_pp(X: Tensor, x_sq: Tensor, groups: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): centres ``(groups, d)`` drawn from ``X`` in turn,
    each with probability proportional to its squared distance to the nearest centre so far."""
    n = X.shape[0]
    idx = [int(torch.randint(n, (1,), generator=gen))]
    nearest = _sq_dist(X, x_sq, X[idx]).squeeze(1)  # (n,)
    for _ in range(1, groups):
        total = float(nearest.double().sum())
        if total > 0:
            i = int(torch.multinomial(nearest.double() / total, 1, generator=gen))
        else:  # every point sits on a centre already (duplicated points)
            i = int(torch.randint(n, (1,), generator=gen))
        idx.append(i)
        nearest = torch.minimum(nearest, _sq_dist(X, x_sq, X[i : i + 1]).squeeze(1))
    return X[idx].clone()  # (groups, d)


def _means(X: Tensor, labels: Tensor, groups: int) -> Tensor:
    """Group means ``(groups, d)`` of ``X: (n, d)``, by a one-hot matmul (no copy of ``X``; deterministic)."""
    onehot = torch.zeros(groups, X.shape[0], dtype=X.dtype)  # (groups, n)
    onehot[labels, torch.arange(X.shape[0])] = 1.0
    return (onehot @ X) / torch.bincount(labels, minlength=groups).clamp(min=1)[:, None].to(X.dtype)


def balanced_kmeans(X: Tensor, groups: int, iters: int = 30, seed: int = 0) -> Tensor:
    """Balanced k-means: labels ``(n,)`` of the rows of ``X: (n, d)``, exactly ``n / groups`` per cluster.

    Squared euclidean distance on the rows as given (callers normalise them, which makes it the cosine
    distance ``2 - 2 cos``). Seeded k-means++ centres; then each iteration assigns with
    :func:`balanced_assign` (the greedy walk over all ``n * groups`` pairs by distance, under capacity) and
    moves each centre to its members' mean. A capacity-bound assignment need not lower the objective every
    time, so the labels returned are those of lowest within-cluster sum of squares seen; the loop stops
    early once the labels repeat. Deterministic for a seed (float32 maths on the CPU; the same on a device
    up to its matmul's rounding). Cost per iteration: one ``(n, d) @ (d, groups)`` matmul and a few sorts of
    ``n`` or ``n * groups`` keys.
    """
    if X.ndim != 2:
        raise ValueError(f"expected X (n, d), got shape {tuple(X.shape)}")
    n = X.shape[0]
    _check_groups(n, groups)
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    if groups == 1:
        return torch.zeros(n, dtype=torch.int64)
    X = X.float()  # (n, d)
    x_sq = X.pow(2).sum(1)  # (n,)
    C = _kmeans_pp(X, x_sq, groups, torch.Generator().manual_seed(seed))  # (groups, d)
    best, best_score, prev = None, -math.inf, None
    for _ in range(iters):
        labels = balanced_assign(_sq_dist(X, x_sq, C))  # (n,)
        C = _means(X, labels, groups)  # (groups, d)
        # sum_i ||x_i - c_{l_i}||^2 = sum ||x||^2 - (n / groups) * sum_g ||c_g||^2: maximise sum ||c_g||^2
        score = float(C.double().pow(2).sum())
        if score > best_score:
            best, best_score = labels, score
        if prev is not None and torch.equal(labels, prev):
            break
        prev = labels
    assert best is not None
    return best


def cluster_partition(W_in: Tensor, groups: int, seed: int = 0) -> Tensor:
    """MoEfication's parameter clustering: labels ``(n,)`` from balanced k-means over the neurons'
    L2-normalised input-weight rows ``W_in: (n, d)`` (for SwiGLU, ``[W_g | W_u]``: ``(n, 2d)``)."""
    W = W_in.float()  # (n, d)
    W = W / W.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return balanced_kmeans(W, groups, seed=seed)


def coactivation_partition(coact: Tensor, counts: Tensor, groups: int, seed: int = 0) -> Tensor:
    """MoEfication's co-activation split: labels ``(n,)``, neurons that fire together in one group.

    ``coact: (n, n)``: how often neurons ``i`` and ``j`` were active on the same token; ``counts: (n,)``: how
    often each was active (``coact``'s diagonal, for 0/1 activity). ``P_ij = coact_ij / sqrt(counts_i
    counts_j)`` (0 where a count is 0) is the cosine similarity of the two neurons' activity patterns. Each
    neuron's row of ``P``, L2-normalised, is its feature vector, and balanced k-means groups neurons whose
    profiles of co-firing partners point the same way (so two neurons that each fire with the same partners
    go together even when they rarely fire with each other). MoEfication partitions the co-activation graph
    with METIS instead; k-means on the rows needs no graph library and keeps the groups exactly equal.
    Never-active neurons have zero rows and join whichever groups have room. Memory: two ``(n, n)`` float32
    buffers (0.8 GB each at ``n = 14336``).
    """
    n = counts.numel()
    if coact.shape != (n, n):
        raise ValueError(f"expected coact (n, n) and counts (n,), got {tuple(coact.shape)} and {tuple(counts.shape)}")
    c = counts.double()  # (n,)
    inv = torch.where(c > 0, c.clamp(min=1e-300).rsqrt(), torch.zeros_like(c)).float()  # (n,): 0 where never active
    P = coact.to(torch.float32, copy=True)  # (n, n)
    P.mul_(inv[:, None]).mul_(inv[None, :])
    P.div_(P.norm(dim=1, keepdim=True).clamp_(min=1e-12))
    return balanced_kmeans(P, groups, seed=seed)


def shared_neurons(counts: Tensor, n_shared: int) -> Tensor:
    """Indices ``(n_shared,)`` of the most frequently active neurons (CMoE's shared experts), ties broken by
    the lower index, returned in ascending index order (the kept layout stays in order)."""
    if not 0 <= n_shared <= counts.numel():
        raise ValueError(f"cannot share {n_shared} of {counts.numel()} neurons")
    order = torch.sort(counts.flatten(), descending=True, stable=True).indices  # (n,): equal counts by index
    return order[:n_shared].sort().values


def partition(labels: Tensor, groups: int) -> list[Tensor]:
    """The neuron indices of each group, ascending: ``groups`` int64 tensors (empty for an unused label)."""
    if labels.ndim != 1 or (labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= groups)):
        raise ValueError(f"labels must be a vector of values in [0, {groups})")
    order = torch.argsort(labels, stable=True)  # (n,): by group, then by index
    counts = torch.bincount(labels, minlength=groups).tolist()
    return list(order.split(counts))


def check_partition(groups_idx: list[Tensor], n: int) -> None:
    """Raise ValueError unless the groups together hold every neuron of ``range(n)`` exactly once."""
    flat = torch.cat([g.flatten().long() for g in groups_idx]) if groups_idx else torch.zeros(0, dtype=torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n):
        raise ValueError(f"a group holds a neuron outside [0, {n})")
    seen = torch.bincount(flat, minlength=n)  # (n,)
    if not bool((seen == 1).all()):
        missing, doubled = int((seen == 0).sum()), int((seen > 1).sum())
        raise ValueError(f"not a partition of {n} neurons: {missing} missing, {doubled} in more than one group")


# ---- routers --------------------------------------------------------------------------------------------------------


def membership(groups_idx: list[Tensor], n: int) -> Tensor:
    """``M: (n, E)`` float32 with ``M[j, e] = 1`` when neuron ``j`` is in expert ``e`` (rows of neurons in no
    group, such as shared ones, stay zero)."""
    M = torch.zeros(n, len(groups_idx), dtype=torch.float32)  # (n, E)
    for e, g in enumerate(groups_idx):
        M[g.long(), e] = 1.0
    return M


def centroid_router(W_gate_rows: Tensor, groups_idx: list[Tensor]) -> Tensor:
    """Router ``(E, d)``: each expert's row is the mean of its neurons' L2-normalised input-weight rows
    ``W_gate_rows: (n, d)`` (MoEfication's and CMoE's cluster centre; for SwiGLU, ``W_g``)."""
    W = W_gate_rows.float()  # (n, d)
    W = W / W.norm(dim=1, keepdim=True).clamp(min=1e-12)
    M = membership(groups_idx, W.shape[0])  # (n, E)
    return (M.T @ W) / M.sum(0).clamp(min=1)[:, None]  # (E, d)


def analytic_router(XtX: Tensor, XtA: Tensor, groups_idx: list[Tensor], ridge: float = 1e-2) -> Tensor:
    """Router ``(E, d)`` by ridge regression of each expert's activation mass on the FFN input.

    ``XtX = X^T X: (d, d)`` and ``XtA = X^T |A|: (d, n)`` are sums over calibration tokens ``X: (N, d)`` with
    intermediate activations ``A: (N, n)``. The targets are ``S = |A| @ M: (N, E)`` (``M: (n, E)`` the
    membership), so ``X^T S = XtA @ M`` and ``R^T = (X^T X + ridge * mean(diag X^T X) * I)^-1 X^T S``. The
    Cholesky solve runs in float64 (the normal equations square the condition number); the result is float32.
    Raises ValueError when the damped ``X^T X`` is not positive definite (more ``ridge`` helps).
    """
    d = XtX.shape[0]
    if XtX.shape != (d, d) or XtA.ndim != 2 or XtA.shape[0] != d:
        raise ValueError(f"expected XtX (d, d) and XtA (d, n), got {tuple(XtX.shape)} and {tuple(XtA.shape)}")
    G = XtX.double().clone()  # (d, d)
    G.diagonal().add_(ridge * G.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(G)  # (d, d), lower
    if info:
        raise ValueError("X^T X + ridge * I is not positive definite; increase ridge or calibrate on more tokens")
    XtS = XtA.double() @ membership(groups_idx, XtA.shape[1]).double()  # (d, E)
    return torch.cholesky_solve(XtS, L).T.float().contiguous()  # (E, d)


def topk_recall(logits: Tensor, S: Tensor, k: int) -> float:
    """The fraction of the true top-``k`` experts (by ``S: (T, E)``) that the top-``k`` of ``logits: (T, E)``
    recovers, over all tokens (ties in ``S`` go to ``torch.topk``'s choice)."""
    if logits.shape != S.shape or not 0 < k <= S.shape[-1]:
        raise ValueError(f"expected logits and S of one shape (T, E) and 0 < k <= E, got {tuple(logits.shape)}, k={k}")
    picked = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)  # (T, E)
    picked.scatter_(1, torch.topk(logits, k, dim=1).indices, True)
    hits = picked.gather(1, torch.topk(S, k, dim=1).indices.to(logits.device))  # (T, k)
    return float(hits.float().mean()) if hits.numel() else 1.0


def train_router(
    X: Tensor,
    A_abs: Tensor,
    groups_idx: list[Tensor],
    init: Tensor,
    top_k: int,
    steps: int = 300,
    lr: float = 1e-3,
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
    tau: float = 0.5,
) -> Tensor:
    """Router ``(E, d)`` fitted on calibration tokens ``X: (T, d)`` so that its top-``k`` follows the experts
    of largest activation mass ``S = A_abs @ M: (T, E)`` (``A_abs: (T, n)``, the intermediate ``|A|``).

    The loss is a listwise cross-entropy (ListNet, Cao et al. 2007) between ``softmax(x @ R^T)`` and the
    target ``softmax(z / tau)``, ``z`` each token's ``S`` standardised over experts (zero mean, unit
    variance): scale-free in the activations, and with ``tau = 0.5`` an expert one standard deviation above
    another gets ``e^2`` times its weight, so the target concentrates on the top few without being one-hot.
    Adam (``lr``) on minibatches of 1024 tokens drawn without replacement by a seeded generator, from
    ``init: (E, d)``; ``callback(step, loss)`` after every step. The ranking the loss fits is what matters,
    so the weight returned is the trained one unless ``init`` has the higher top-``k`` recall on the
    calibration tokens (then ``init``): training never makes the router worse there.
    """
    T, d = X.shape
    E = len(groups_idx)
    if init.shape != (E, d) or A_abs.shape[0] != T:
        raise ValueError(
            f"expected X (T, d), A_abs (T, n) and init ({E}, d), got {tuple(X.shape)}, {tuple(A_abs.shape)}, "
            f"{tuple(init.shape)}"
        )
    if not 0 < top_k <= E:
        raise ValueError(f"top_k must be in 1..{E}, got {top_k}")
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    gen = torch.Generator().manual_seed(seed)
    batch = min(1024, T)
    with torch.inference_mode(False), torch.no_grad():
        X = X.float().clone()  # (T, d): a normal tensor even if the caller's came from inference mode
        S = A_abs.float() @ membership(groups_idx, A_abs.shape[1]).to(A_abs.device)  # (T, E)
        S = S.to(X.device)
        z = (S - S.mean(1, keepdim=True)) / S.std(1, correction=0, keepdim=True).clamp(min=1e-6)  # (T, E)
        target = torch.softmax(z / tau, dim=1)  # (T, E)
        init = init.float().to(X.device)
    with torch.inference_mode(False), torch.enable_grad():
        R = init.clone().requires_grad_(True)  # (E, d)
        opt = torch.optim.Adam([R], lr=lr)
        order, pos = torch.randperm(T, generator=gen), 0
        for step in range(steps):
            if pos + batch > T:
                order, pos = torch.randperm(T, generator=gen), 0
            idx = order[pos : pos + batch].to(X.device)
            pos += batch
            logp = torch.log_softmax(X[idx] @ R.T, dim=1)  # (B, E)
            loss = -(target[idx] * logp).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if callback is not None:
                callback(step, float(loss.detach()))
        trained = R.detach()
    with torch.no_grad():
        if topk_recall(X @ init.T, S, top_k) > topk_recall(X @ trained.T, S, top_k):
            return init.clone()
    return trained


def flat_router_scale(logits_range: float, flatness: float = 1e-5) -> float:
    """The largest power of two ``eps <= 1`` with ``eps * logits_range <= flatness`` (1 for a router that is
    flat already).

    A dense FFN is the plain sum of its neuron groups, while a Mixtral-style block weights the selected
    experts by the softmax of their router logits renormalised over the top-k. Multiplying the router by
    ``eps`` (``logits_range``: the spread ``max - min`` of the logits over calibration tokens) squeezes the
    selected logits within ``flatness`` of each other, so each weight is ``1/k`` to within ``flatness``
    (``|w - 1/k| <= (k - 1) / k^2 * flatness`` to first order), and the caller multiplies the experts'
    output projections by ``k`` to recover the plain sum. A power of two scales every product and sum of the
    router's matmul exactly, so the logits are exactly ``eps`` times the old ones and the top-k ranking is
    kept bit for bit (barring underflow: keep the router in float32 or bfloat16, not float16).
    """
    if not flatness > 0:
        raise ValueError(f"flatness must be positive, got {flatness}")
    if not logits_range >= 0 or math.isinf(logits_range):
        raise ValueError(f"logits_range must be a finite spread >= 0, got {logits_range}")
    if logits_range <= flatness:
        return 1.0
    exp = math.floor(math.log2(flatness / logits_range))
    while 2.0**exp * logits_range > flatness:  # log2's rounding
        exp -= 1
    while 2.0 ** (exp + 1) * logits_range <= flatness:
        exp += 1
    return 2.0**exp
