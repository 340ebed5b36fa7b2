"""SparseGPT solver: exact counts, N:M validity, the diagonal-Hessian limit, reconstruction error."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from llmprune.errors import LlmpruneError
from llmprune.solvers.sparsegpt import sparsegpt_prune


def correlated_inputs(tokens: int, dim: int, seed: int) -> torch.Tensor:
    """(tokens, dim) activations with correlated channels and uneven scales, like an LLM's."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen) / math.sqrt(dim) + torch.eye(dim)
    scale = torch.exp(torch.randn(dim, generator=gen))
    return (torch.randn(tokens, dim, generator=gen) @ mix) * scale


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.71])
def test_exact_sparsity_per_block(sparsity):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(12, 300, generator=gen)  # blocks of 128, 128, 44 columns
    new, mask, info = sparsegpt_prune(w, hessian_of(correlated_inputs(600, 300, 1)), sparsity)
    for i1 in range(0, 300, 128):
        block = mask[:, i1:i1 + 128]
        assert int(block.sum()) == math.floor(Fraction(repr(sparsity)) * block.numel())
    assert (new[mask] == 0).all()
    assert (new[~mask] != 0).all()
    assert new.dtype == torch.float32 and info["retries"] == 0 and info["loss"] > 0


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4), (4, 8), (2, 8)])
def test_nm_validity(n, m):
    gen = torch.Generator().manual_seed(n + m)
    w = torch.randn(10, 64, generator=gen)
    new, mask, _ = sparsegpt_prune(w, hessian_of(correlated_inputs(256, 64, 2)), 1 - n / m, n, m,
                                   blocksize=32)
    assert ((~mask).reshape(10, -1, m).sum(-1) == n).all()
    assert (new[mask] == 0).all() and (new[~mask] != 0).all()


def test_nm_rejects_misaligned_shapes():
    h = torch.eye(30)
    with pytest.raises(LlmpruneError, match="in_features 30 is not a multiple of M=4"):
        sparsegpt_prune(torch.randn(3, 30), h, 0.5, 2, 4)
    with pytest.raises(LlmpruneError, match="blocksize 6"):
        sparsegpt_prune(torch.randn(3, 32), torch.eye(32), 0.5, 2, 4, blocksize=6)


# With H = c*I, chol(H^-1) = I/sqrt(c) is diagonal: the OBS update W[:, i:] -= err_i U[i, i:] only
# touches column i itself (which is then replaced by q_i) and the lazy update Err1 @ U[i1:i2, i2:]
# is zero. The saliency w^2 / d^2 has one d for all columns, so the result is plain magnitude
# pruning of each column block with unchanged kept weights.

def test_identity_hessian_is_blockwise_magnitude():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(6, 40, generator=gen)
    new, mask, _ = sparsegpt_prune(w, torch.eye(40), 0.5, blocksize=16)
    expect = torch.zeros_like(mask)
    for i1 in range(0, 40, 16):
        cols = range(i1, min(i1 + 16, 40))
        cells = sorted((abs(w[r, c].item()), r, c) for r in range(6) for c in cols)
        for _, r, c in cells[: math.floor(0.5 * 6 * len(cols))]:
            expect[r, c] = True
    assert torch.equal(mask, expect)
    assert torch.allclose(new, w.masked_fill(expect, 0), atol=1e-6, rtol=0)


def test_identity_hessian_nm_is_groupwise_magnitude():
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(5, 16, generator=gen)
    new, mask, _ = sparsegpt_prune(w, 3 * torch.eye(16), 0.75, 1, 4)
    for r in range(5):
        for g in range(0, 16, 4):
            biggest = max(range(g, g + 4), key=lambda c: abs(w[r, c].item()))
            assert [not mask[r, c] for c in range(g, g + 4)] == [c == biggest for c in range(g, g + 4)]
    assert torch.allclose(new, w.masked_fill(mask, 0), atol=1e-6, rtol=0)


def recon_error(w, w_hat, x):
    return ((x @ w.T - x @ w_hat.T) ** 2).sum().item()


