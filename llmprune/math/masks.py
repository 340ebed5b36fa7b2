"""From scores to masks: which weights to prune.

Idea: prune the lowest-scoring weights, compared within a *group*. Wanda (Sun et al. 2023,
arXiv:2306.11695, Sec. 3 and Table 9) shows the group matters for LLMs: comparing within each
output row ("row") beats one threshold over the whole matrix ("layer", classic magnitude
pruning) and within each input column ("column").

A mask is a bool tensor shaped like the weight, **True = pruned** (set to zero).

Counts are exact: a group of ``g`` weights at sparsity ``s`` loses exactly ``floor(s * g)``
of them (see ``prune_count``). Ties are broken deterministically by a stable ascending sort:
among equal scores, the one with the lower index (row-major within the group) is pruned first.
The reference codes prune ``score <= sorted[int(s * g)]`` in places (magnitude, SparseGPT),
which prunes one more per group plus any ties; see the notes in ``methods.py``.

N:M (``nm_mask``): N weights are KEPT in every M consecutive input weights of each row, so
sparsity is 1 - N/M (NVIDIA's 2:4 convention, the N:M literature's). The locuslab/wanda and
IST-DASLab/sparsegpt codes call the first number ``prune_n`` and prune (zero) that many instead;
the two readings agree for 2:4 and 4:8 but not for 1:4 (we keep one of four, they would keep
three).

Wanda's variant (``alpha_variant_search``, Wanda appendix): per row, sort the scores ascending
and take their cumulative sum; for a given alpha, the row's threshold is the largest sorted score
whose cumulative sum is <= alpha * (row sum), and the row's mask is ``score <= threshold``.
alpha is bisected until the whole matrix reaches the target sparsity.

Pure math: tensors in, tensors out.
"""

from __future__ import annotations

import math

import torch

from llmprune.errors import LlmpruneError
from llmprune.math import GROUPS


def prune_count(sparsity: float, size: int) -> int:
    """``floor(sparsity * size)``, robust to binary fractions (0.29 * 100 is 28.999...96)."""
    return int(math.floor(sparsity * size + 1e-6))


