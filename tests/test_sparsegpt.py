"""SparseGPT solver: exact counts, N:M validity, the diagonal-Hessian limit, reconstruction error."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from llmprune.errors import LlmpruneError
from llmprune.math.masks import prune_count
from llmprune.math.solvers import sparsegpt as sparsegpt_module
from llmprune.math.solvers.sparsegpt import sparsegpt_prune


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


# ---- the solver before issue 11, kept verbatim as the reference for bit-identity -----------------
# (llmprune/solvers/sparsegpt.py as it was: one Python step per column with boolean indexing and
# fresh tensors; the fast sweep must reproduce its masks, weights and loss bit for bit. Not the
# official code's masks: benchmarks/reference_protocol.py's ref_sparsegpt prunes ``<= threshold``
# and counts zeros for N:M.)

REF_MAX_RETRIES = 3


def _ref_inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Upper Cholesky factor of (h + damp*I)^-1, or None if a factorisation fails."""
    h = h.clone()
    h.diagonal().add_(damp)
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0 or not torch.isfinite(lower).all():
        return None
    hinv = torch.cholesky_inverse(lower)  # (in, in) = H^-1
    upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if info.item() != 0 or not torch.isfinite(upper).all():
        return None
    return upper


def _ref_damped_inverse(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float, int]:
    """chol(H^-1) (upper) with ``percdamp * mean(diag H)`` damping, raised x10 on failure."""
    mean_diag = torch.diagonal(H).mean().item()
    damp_frac, Hinv = percdamp, None
    for retries in range(REF_MAX_RETRIES + 1):
        Hinv = _ref_inverse_cholesky(H, damp_frac * mean_diag)  # (in, in) upper
        if Hinv is not None:
            return Hinv, damp_frac, retries
        if retries < REF_MAX_RETRIES:
            damp_frac = damp_frac * 10 if damp_frac > 0 else 0.01
    raise LlmpruneError(
        f"SparseGPT Cholesky failed even with percdamp {damp_frac:g}: the Hessian is not positive "
        "definite; use more calibration samples or a larger percdamp"
    )


