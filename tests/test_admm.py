"""ADMM solver: parity with the literal official code, the exact fixed-mask optimum, exact counts and
N:M structure, per-layer vs per-row groups, and the errors."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from llmprune.errors import LlmpruneError
from llmprune.math.masks import nm_mask, prune_count, unstructured_mask
from llmprune.math.solvers.admm import admm_prune, admm_update

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from official_admm import official_admm, official_admm_fixed_mask, xx_from_inputs  # noqa: E402


def correlated_inputs(tokens: int, dim: int, seed: int) -> torch.Tensor:
    """(tokens, dim) activations with correlated channels and uneven scales, like an LLM's."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen) / math.sqrt(dim) + torch.eye(dim)
    scale = torch.exp(torch.randn(dim, generator=gen))
    return (torch.randn(tokens, dim, generator=gen) @ mix) * scale


def problem(seed: int, out_f: int = 64, in_f: int = 128, tokens: int = 512):
    X = correlated_inputs(tokens, in_f, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    # uneven row scales, so per-layer and per-row ranking pick different masks
    W = torch.randn(out_f, in_f, generator=gen) * torch.exp(torch.randn(out_f, 1, generator=gen))
    return W, X, 2 * X.T @ X / tokens


def layer_loss(w: torch.Tensor, w0: torch.Tensor, H: torch.Tensor) -> float:
    d = (w - w0).double()
    return float(((d @ H.double()) * d).sum()) / 2


def exact_fixed_mask(H: torch.Tensor, W: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, argmin_w (w - w0) H (w - w0)^T with w = 0 on the mask, solved directly in float64:
    w_S = w0_S + H_SS^-1 H_SP w0_P."""
    out = torch.zeros_like(W, dtype=torch.float64)
    Hd, Wd = H.double(), W.double()
    for r in range(W.shape[0]):
        S, P = ~mask[r], mask[r]
        out[r, S] = Wd[r, S] + torch.linalg.solve(Hd[S][:, S], Hd[S][:, P] @ Wd[r, P])
    return out.float()


def exact_by_lstsq(X: torch.Tensor, W: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, argmin ||X w_S - X w0|| over the kept columns S (torch.linalg.lstsq, float64)."""
    out = torch.zeros_like(W, dtype=torch.float64)
    Xd = X.double()
    for r in range(W.shape[0]):
        S = ~mask[r]
        out[r, S] = torch.linalg.lstsq(Xd[:, S], Xd @ W[r].double()).solution
    return out.float()


# (a) the literal official procedure -------------------------------------------------------------

@pytest.mark.parametrize("official_kw,our_kw", [
    (dict(sparsity=0.5), dict(sparsity=0.5)),
    (dict(sparsity=0.7), dict(sparsity=0.7)),
    (dict(sparsity=0.6, per_out=True), dict(sparsity=0.6, group="row")),
    (dict(sparsity=0.5, prune_n=2, prune_m=4), dict(sparsity=0.5, n=2, m=4)),
    (dict(sparsity=0.5, iterative_prune=0), dict(sparsity=0.5, prune_iterations=0)),
])
def test_matches_official_gradual(official_kw, our_kw):
    W, X, H = problem(0)
    w_ref, m_ref = official_admm(W, xx_from_inputs(X), **official_kw)
    w, mask, info = admm_prune(W, H, **our_kw)
    assert (mask == m_ref).float().mean() >= 0.999
    assert torch.allclose(w, w_ref, rtol=1e-3, atol=1e-4 * w_ref.abs().max())
    assert info["iterations"] == 20 and math.isfinite(info["loss"])


def test_cubic_unstructured_is_not_the_official_default():
    """The official per-layer branch prunes at the target from the first iteration; the paper's
    cubic schedule gives a different mask (so the parity test above can tell them apart)."""
    W, X, H = problem(0)
    _, m_ref = official_admm(W, xx_from_inputs(X), 0.5)
    _, mask, _ = admm_prune(W, H, 0.5, cubic_unstructured=True)
    assert (mask == m_ref).float().mean() < 0.995
    assert int(mask.sum()) == prune_count(0.5, mask.numel())


def test_fixed_mask_matches_official():
    W, X, H = problem(1)
    mask = unstructured_mask(W.abs() * X.norm(dim=0), 0.5, "row")  # Wanda's mask
    w_ref = official_admm_fixed_mask(W, xx_from_inputs(X), mask)
    w, info = admm_update(W, H, mask)
    assert torch.allclose(w, w_ref, rtol=1e-3, atol=1e-4 * w_ref.abs().max())
    assert (w[mask] == 0).all() and info["prune_iterations"] == 0


# (b) the exact least-squares solution for a fixed mask -------------------------------------------

def test_fixed_mask_converges_to_least_squares():
    W, X, H = problem(2, out_f=16, in_f=64, tokens=256)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    exact = exact_by_lstsq(X, W, mask)
    assert torch.allclose(exact, exact_fixed_mask(H, W, mask), rtol=1e-3, atol=1e-4)
    w, _ = admm_update(W, H, mask, iterations=300, percdamp=0.0)
    assert ((w - exact).norm() / exact.norm()) < 1e-4
    # the defaults (20 iterations, percdamp 0.1, whose damping alone costs ~1-3% here) get within
    # 5% of the optimal error, far below mere masking
    w20, info = admm_update(W, H, mask)
    best, masked = layer_loss(exact, W, H), layer_loss(W.masked_fill(mask, 0), W, H)
    assert best <= info["loss"] < 1.05 * best < 0.7 * masked
    assert info["loss"] == pytest.approx(layer_loss(w20, W, H), rel=1e-4)


def test_damping_is_proportional_to_each_diagonal():
    """After normalisation, percdamp damps every input by percdamp * H_jj (not the mean of diag H):
    the fixed point is the exact solution for H + percdamp * diag(H)."""
    W, X, H = problem(4, out_f=16, in_f=64, tokens=256)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(5)) < 0.6
    target = exact_fixed_mask(H + 0.1 * torch.diag(torch.diagonal(H)), W, mask)
    w, _ = admm_update(W, H, mask, iterations=300, percdamp=0.1)
    assert ((w - target).norm() / target.norm()) < 1e-4
    mean_damped = exact_fixed_mask(H + 0.1 * torch.diagonal(H).mean() * torch.eye(64), W, mask)
    assert ((w - mean_damped).norm() / mean_damped.norm()) > 1e-3


# (c) exact counts, groups, N:M ------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.71])
def test_exact_counts_per_layer_and_row(sparsity):
    W, _, H = problem(6, out_f=24, in_f=64)
    new, mask, info = admm_prune(W, H, sparsity)
    assert int(mask.sum()) == prune_count(sparsity, mask.numel())
    assert len(set(mask.sum(dim=1).tolist())) > 1  # compared over the layer, not per row
    assert (new[mask] == 0).all() and (new[~mask] != 0).all()
    new, mask, _ = admm_prune(W, H, sparsity, group="row")
    assert (mask.sum(dim=1) == prune_count(sparsity, 64)).all()
    assert (new[mask] == 0).all()


def test_dense_start_mask_is_wanda_per_layer():
    """With prune_iterations=0 the mask is |W| * ||x_j|| over the whole layer (official
    iterative_prune=0), chosen once; then the fixed-mask update."""
    W, X, H = problem(7, out_f=24, in_f=64)
    new, mask, _ = admm_prune(W, H, 0.5, prune_iterations=0)
    assert torch.equal(mask, unstructured_mask(W.abs() * X.norm(dim=0), 0.5, "layer"))
    assert torch.allclose(new, admm_update(W, H, mask)[0])


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4), (4, 8), (2, 8)])
def test_nm_structure(n, m):
    W, _, H = problem(n + m, out_f=12, in_f=64)
    new, mask, info = admm_prune(W, H, 0.0, n, m)
    assert ((~mask).reshape(12, -1, m).sum(-1) == n).all()
    assert (new[mask] == 0).all() and (new[~mask] != 0).all()
    assert info["sparsity"] == pytest.approx(1 - n / m)