def lowest_along_last(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` lowest entries along the last dim (stable: lower index first).

    The same mask as taking the first ``k`` of a stable ascending sort, found by selection
    instead (several times faster than sorting every row on a CPU): everything below the k-th
    smallest value, plus as many entries equal to it as are still needed, lowest index first.
    """
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= score.shape[-1]:
        return torch.ones_like(score, dtype=torch.bool)
    kth = torch.kthvalue(score, k, dim=-1, keepdim=True).values  # (..., 1)
    below = score < kth
    tied = score == kth
    still_needed = k - below.sum(dim=-1, keepdim=True)  # (..., 1), >= 1
    return below | (tied & (tied.cumsum(dim=-1) <= still_needed))


def unstructured_mask(score: torch.Tensor, sparsity: float, group: str = "row") -> torch.Tensor:
    """Prune the lowest ``floor(sparsity * group size)`` scores of every group.

    ``score`` is (out, in). Groups: "row" (each output row, in weights), "column" (each input
    column, out weights), "layer" (the whole matrix). Returns a bool (out, in) mask.
    """
    if group not in GROUPS:
        raise LlmpruneError(f"unknown comparison group {group!r}: use one of {', '.join(GROUPS)}")
    if score.dim() != 2:
        raise ValueError(f"score must be 2-D (out, in), got shape {tuple(score.shape)}")
    out_f, in_f = score.shape
    if group == "row":
        return lowest_along_last(score, prune_count(sparsity, in_f))
    if group == "column":
        return lowest_along_last(score.t(), prune_count(sparsity, out_f)).t().contiguous()
    flat = lowest_along_last(score.reshape(-1), prune_count(sparsity, score.numel()))
    return flat.view(out_f, in_f)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M mask: keep the ``n`` highest of every ``m`` consecutive input weights of each row.

    Exactly ``m - n`` are pruned per group (ties: lower index pruned first). ``n`` counts KEPT
    weights; the Wanda/SparseGPT codes' ``prune_n`` counts pruned ones (same for 2:4 and 4:8).
    """
    if not 1 <= n < m:
        raise LlmpruneError(f"N:M pattern {n}:{m} is invalid: it keeps N of every M weights, so 1 <= N < M")
    out_f, in_f = score.shape
    if in_f % m:
        raise LlmpruneError(
            f"in_features {in_f} is not a multiple of M={m}: choose an M that divides it "
            "or exclude this layer"
        )
    groups = score.reshape(out_f, in_f // m, m)  # (out, in/m, m)
    return lowest_along_last(groups, m - n).reshape(out_f, in_f)


def _given_alpha(alpha: float, sorted_score: torch.Tensor, cumsum: torch.Tensor,
                 row_sum: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The variant's mask and achieved sparsity for one alpha (locuslab/wanda return_given_alpha)."""
    below = cumsum <= (alpha * row_sum).unsqueeze(1)  # (out, in), a prefix of each row
    count = below.sum(dim=1, keepdim=True)  # (out, 1)
    # count == 0 (first score already above alpha * sum) means nothing pruned in that row;
    # the reference would index -1 there.
    thresh = torch.gather(sorted_score, 1, (count - 1).clamp_min(0))  # (out, 1)
    thresh = torch.where(count > 0, thresh, torch.full_like(thresh, -math.inf))
    mask = score <= thresh
    return mask, mask.sum().item() / mask.numel()


def alpha_variant_search(score: torch.Tensor, sparsity: float) -> tuple[torch.Tensor, float, float]:
    """Wanda's variant: returns (mask, alpha, achieved sparsity).

    Bisection as in locuslab/wanda ``prune_wanda``: alpha starts at 0.4 in the bracket
    [0, 0.8]; while |achieved - target| > 0.001 and the bracket is at least 0.001 wide, move the
    upper end down to alpha if too sparse, else the lower end up, and take the midpoint.
    """
    if score.dim() != 2:
        raise ValueError(f"score must be 2-D (out, in), got shape {tuple(score.shape)}")
    if sparsity <= 0:
        return torch.zeros_like(score, dtype=torch.bool), 0.0, 0.0
    sorted_score = torch.sort(score, dim=1, stable=True).values  # (out, in)
    cumsum = torch.cumsum(sorted_score, dim=1)  # (out, in)
    row_sum = score.sum(dim=1)  # (out,)
    alpha, lo, hi = 0.4, 0.0, 0.8
    mask, achieved = _given_alpha(alpha, sorted_score, cumsum, row_sum, score)
    while abs(achieved - sparsity) > 0.001 and hi - lo >= 0.001:
        if achieved > sparsity:
            alpha, hi = (alpha + lo) / 2.0, alpha
        else:
            alpha, lo = (alpha + hi) / 2.0, alpha
        mask, achieved = _given_alpha(alpha, sorted_score, cumsum, row_sum, score)
    return mask, alpha, achieved


def channel_reallocation(score: torch.Tensor, m: int) -> torch.Tensor:
    """RIA's heuristic channel reallocation for N:M (official ``--reallocation`` with
    ``--importance_score sum``): an input-channel order ``perm`` (in,) in which the N:M mask is
    then chosen, ``mask[:, perm] = nm_mask(score[:, perm])``.

    Channels are sorted by their summed score (ascending) and cut into M equal chunks; chunk k
    fills position k of every group of M, chunks at odd k (0-based) in reverse, so each group
    gets one channel of every importance level instead of several strong ones competing.
    """
    in_f = score.shape[1]
    if in_f % m:
        raise LlmpruneError(f"in_features {in_f} is not a multiple of M={m}")
    order = torch.sort(score.sum(dim=0)).indices  # (in,) weakest channel first
    perm = torch.empty_like(order)
    for k in range(m):
        chunk = order[in_f * k // m: in_f * (k + 1) // m]
        perm[k::m] = chunk if k % 2 == 0 else chunk.flip(0)
    return perm


def permuted_nm_mask(score: torch.Tensor, n: int, m: int, perm: torch.Tensor) -> torch.Tensor:
    """The N:M mask chosen in channel order ``perm``, returned in the original order: N kept of
    every M consecutive columns of ``W[:, perm]``."""
    mask = torch.empty_like(score, dtype=torch.bool)
    mask[:, perm] = nm_mask(score[:, perm], n, m)
    return mask