def reference_sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                              n: int | None = None, m: int | None = None, percdamp: float = 0.01,
                              blocksize: int = 128, fixed_mask: torch.Tensor | None = None,
                              ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The solver as it was before the speed work, kept verbatim below its signature as the oracle:
    the current one must give the same masks, weights and info, bit for bit."""
    if fixed_mask is not None:
        m = n = None
    # (input checks left out: the comparisons below only pass valid inputs)
    rows, cols = weight.shape
    structured = m is not None

    device = weight.device
    W = weight.detach().to(torch.float32).clone()  # (out, in)
    H = hessian.detach().to(device=device, dtype=torch.float32).clone()  # (in, in)
    if not torch.isfinite(H).all():
        raise LlmpruneError("SparseGPT Hessian has NaN/Inf entries: the calibration activations "
                            "overflowed; calibrate in float32 or with fewer/shorter samples")

    dead = torch.diagonal(H) == 0  # (in,) inputs that were always zero
    if fixed_mask is None and not structured and sparsity <= 0:
        return W, torch.zeros(rows, cols, dtype=torch.bool, device=device), {
            "loss": 0.0, "percdamp_used": percdamp, "retries": 0, "dead": int(dead.sum().item())}
    H[dead, dead] = 1
    W[:, dead] = 0

    Hinv, damp_frac, retries = _ref_damped_inverse(H, percdamp)

    mask = torch.zeros(rows, cols, dtype=torch.bool, device=device)  # (out, in)
    losses = torch.zeros(rows, device=device)  # (out,)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()  # (out, count)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]  # (count, count)
        d_block = torch.diagonal(Hinv1)  # (count,)

        if fixed_mask is not None:
            mask1 = fixed_mask[:, i1:i2].to(device=device, dtype=torch.bool)
        elif structured:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            saliency = W1 ** 2 / d_block.unsqueeze(0) ** 2  # (out, count)
            k = prune_count(sparsity, saliency.numel())
            mask1 = torch.zeros(saliency.numel(), dtype=torch.bool, device=device)
            if k > 0:
                mask1[torch.sort(saliency.reshape(-1), stable=True).indices[:k]] = True
            mask1 = mask1.view_as(W1)

        for i in range(count):
            w = W1[:, i]  # (out,)
            d = Hinv1[i, i]
            if structured and i % m == 0:
                # Chosen from the weights as updated so far, so earlier pruning is compensated.
                saliency = W1[:, i:i + m] ** 2 / d_block[i:i + m].unsqueeze(0) ** 2  # (out, m)
                order = torch.sort(saliency, dim=1, stable=True).indices[:, : m - n]
                mask1[:, i:i + m].scatter_(1, order, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d ** 2
            err = (w - q) / d  # (out,)
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err

        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        losses += Losses1.sum(dim=1) / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if fixed_mask is None:
        mask |= dead.unsqueeze(0)
    elif bool(dead.any()):
        W[:, dead] = weight.detach().float()[:, dead].masked_fill(mask[:, dead], 0.0)
    info = {"loss": float(losses.sum().item()), "percdamp_used": damp_frac, "retries": retries,
            "dead": int(dead.sum().item())}
    if not math.isfinite(info["loss"]):
        raise LlmpruneError("SparseGPT produced non-finite weights: the Hessian is ill-conditioned; "
                            "use a larger percdamp or more calibration samples")
    return W, mask, info


def random_layer(rows: int, cols: int, seed: int, dead: tuple[int, ...] = (), ties: bool = False):
    """(weight (rows, cols), Hessian (cols, cols)) of a tiny layer; ``dead`` input channels are
    never active; ``ties``: small-integer weights and a diagonal Hessian, so saliencies tie."""
    gen = torch.Generator().manual_seed(seed)
    if ties:
        w = torch.randint(-3, 4, (rows, cols), generator=gen).float()
        h = 2 * torch.eye(cols)
    else:
        w = torch.randn(rows, cols, generator=gen)
        x = correlated_inputs(4 * cols, cols, seed + 1)
        x[:, list(dead)] = 0
        h = hessian_of(x)
    if ties:
        h[list(dead), :] = 0
        h[:, list(dead)] = 0
    return w, h


def assert_bit_identical(got, expect):
    (w1, m1, i1), (w2, m2, i2) = got, expect
    assert torch.equal(m1, m2)
    assert w1.dtype == w2.dtype == torch.float32
    assert torch.equal(w1.view(torch.int32), w2.view(torch.int32))  # bits, so -0.0 != +0.0 too
    assert i1 == i2  # loss, damping, retries, dead


SWEEPS = {  # name: (rows, cols, sparsity, n, m, blocksize, dead, ties)
    "unstructured": (24, 96, 0.5, None, None, 32, (), False),
    "unstructured-70": (24, 96, 0.71, None, None, 32, (), False),
    "unstructured-ragged-block": (17, 100, 0.5, None, None, 48, (), False),  # 48, 48, 4
    "unstructured-dead": (12, 64, 0.5, None, None, 16, (3, 17, 40), False),
    "unstructured-ties": (16, 72, 0.5, None, None, 32, (5,), True),
    "2:4": (24, 96, 0.5, 2, 4, 32, (), False),
    "1:4": (24, 96, 0.75, 1, 4, 32, (), False),
    "4:8": (10, 64, 0.5, 4, 8, 16, (), False),
    "2:4-ragged-block": (9, 104, 0.5, 2, 4, 48, (), False),  # 48, 48, 8
    "2:4-dead": (12, 64, 0.5, 2, 4, 16, (0, 33), False),
    "1:4-ties": (16, 64, 0.75, 1, 4, 32, (), True),
}


@pytest.mark.parametrize("by_sort", [False, True], ids=["select", "sort"])
@pytest.mark.parametrize("case", sorted(SWEEPS))
def test_fast_sweep_is_bit_identical_to_the_plain_loop(case, by_sort, monkeypatch):
    rows, cols, sparsity, n, m, blocksize, dead, ties = SWEEPS[case]
    # both ways of choosing masks (CPU: selection and ranking; GPU: sorts) run here on the CPU
    monkeypatch.setattr(sparsegpt_module, "_masks_by_sort", lambda device: by_sort)
    w, h = random_layer(rows, cols, seed=len(case) + rows, dead=dead, ties=ties)
    expect = reference_sparsegpt_prune(w, h, sparsity, n, m, blocksize=blocksize)
    got = sparsegpt_prune(w, h, sparsity, n, m, blocksize=blocksize)
    assert_bit_identical(got, expect)
    if dead:
        assert got[2]["dead"] == len(dead)


@pytest.mark.parametrize("dead", [(), (2, 9)])
def test_fast_fixed_mask_sweep_is_bit_identical(dead):
    w, h = random_layer(14, 80, seed=21, dead=dead)
    mask = torch.rand(14, 80, generator=torch.Generator().manual_seed(22)) < 0.6
    expect = reference_sparsegpt_prune(w, h, 0.0, blocksize=32, fixed_mask=mask)
    assert_bit_identical(sparsegpt_prune(w, h, 0.0, blocksize=32, fixed_mask=mask), expect)


def test_fast_sweep_matches_after_a_cholesky_retry():
    a = hessian_of(correlated_inputs(4, 16, 14)).double()
    h = (a - 0.005 * a.diagonal().mean() * torch.eye(16, dtype=torch.float64)).float()
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    expect = reference_sparsegpt_prune(w, h, 0.5, percdamp=0.001)
    got = sparsegpt_prune(w, h, 0.5, percdamp=0.001)
    assert got[2]["retries"] == 1
    assert_bit_identical(got, expect)


def test_mask_choices_equal_a_stable_sort_with_ties():
    gen = torch.Generator().manual_seed(30)
    sal = torch.randint(0, 4, (40, 24), generator=gen).float() ** 2 / 3  # (rows, count), many ties
    sal[3, 5] = float("inf")
    for k in (0, 1, 7, 480, 959, 960):
        expect = torch.zeros(960, dtype=torch.bool)
        expect[torch.sort(sal.reshape(-1), stable=True).indices[:k]] = True
        for by_sort in (False, True):
            assert torch.equal(sparsegpt_module._lowest_of_block(sal, k, by_sort), expect.view(40, 24))
    for m in (4, 8):
        group = torch.randint(0, 3, (m, 50), generator=gen).float() / 7  # (m, rows)
        for k in range(1, m):
            expect = torch.zeros(m, 50, dtype=torch.bool)
            expect.scatter_(0, torch.sort(group, dim=0, stable=True).indices[:k], True)
            for index in (None, torch.arange(m).unsqueeze(1)):
                out = torch.zeros(m, 50, dtype=torch.bool)
                sparsegpt_module._prune_group(group, k, out, index)
                assert torch.equal(out, expect)


def test_the_sweep_keeps_float32_and_leaves_its_inputs_alone():
    w, h = random_layer(8, 48, seed=40)
    w0, h0 = w.clone(), h.clone()
    new, mask, _ = sparsegpt_prune(w, h, 0.5, blocksize=16)
    assert torch.equal(w, w0) and torch.equal(h, h0)
    assert new.dtype == torch.float32 and mask.dtype == torch.bool
    half, _, _ = sparsegpt_prune(w.bfloat16(), h, 0.5, blocksize=16)
    ref, _, _ = reference_sparsegpt_prune(w.bfloat16(), h, 0.5, blocksize=16)
    assert torch.equal(half.view(torch.int32), ref.view(torch.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: the CUDA sweep (sorted masks, no syncs) "
                    "is checked against the plain loop on CUDA only where one is present")
@pytest.mark.parametrize("case", ["unstructured-ragged-block", "2:4", "1:4", "unstructured-dead", "2:4-dead"])
def test_fast_sweep_is_bit_identical_on_cuda(case):
    rows, cols, sparsity, n, m, blocksize, dead, ties = SWEEPS[case]
    w, h = (t.cuda() for t in random_layer(rows, cols, seed=len(case) + rows, dead=dead, ties=ties))
    expect = reference_sparsegpt_prune(w, h, sparsity, n, m, blocksize=blocksize)
    assert_bit_identical(sparsegpt_prune(w, h, sparsity, n, m, blocksize=blocksize), expect)
