"""Pure tensor functions against naive references, with exact or tight tolerances."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.utils import prune

from sparsify.algorithms import (
    dense_output_target,
    magnitude_mask,
    nm_mask,
    outlier_ratio,
    owl_layer_sparsities,
    relative_reconstruction_error,
    ria_scores,
    sparsegpt_prune,
    unstructured_mask,
    wanda_scores,
)
from sparsify.algorithms.masks import nm_mask as nm_mask_direct


def _uneven_layer(seed: int = 0, out_f: int = 32, in_f: int = 64, n: int = 512):
    """A Linear whose input features are correlated and of uneven scale, as real activations are."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(0.75 * torch.randn(in_f, generator=g))  # (in,) spread over ~e^±1.5
    mix = torch.eye(in_f) + torch.randn(in_f, in_f, generator=g) / in_f**0.5  # (in, in) correlates features
    X = (torch.randn(n, in_f, generator=g) @ mix) * scales  # (n, in)
    W = torch.randn(out_f, in_f, generator=g)  # (out, in)
    return W, X


@pytest.mark.parametrize("shape", [(8, 6), (33, 17), (64, 128)])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
def test_magnitude_mask_equals_torch_l1_unstructured(shape, sparsity):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    layer = torch.nn.Linear(shape[1], shape[0], bias=False)
    layer.weight.data.copy_(W)
    prune.l1_unstructured(layer, "weight", amount=sparsity)
    expected = layer.weight_mask.bool().clone()
    for r in range(shape[0]):  # sparsify's one difference: a row that would lose everything keeps its largest
        if not expected[r].any():
            expected[r, W[r].abs().argmax()] = True
    torch.testing.assert_close(magnitude_mask(W, sparsity), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_per_tensor_methods_never_empty_a_row(method):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(16, 64, generator=g)
    W[5] *= 1e-4  # a row whose weights are all smaller than everyone else's
    X = torch.randn(256, 64, generator=g)
    if method == "magnitude":
        keep = magnitude_mask(W, 0.95)
    else:
        _, keep = sparsegpt_prune(W, X.T @ X, 0.95, blocksize=16)
    assert keep.any(dim=1).all()
    assert keep[5].sum() == 1
    assert (~keep).float().mean() == pytest.approx(0.95, abs=2 / 64)


def test_row_scope_prunes_the_same_count_in_every_row_and_only_the_smallest():
    scores = torch.rand(16, 40, generator=torch.Generator().manual_seed(2))
    mask = unstructured_mask(scores, 0.3, "row")
    assert ((~mask).sum(1) == 12).all()
    for r in range(16):
        assert scores[r][~mask[r]].max() <= scores[r][mask[r]].min()


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_nm_mask_equals_brute_force(n, m):
    scores = torch.rand(6, 4 * m, generator=torch.Generator().manual_seed(3))
    mask = nm_mask(scores, n, m)
    for r in range(scores.shape[0]):
        for g0 in range(0, scores.shape[1], m):
            group = scores[r, g0 : g0 + m]
            best = max(itertools.combinations(range(m), n), key=lambda c: float(group[list(c)].sum()))
            expected = torch.zeros(m, dtype=torch.bool)
            expected[list(best)] = True
            assert torch.equal(mask[r, g0 : g0 + m], expected)


def test_nm_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of M"):
        nm_mask(torch.rand(2, 6), 2, 4)
    with pytest.raises(ValueError, match="0 < N < M"):
        nm_mask_direct(torch.rand(2, 8), 4, 4)


def test_wanda_and_ria_scores_match_loops():
    W, X = _uneven_layer(4, 5, 7, 30)
    sq = X.pow(2).sum(0)
    wanda, ria = wanda_scores(W, sq), ria_scores(W, sq, alpha=0.5)
    for i in range(5):
        for j in range(7):
            norm = float(sum(float(X[t, j]) ** 2 for t in range(30))) ** 0.5
            assert wanda[i, j].item() == pytest.approx(abs(W[i, j].item()) * norm, rel=1e-5)
            rel = abs(W[i, j]) / W[i].abs().sum() + abs(W[i, j]) / W[:, j].abs().sum()
            assert ria[i, j].item() == pytest.approx(float(rel) * norm**0.5, rel=1e-5)


def test_reconstruction_error_matches_direct_computation():
    W, X = _uneven_layer(5)
    W_new = W * magnitude_mask(W, 0.5)
    direct = ((X @ W.T - X @ W_new.T).pow(2).sum() / (X @ W.T).pow(2).sum()).item()
    assert relative_reconstruction_error(W, W_new, X.T @ X) == pytest.approx(direct, rel=1e-6)


def _naive_sparsegpt(W, H, sparsity, nm, group, dampening):
    """OBS with explicit inverses, one column at a time; the mask is picked at each group start."""
    W = W.double().clone()
    H = H.double().clone()
    H += dampening * H.diag().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    keep = torch.ones_like(W, dtype=torch.bool)
    cols = W.shape[1]
    for j in range(cols):
        if j % group == 0:
            tmp, d = Hinv.clone(), []
            for k in range(j, min(j + group, cols)):  # diag of the Cholesky factor, squared
                d.append(tmp[k, k])
                tmp = tmp - torch.outer(tmp[:, k], tmp[k, :]) / tmp[k, k]
            saliency = W[:, j : j + group].pow(2) / torch.stack(d)
            if nm is None:
                keep[:, j : j + group] = unstructured_mask(saliency, sparsity, "tensor")
            else:
                keep[:, j : j + group] = nm_mask(saliency, *nm)
        w = W[:, j].clone()
        q = torch.where(keep[:, j], w, torch.zeros_like(w))
        W[:, j:] -= torch.outer((w - q) / Hinv[j, j], Hinv[j, j:])
        W[:, j] = q
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return W.float(), keep


@pytest.mark.parametrize(
    ("sparsity", "nm", "blocksize"), [(0.5, None, 16), (0.6, None, 64), (0.5, (2, 4), 16), (0.5, (2, 4), 128)]
)
def test_sparsegpt_equals_naive_obs_reference(sparsity, nm, blocksize):
    W, X = _uneven_layer(6)
    H = X.T @ X / X.shape[0]
    got, keep = sparsegpt_prune(W, H, sparsity, nm, blocksize=blocksize, dampening=0.01)
    ref, ref_keep = _naive_sparsegpt(W, H, sparsity, nm, nm[1] if nm else blocksize, 0.01)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    assert torch.equal(got == 0, ~keep)


def test_sparsegpt_nm_result_does_not_depend_on_blocksize():
    W, X = _uneven_layer(7)
    H = X.T @ X
    a, _ = sparsegpt_prune(W, H, 0.5, (2, 4), blocksize=4)
    b, _ = sparsegpt_prune(W, H, 0.5, (2, 4), blocksize=64)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_error_ordering_sparsegpt_le_wanda_le_magnitude(seed, nm):
    W, X = _uneven_layer(seed)
    H = X.T @ X
    sq = X.pow(2).sum(0)
    mag = W * magnitude_mask(W, 0.5, nm)
    scores = wanda_scores(W, sq)
    wanda = W * (nm_mask(scores, *nm) if nm else unstructured_mask(scores, 0.5, "row"))
    sgpt, _ = sparsegpt_prune(W, H, 0.5, nm)
    e_mag, e_wanda, e_sgpt = (relative_reconstruction_error(W, w, H) for w in (mag, wanda, sgpt))
    assert e_sgpt <= e_wanda <= e_mag
    assert e_sgpt < 0.9 * e_mag  # and the gap is real, not a tie


def test_sparsegpt_handles_dead_inputs_and_reports_bad_hessian():
    W, X = _uneven_layer(8)
    X[:, 3] = 0.0  # a feature never active in calibration
    out, _ = sparsegpt_prune(W, X.T @ X, 0.5)
    assert torch.isfinite(out).all() and (out[:, 3] == 0).all()
    with pytest.raises(ValueError, match="dampening"):
        sparsegpt_prune(W, -torch.eye(64), 0.5, dampening=0.01)


def test_owl_sparsities_average_to_target_and_follow_outliers():
    ratios = [0.01, 0.05, 0.02, 0.08]
    s = owl_layer_sparsities(ratios, 0.7, 0.08)
    assert sum(s) / len(s) == pytest.approx(0.7)
    assert max(s) - min(s) == pytest.approx(0.16)
    order = sorted(range(4), key=lambda i: ratios[i])
    assert [s[i] for i in order] == sorted(s, reverse=True)  # more outliers -> less sparsity
    assert owl_layer_sparsities([0.1, 0.1], 0.5, 0.08) == [0.5, 0.5]


def test_outlier_ratio_matches_count():
    scores = [torch.tensor([[1.0, 1.0], [1.0, 20.0]]), torch.tensor([1.0, 1.0])]
    mean = 25.0 / 6
    expected = sum(v > 3 * mean for v in [1, 1, 1, 20, 1, 1]) / 6
    assert outlier_ratio(scores, 3.0) == pytest.approx(expected)


def test_dense_output_target_is_the_least_squares_fit_to_dense_outputs():
    W, X_dense = _uneven_layer(9)
    g = torch.Generator().manual_seed(10)
    X = X_dense + 0.3 * torch.randn(X_dense.shape, generator=g) * X_dense.std(0)  # drifted inputs
    H, C = X.T @ X, X_dense.T @ X
    target = dense_output_target(W, C, H, dampening=1e-8)
    direct = torch.linalg.lstsq(X.double(), (X_dense @ W.T).double()).solution.T.float()  # (out, in)
    torch.testing.assert_close(target, direct, rtol=1e-3, atol=1e-3)
    # Without drift the target is the weight itself, whatever the dampening.
    torch.testing.assert_close(dense_output_target(W, X.T @ X, X.T @ X, 0.1), W, rtol=1e-4, atol=1e-4)


def test_dense_targets_on_inputs_that_have_not_drifted_prune_as_plain_sparsegpt():
    """The first pruned layer sees the dense model's own inputs (cross term = Hessian): the dense-target solve
    must be skipped exactly, as both are rounded alike, so the result is plain SparseGPT's to the bit."""
    from types import SimpleNamespace

    from sparsify.passes.prune_methods import PRUNE_METHODS
    from sparsify.statistics import InputStats

    g = torch.Generator().manual_seed(3)
    W = torch.randn(24, 48, generator=g)
    plain = InputStats.empty(48, {"hessian"}, torch.device("cpu"))
    dense = InputStats.empty(48, {"hessian"}, torch.device("cpu"), cross=True)
    for _ in range(7):  # several batches: float64 sums whose float32 rounding differs from dividing first
        x = torch.randn(37, 48, generator=g) * torch.rand(48, generator=g) * 10
        plain.add(x)
        dense.add(x, x)
    opts = SimpleNamespace(blocksize=16, dampening=0.01)
    prune = PRUNE_METHODS["sparsegpt"].prune
    assert torch.equal(prune(W.clone(), dense, 0.5, None, opts), prune(W.clone(), plain, 0.5, None, opts))