def lowest_mask(s: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """The k lowest of every ``group`` consecutive scores (row-major), written out with argsort."""
    chunks = s.reshape(-1, group)
    mask = torch.zeros_like(chunks, dtype=torch.bool).scatter_(1, chunks.argsort(1)[:, :k], True)
    return mask.reshape(s.shape)


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_reconstruction_beats_magnitude_and_wanda(pattern):
    x = correlated_inputs(512, 64, 7)  # (tokens, in)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(8))  # (out, in)
    n, m = pattern or (None, None)
    new, _, _ = sparsegpt_prune(w, hessian_of(x), 0.5, n, m)

    mag_s = w.abs()
    wanda_s = w.abs() * x.pow(2).mean(0).sqrt()  # |W| * ||X_j||
    if pattern:
        mag_mask, wanda_mask = lowest_mask(mag_s, 2, 4), lowest_mask(wanda_s, 2, 4)
    else:  # magnitude: one threshold per matrix; wanda: per output row
        mag_mask = lowest_mask(mag_s.flatten(), 32 * 32, 32 * 64).view(32, 64)
        wanda_mask = lowest_mask(wanda_s, 32, 64)
    e_sgpt = recon_error(w, new, x)
    e_mag = recon_error(w, w.masked_fill(mag_mask, 0), x)
    e_wanda = recon_error(w, w.masked_fill(wanda_mask, 0), x)
    assert e_sgpt < 0.9 * e_wanda
    assert e_wanda < e_mag


def naive_sparsegpt(w, h, sparsity, n, m, blocksize, percdamp=0.01):
    """The algorithm written plainly in float64: every OBS update applied at once to all later
    columns (no lazy batching), masks chosen from the weights as updated so far."""
    w, h = w.double().clone(), h.double().clone()
    h += percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    d = u.diagonal()
    mask = torch.zeros(w.shape, dtype=torch.bool)
    for i in range(w.shape[1]):
        if m is None and i % blocksize == 0:
            cols = slice(i, i + blocksize)
            sal = (w[:, cols] ** 2 / d[cols] ** 2).flatten()
            k = math.floor(Fraction(repr(sparsity)) * sal.numel())
            block = torch.zeros(sal.numel(), dtype=torch.bool)
            block[sal.argsort()[:k]] = True
            mask[:, cols] = block.view(w.shape[0], -1)
        if m is not None and i % m == 0:
            sal = w[:, i:i + m] ** 2 / d[i:i + m] ** 2
            mask[:, i:i + m].scatter_(1, sal.argsort(1)[:, : m - n], True)
        q = torch.where(mask[:, i], torch.zeros_like(w[:, i]), w[:, i])
        err = (w[:, i] - q) / d[i]
        w[:, i:] -= err[:, None] * u[i, i:][None, :]
        w[:, i] = q
    return w, mask


@pytest.mark.parametrize("pattern", [None, (2, 4), (1, 4)])
def test_matches_naive_unbatched_obs(pattern):
    x = correlated_inputs(300, 48, 15)
    w = torch.randn(6, 48, generator=torch.Generator().manual_seed(16))
    n, m = pattern or (None, None)
    expect_w, expect_mask = naive_sparsegpt(w, hessian_of(x), 0.5, n, m, blocksize=16)
    new, mask, _ = sparsegpt_prune(w, hessian_of(x), 0.5, n, m, blocksize=16)
    assert torch.equal(mask, expect_mask)
    assert torch.allclose(new.double(), expect_w, atol=1e-3, rtol=1e-3)


def test_loss_is_half_the_quadratic_error_under_the_damped_hessian():
    # Sequential OBS is exact: sum_i (w_i - q_i)^2 / d_i^2 = tr(dW H dW^T) for the damped H.
    x = correlated_inputs(256, 48, 9)
    h = hessian_of(x).double()
    w = torch.randn(8, 48, generator=torch.Generator().manual_seed(10))
    new, _, info = sparsegpt_prune(w, h.float(), 0.5, blocksize=16)
    h_damped = h + 0.01 * h.diagonal().mean() * torch.eye(48, dtype=torch.float64)
    dw = (w - new).double()
    assert info["loss"] == pytest.approx(0.5 * torch.trace(dw @ h_damped @ dw.T).item(), rel=1e-3)


def test_dead_inputs_are_zeroed_and_masked():
    x = correlated_inputs(200, 16, 12)
    x[:, 3] = 0
    w = torch.randn(4, 16)
    new, mask, info = sparsegpt_prune(w, hessian_of(x), 0.25)
    assert info["dead"] == 1
    assert mask[:, 3].all() and (new[:, 3] == 0).all()


def test_zero_sparsity_changes_nothing():
    w = torch.randn(4, 16)
    new, mask, _ = sparsegpt_prune(w, hessian_of(correlated_inputs(64, 16, 13)), 0.0)
    assert torch.equal(new, w) and not mask.any()


def test_cholesky_failure_retries_with_more_damping():
    # Rank-4 PSD Hessian shifted down by 0.5% of its mean diagonal: damping 0.1% of the mean
    # diagonal leaves it indefinite, the retry with 1% makes it positive definite.
    a = hessian_of(correlated_inputs(4, 16, 14)).double()
    h = a - 0.005 * a.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    w = torch.randn(4, 16)
    new, mask, info = sparsegpt_prune(w, h.float(), 0.5, percdamp=0.001)
    assert info["retries"] == 1
    assert info["percdamp_used"] == pytest.approx(0.01)
    assert int(mask.sum()) == 32 and torch.isfinite(new).all()


@pytest.mark.parametrize("bad", ["negative", "nan"])
def test_cholesky_failure_raises_llmprune_error(bad):
    h = -torch.eye(8) if bad == "negative" else torch.full((8, 8), float("nan"))
    with pytest.raises(LlmpruneError, match="Hessian"):
        sparsegpt_prune(torch.randn(2, 8), h, 0.5)