def test_zero_sparsity_returns_dense():
    W, _, H = problem(8, out_f=8, in_f=32)
    new, mask, info = admm_prune(W, H, 0.0)
    assert torch.equal(new, W) and not mask.any() and info["loss"] == 0.0


# (d) errors -------------------------------------------------------------------------------------

def test_divergence_raises_one_line():
    W, _, H = problem(9, out_f=8, in_f=32)
    H = H * 1e4  # sqrt(diag H) ~ 100: weights of 1e37 overflow float32 once normalised
    with pytest.raises(LlmpruneError, match=r"ADMM diverged \(non-finite weights after 20 iterations\)"):
        admm_update(W * 1e37, H, torch.zeros_like(W, dtype=torch.bool))
    with pytest.raises(LlmpruneError, match="ADMM diverged"):
        admm_prune(W.masked_fill(torch.eye(8, 32, dtype=torch.bool), float("nan")), H, 0.5)


def test_bad_inputs_raise():
    W, _, H = problem(10, out_f=8, in_f=32)
    with pytest.raises(LlmpruneError, match="Hessian has NaN/Inf"):
        admm_update(W, H.masked_fill(torch.eye(32, dtype=torch.bool), float("inf")),
                    torch.zeros_like(W, dtype=torch.bool))
    with pytest.raises(LlmpruneError, match="prune_iterations 15"):
        admm_prune(W, H, 0.5, iterations=10)
    with pytest.raises(LlmpruneError, match="not a multiple of M=3"):
        admm_prune(W, H, 0.5, 1, 3)
    with pytest.raises(LlmpruneError, match="N:M pattern 4:4"):
        admm_prune(W, H, 0.5, 4, 4)
    with pytest.raises(LlmpruneError, match="per 'layer' or per 'row'"):
        admm_prune(W, H, 0.5, group="column")


@pytest.mark.parametrize("n,m", [(None, None), (1, 4), (2, 4), (3, 4)])
def test_ties_follow_the_mask_helpers(n, m):
    """Tied scores (integer weights, equal input norms): the lower index is pruned first, as
    masks.nm_mask / unstructured_mask do, in the once-chosen mask."""
    W = torch.randint(-3, 4, (16, 32), generator=torch.Generator().manual_seed(11)).float()
    H = 2 * torch.eye(32)
    _, mask, _ = admm_prune(W, H, 0.5, n, m, prune_iterations=0)
    expected = unstructured_mask(W.abs(), 0.5, "layer") if m is None else nm_mask(W.abs(), n, m)
    assert torch.equal(mask, expected)
