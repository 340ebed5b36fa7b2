"""scores.py and masks.py against hand-worked tensors and brute force in plain Python."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch

from llmprune.errors import LlmpruneError
from llmprune.math.masks import alpha_variant_search, nm_mask, unstructured_mask
from llmprune.math.scores import score


def floor_count(sparsity: float, size: int) -> int:
    return math.floor(Fraction(repr(sparsity)) * size)


def lowest(items, k):
    """The k (value, key) pairs with the lowest value; ties: lower key first."""
    return {key for value, key in sorted(items)[:k]}


def brute_mask(s: torch.Tensor, sparsity: float, group: str) -> torch.Tensor:
    rows, cols = s.shape
    v = s.tolist()
    pruned = set()
    if group == "row":
        for r in range(rows):
            dropped = lowest([(v[r][c], c) for c in range(cols)], floor_count(sparsity, cols))
            pruned |= {(r, c) for c in dropped}
    elif group == "column":
        for c in range(cols):
            dropped = lowest([(v[r][c], r) for r in range(rows)], floor_count(sparsity, rows))
            pruned |= {(r, c) for r in dropped}
    else:
        items = [(v[r][c], r * cols + c) for r, c in itertools.product(range(rows), range(cols))]
        pruned = {divmod(i, cols) for i in lowest(items, floor_count(sparsity, rows * cols))}
    return torch.tensor([[(r, c) in pruned for c in range(cols)] for r in range(rows)])


# ---- scores -------------------------------------------------------------------------------------

def test_wanda_score_is_weight_times_norm_by_hand():
    # Two inputs seen over 4 tokens: x_0 = (1, 1, 1, 1)/2 -> ||x_0|| = 1; sum of squares 4 * 9/4 -> 3.
    w = torch.tensor([[4.0, -1.0], [-2.0, 0.5]])
    sq_norm = torch.tensor([4.0, 36.0])  # sum over tokens of x_j^2, tokens = 4
    expect_norm = [1.0, 3.0]  # sqrt(4/4), sqrt(36/4)
    got = score(w, sq_norm, 4, "wanda")
    assert got.dtype == torch.float32
    assert got.tolist() == [[4.0, 3.0], [2.0, 1.5]]
    assert score(w, sq_norm, 4, "weight").tolist() == [[4.0, 1.0], [2.0, 0.5]]
    assert score(w, sq_norm, 4, "activation").tolist() == [expect_norm, expect_norm]


def test_wanda_uses_norm_not_squared_norm():
    # Row 0: |w| = (4, 1), ||x|| = (1, 3). Wanda: 4 vs 3 -> prune column 1.
    # With ||x||^2: 4 vs 9 -> column 0 would be pruned instead.
    w = torch.tensor([[4.0, 1.0]])
    sq_norm = torch.tensor([4.0, 36.0])
    mask = unstructured_mask(score(w, sq_norm, 4, "wanda"), 0.5, "row")
    assert mask.tolist() == [[False, True]]
    squared = w.abs() * (sq_norm / 4)  # the wrong metric, written out
    wrong = unstructured_mask(squared, 0.5, "row")
    assert wrong.tolist() == [[True, False]]
    assert not torch.equal(mask, wrong)


def test_per_row_and_per_layer_ranking_differ():
    s = torch.tensor([[1.0, 2.0], [10.0, 20.0]])
    assert unstructured_mask(s, 0.5, "row").tolist() == [[True, False], [True, False]]
    assert unstructured_mask(s, 0.5, "layer").tolist() == [[True, True], [False, False]]
    assert unstructured_mask(s, 0.5, "column").tolist() == [[True, True], [False, False]]


# ---- unstructured masks vs brute force ----------------------------------------------------------

@pytest.mark.parametrize("group", ["row", "column", "layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.29, 0.5, 0.7, 0.9])
def test_unstructured_matches_brute_force(group, sparsity):
    gen = torch.Generator().manual_seed(len(group) * 1000 + int(sparsity * 100))
    s = torch.rand(7, 13, generator=gen)
    assert torch.equal(unstructured_mask(s, sparsity, group), brute_mask(s, sparsity, group))


@pytest.mark.parametrize("group", ["row", "column", "layer"])
def test_unstructured_ties_prune_lower_index_first(group):
    gen = torch.Generator().manual_seed(3)
    s = torch.randint(0, 3, (6, 10), generator=gen).float()  # many ties
    mask = unstructured_mask(s, 0.5, group)
    assert torch.equal(mask, brute_mask(s, 0.5, group))


@pytest.mark.parametrize("group,size", [("row", 10), ("column", 6), ("layer", 60)])
def test_unstructured_exact_counts(group, size):
    s = torch.rand(6, 10)
    for sparsity in (0.1, 0.29, 0.33, 0.5, 0.99):
        mask = unstructured_mask(s, sparsity, group)
        k = floor_count(sparsity, size)
        if group == "row":
            assert mask.sum(dim=1).tolist() == [k] * 6
        elif group == "column":
            assert mask.sum(dim=0).tolist() == [k] * 10
        else:
            assert int(mask.sum()) == k


# ---- N:M ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,m", [(1, 4), (3, 4), (2, 4), (4, 8), (2, 8)])
def test_nm_keeps_n_of_every_m(n, m):
    gen = torch.Generator().manual_seed(n * 100 + m)
    s = torch.rand(5, 4 * m, generator=gen)
    mask = nm_mask(s, n, m)
    kept_per_group = (~mask).reshape(5, -1, m).sum(dim=-1)
    assert (kept_per_group == n).all()  # an N/M inversion fails here for 1:4, 3:4, 2:8
    v = s.tolist()
    for r in range(5):
        for g in range(0, 4 * m, m):
            pruned = lowest([(v[r][c], c) for c in range(g, g + m)], m - n)
            assert {c for c in range(g, g + m) if mask[r, c]} == pruned


def test_nm_one_of_four_keeps_exactly_the_largest():
    s = torch.tensor([[0.1, 0.9, 0.3, 0.2, 5.0, 1.0, 2.0, 3.0]])
    assert nm_mask(s, 1, 4).tolist() == [[True, False, True, True, False, True, True, True]]
    assert nm_mask(s, 3, 4).tolist() == [[True, False, False, False, False, True, False, False]]


def test_nm_ties_prune_lower_index_first():
    assert nm_mask(torch.ones(1, 4), 2, 4).tolist() == [[True, True, False, False]]


def test_nm_in_features_not_multiple_of_m_raises():
    with pytest.raises(LlmpruneError, match="in_features 30 is not a multiple of M=4"):
        nm_mask(torch.rand(3, 30), 2, 4)


# ---- Wanda's alpha variant ----------------------------------------------------------------------

@pytest.mark.parametrize("target", [0.5, 0.6])
def test_alpha_variant_hits_target_and_cumsum_definition(target):
    gen = torch.Generator().manual_seed(11)
    s = torch.rand(32, 256, generator=gen) * torch.rand(1, 256, generator=gen)  # wanda-like
    mask, alpha, achieved = alpha_variant_search(s, target)
    assert abs(mask.float().mean().item() - target) <= 0.001
    assert achieved == pytest.approx(mask.float().mean().item())
    for r, row in enumerate(s.double().tolist()):
        values = sorted(row)
        cum = list(itertools.accumulate(values))
        limit = alpha * sum(row)
        k = int(mask[r].sum())
        # pruned = the k smallest, k = how many sorted prefix sums stay within alpha * row sum
        pruned = {c for c in range(len(row)) if mask[r, c]}
        assert pruned == {c for c in range(len(row)) if row[c] <= values[k - 1]}
        assert cum[k - 1] <= limit * (1 + 1e-5)
        assert k == len(row) or cum[k] > limit * (1 - 1e-5)
        assert 0.0 < alpha < 0.8


def test_alpha_variant_zero_sparsity_prunes_nothing():
    mask, _, _ = alpha_variant_search(torch.rand(4, 8), 0.0)
    assert not mask.any()


@pytest.mark.parametrize("levels", [None, 3, 17])
@pytest.mark.parametrize("shape", [(5, 40), (3, 96, 4), (2, 1, 64)])
def test_selection_equals_a_stable_sort(levels, shape):
    """The selection in masks.py gives exactly the first k of a stable ascending sort, every k,
    with ties (few distinct values), signed zeros and N:M-shaped groups."""
    from llmprune.math.masks import lowest_along_last

    gen = torch.Generator().manual_seed(sum(shape) + (levels or 0))
    s = torch.rand(*shape, generator=gen)
    if levels is not None:
        s = torch.floor(s * levels) - levels // 2  # ties, negatives, and zeros
        s[s == 0] = torch.where(torch.rand(int((s == 0).sum()), generator=gen) < 0.5, -0.0, 0.0)
    for k in range(shape[-1] + 1):
        order = torch.sort(s, dim=-1, stable=True).indices[..., :k]
        expected = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, order, True)
        assert torch.equal(lowest_along_last(s, k), expected), k
