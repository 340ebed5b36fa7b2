"""ALPS solver: parity with a literal re-implementation of the official code, the diagonal-Hessian
closed form, the per-mask least-squares optimum, exact counts, N:M structure, errors."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from llmprune.errors import LlmpruneError
from llmprune.math.masks import prune_count
from llmprune.math.solvers.alps import alps_prune

_spec = importlib.util.spec_from_file_location(
    "official_alps", Path(__file__).resolve().parents[1] / "benchmarks" / "official_alps.py")
official = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(official)


def correlated_inputs(tokens: int, dim: int, seed: int) -> torch.Tensor:
    """(tokens, dim) activations with correlated channels and uneven scales, like an LLM's."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen) / math.sqrt(dim) + torch.eye(dim)
    scale = torch.exp(torch.randn(dim, generator=gen))
    return (torch.randn(tokens, dim, generator=gen) @ mix) * scale


def problem(rows: int = 32, cols: int = 64, tokens: int = 300, seed: int = 0):
    x = correlated_inputs(tokens, cols, seed + 1)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return w, x, 2 * x.T @ x / tokens


def damped_loss(w: torch.Tensor, w0: torch.Tensor, h: torch.Tensor) -> float:
    hd = h + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0])
    e = (w - w0).double()
    return float(((e @ hd.double()) * e).sum())


@pytest.mark.parametrize("sparsity,n,m", [(0.5, None, None), (0.8, None, None), (0.0, 2, 4), (0.0, 1, 4)])
def test_matches_literal_official(sparsity, n, m):
    w, x, h = problem(seed=3)
    ours, mask, info = alps_prune(w, h, sparsity, n, m)
    # the official takes raw inputs (XtX = X^T X, not averaged): our H differs by a scale it ignores
    ref, ref_mask = official.official_alps(w, sparsity, n or 0, m or 0, X=x)
    assert (mask == ref_mask).float().mean().item() >= 0.999
    assert torch.allclose(ours, ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item())
    assert 3 <= info["iterations"] <= 300 and info["cg_iterations"] == 10


def test_official_xtx_conversion_is_the_same_problem():
    w, x, h = problem(seed=4)
    via_x = official.official_alps(w, 0.6, X=x)[1]
    via_h = official.official_alps(w, 0.6, XtX=official.xtx_from_llmprune(h, x.shape[0]))[1]
    assert (via_x == via_h).float().mean().item() >= 0.999
    scaled = alps_prune(w, 1000.0 * h, 0.6)[1]
    assert (scaled == alps_prune(w, h, 0.6)[1]).float().mean().item() >= 0.999


def test_diagonal_hessian_is_per_layer_scaled_magnitude():
    # A = I after normalisation: ADMM keeps P(B0), CG changes nothing -> closed form, compared over the
    # whole layer (rows scaled 1..8 so a per-row ranking would give another mask)
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(8, 40, generator=gen) * torch.arange(1, 9).float().unsqueeze(1)
    d = torch.rand(40, generator=gen) + 0.5
    new, mask, info = alps_prune(w, torch.diag(d), 0.5)
    score = (w * torch.sqrt(d * 1.0 + 0.01 * d.mean())).abs().reshape(-1)
    expect = torch.zeros(w.numel(), dtype=torch.bool)
    expect[torch.argsort(score)[:prune_count(0.5, w.numel())]] = True
    assert torch.equal(mask, expect.view_as(w))
    assert len(set(mask.sum(dim=1).tolist())) > 1  # per layer, not per row
    assert torch.allclose(new[~mask], w[~mask], rtol=1e-5)
    assert info["error"] == pytest.approx(info["admm_error"], rel=1e-6)


@pytest.mark.parametrize("sparsity,n,m", [(0.6, None, None), (0.0, 2, 4)])
def test_near_least_squares_optimum_for_its_mask(sparsity, n, m):
    # independent: per row, min ||L^T (w - w0)|| over the kept columns (H_d = L L^T) by lstsq
    w, x, h = problem(seed=6)
    new, mask, info = alps_prune(w, h, sparsity, n, m)
    hd = (h + 0.01 * h.diagonal().mean() * torch.eye(64)).double()
    lt = torch.linalg.cholesky(hd).T  # (in, in): ||lt v||^2 = v^T H_d v
    best = torch.zeros_like(w, dtype=torch.float64)
    for r in range(w.shape[0]):
        keep = ~mask[r]
        target = lt @ w[r].double()
        best[r, keep] = torch.linalg.lstsq(lt[:, keep], target.unsqueeze(1)).solution.squeeze(1)
    opt, got = damped_loss(best, w, h), damped_loss(new, w, h)
    assert opt <= got <= 1.02 * opt
    magnitude = w.masked_fill(mask, 0.0)  # the same mask without any update is far worse
    assert damped_loss(magnitude, w, h) > 1.5 * got


def test_exact_counts_and_nm_structure():
    w, _, h = problem(rows=16, cols=48, seed=7)
    for sparsity in (0.3, 0.71):
        new, mask, _ = alps_prune(w, h, sparsity)
        assert int(mask.sum()) == prune_count(sparsity, w.numel())
        assert (new[mask] == 0).all() and (new[~mask] != 0).all()
    for n, m in ((2, 4), (1, 4), (4, 8)):
        new, mask, _ = alps_prune(w, h, 0.0, n, m)
        groups = mask.reshape(16, 48 // m, m)
        assert (groups.sum(dim=-1) == m - n).all()  # n KEPT of every m
        assert (new[mask] == 0).all() and (new[~mask] != 0).all()


def test_zero_sparsity_returns_the_weight():
    w, _, h = problem(seed=8)
    new, mask, info = alps_prune(w, h, 0.0)
    assert torch.equal(new, w) and not mask.any() and info["iterations"] == 0


def test_errors():
    w, _, h = problem(seed=9)
    bad = w.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(LlmpruneError, match="diverged"):
        alps_prune(bad, h, 0.5)
    hinf = h.clone()
    hinf[0, 0] = float("inf")
    with pytest.raises(LlmpruneError, match="NaN/Inf"):
        alps_prune(w, hinf, 0.5)
    with pytest.raises(LlmpruneError, match="1 <= N < M"):
        alps_prune(w, h, 0.0, 4, 4)
    with pytest.raises(LlmpruneError, match="multiple of M"):
        alps_prune(w[:, :62], h[:62, :62], 0.0, 2, 8)
