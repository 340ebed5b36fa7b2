"""SparseGPT: prune a layer and repair the rest of its weights with second-order updates.

Paper: Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", ICML, arXiv:2301.00774. Follows IST-DASLab/sparsegpt ``SparseGPT.fasterprune``.

Idea: minimise the layer reconstruction error ||W X - W' X||^2 under a sparsity constraint,
one input column at a time. With the Hessian H = 2 X X^T / tokens (in, in), Optimal Brain
Surgeon says that zeroing w_q in a row costs w_q^2 / (2 [H^-1]_qq) and is best compensated by
moving that row by -w_q / [H^-1]_qq * H^-1[q, :]. Going left to right, the inverse Hessians of
the remaining columns are read off one upper Cholesky factor U = chol(H^-1):

    d_i    = U_ii
    q_i    = 0 if w_i is pruned else w_i
    err_i  = (w_i - q_i) / d_i                 (out,)
    W[:, i:] -= err_i U[i, i:]                 OBS update of the later columns
    loss  += sum (w_i - q_i)^2 / d_i^2 / 2

Columns are processed in blocks of ``blocksize``: each column's update reaches the rest of its
block at once, later blocks get one lazy batched update ``W[:, i2:] -= Err1 @ U[i1:i2, i2:]``.

Mask selection (saliency w^2 / d^2):
  * unstructured: per block, at the block start, the ``floor(sparsity * numel)`` lowest of the
    block (exact count, stable ties; the reference prunes ``<= sorted[int(numel * s)]``, i.e. one
    more per block plus ties);
  * N:M (N kept of every M): at each column i with i % M == 0, per row the M - N lowest of the
    *updated* weights W[:, i:i+M] (the reference's ``prunen`` counts pruned weights instead).

Preprocessing as the reference: dead inputs (H_jj == 0) get H_jj = 1 and W[:, j] = 0; damping
``percdamp * mean(diag H)`` on the diagonal. If the Cholesky factorisation fails, damping is
retried x10 (``MAX_RETRIES`` times) before giving up with an LlmpruneError.

Speed without new arithmetic: the sweep does exactly the float operations above, in the same
order (masks and weights are bit-identical to the plain loop, tests/test_sparsegpt.py keeps it),
and saves only what does not round: the block is held transposed (column i is a contiguous row),
the per-column work is four kernels writing into buffers allocated once per layer (no boolean
indexing, so no GPU sync per column), column i itself is not updated after its error is taken,
q, the losses and the error matrix are formed once per block, and on a CPU the masks come from
selection (kthvalue) and pairwise ranking instead of stable sorts, with the sorts' tie order.
"""

from __future__ import annotations

import math

import torch

from llmprune.errors import LlmpruneError
from llmprune.math.masks import lowest_along_last, prune_count

MAX_RETRIES = 3  # percdamp 0.01 -> 0.1 -> 1 -> 10


def all_finite(x: torch.Tensor) -> bool:
    """``torch.isfinite(x).all()`` in one reduction: min and max propagate NaN and keep +-inf."""
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Upper Cholesky factor of (h + damp*I)^-1, or None if a factorisation fails.

    Damps ``h`` in place (the caller owns it and restores the diagonal before a retry)."""
    h.diagonal().add_(damp)
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0 or not all_finite(lower):
        return None
    hinv = torch.cholesky_inverse(lower)  # (in, in) = H^-1
    upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if info.item() != 0 or not all_finite(upper):
        return None
    return upper


def _damped_inverse(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float, int]:
    """chol(H^-1) (upper) with ``percdamp * mean(diag H)`` damping, raised x10 on failure.

    ``H`` is the caller's scratch copy: it is left damped."""
    mean_diag = torch.diagonal(H).mean().item()
    undamped = torch.diagonal(H).clone()  # (in,) restored exactly before each retry
    damp_frac, Hinv = percdamp, None
    for retries in range(MAX_RETRIES + 1):
        if retries:
            torch.diagonal(H).copy_(undamped)
        Hinv = _inverse_cholesky(H, damp_frac * mean_diag)  # (in, in) upper
        if Hinv is not None:
            return Hinv, damp_frac, retries
        if retries < MAX_RETRIES:
            damp_frac = damp_frac * 10 if damp_frac > 0 else 0.01
    raise LlmpruneError(
        f"SparseGPT Cholesky failed even with percdamp {damp_frac:g}: the Hessian is not positive "
        "definite; use more calibration samples or a larger percdamp"
    )


def saliency(weight: torch.Tensor, hessian: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT's criterion on the dense weights, w^2 / [chol(H^-1)]_jj^2 (out, in), dead inputs
    zeroed as in the sweep: what DSnoT's official code ranks by for ``--initial_method sparsegpt``."""
    W = weight.detach().float().clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    d = torch.diagonal(_damped_inverse(H, percdamp)[0])  # (in,)
    return W ** 2 / d.unsqueeze(0) ** 2


# Saliencies are >= +0 or NaN, and a NaN one means a NaN weight, which ends the sweep in a
# non-finite loss and an LlmpruneError: no tie order is needed for NaN.

def _masks_by_sort(device: torch.device) -> bool:
    """Choose masks by sorting (a GPU: sorts are fast, kernel launches are what to save) or by
    selection and pairwise ranking (a CPU, where a stable sort is the slow part). Same masks."""
    return device.type != "cpu"


def _lowest_of_block(sal: torch.Tensor, k: int, by_sort: bool) -> torch.Tensor:
    """The ``k`` lowest of ``sal`` (rows, count) in row-major order, ties to the lower index: the
    first k of a stable sort. ``by_sort``: sort (fast on a GPU); else select the k-th value (several
    times faster on a CPU), which gives the same set."""
    if not by_sort:
        return lowest_along_last(sal.reshape(-1), k).view_as(sal)
    flat = torch.zeros(sal.numel(), dtype=torch.bool, device=sal.device)
    if k > 0:
        flat[torch.sort(sal.reshape(-1), stable=True).indices[:k]] = True
    return flat.view_as(sal)


def _prune_group(sal: torch.Tensor, k: int, out: torch.Tensor, index: torch.Tensor | None) -> None:
    """Set ``out`` (m, rows), all False, True at the ``k`` lowest of each column of ``sal`` (m, rows),
    ties to the lower index (a stable sort along the group). ``index`` (m, 1) = arange(m): rank by
    comparing all pairs, fewer and cheaper ops on a CPU; None: one small sort kernel (a GPU)."""
    if index is None:
        out.scatter_(0, torch.sort(sal, dim=0, stable=True).indices[:k], True)
        return
    # unique int64 keys ordered like (saliency, index): non-negative floats order like their bits
    key = sal.view(torch.int32).to(torch.int64).mul_(sal.shape[0]).add_(index)  # (m, rows)
    rank = (key.unsqueeze(1) < key.unsqueeze(0)).sum(dim=0)  # (m, rows): how many come first
    torch.lt(rank, k, out=out)


class _Sweep:
    """One layer's buffers for the column sweep, block transposed: row i of ``W1`` is column i.

    Allocated once per layer; ``steps(count)`` are the per-column views into them, built once per
    block width, so the inner loop only launches kernels."""

    def __init__(self, rows: int, blocksize: int, device: torch.device):
        self.W1 = torch.empty(blocksize, rows, device=device)  # (count, out) weights being swept
        self.mask1 = torch.empty(blocksize, rows, dtype=torch.bool, device=device)  # True = pruned
        self.Err1 = torch.empty(blocksize, rows, device=device)  # (count, out) err_i per column
        self.Hinv1 = torch.empty(blocksize, blocksize, device=device)  # chol(H^-1) block, contiguous
        self.update = torch.empty(max(blocksize - 1, 1), rows, device=device)  # err_i U[i, j] of one column
        self.num = torch.empty(rows, device=device)  # w_i - q_i
        self.zero = torch.zeros((), device=device)
        self._steps: dict[int, list] = {}

    def steps(self, count: int) -> list:
        if count not in self._steps:
            views = []
            for i in range(count):
                later = None
                if i + 1 < count:  # (U[i, i+1:] as a column, the product's buffer, the later columns)
                    later = (self.Hinv1[i, i + 1:count].unsqueeze(1), self.update[:count - i - 1],
                             self.W1[i + 1:count])
                views.append((self.W1[i], self.mask1[i], self.Err1[i], self.Hinv1[i, i], later))
            self._steps[count] = views
        return self._steps[count]


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    n: int | None = None, m: int | None = None, percdamp: float = 0.01,
                    blocksize: int = 128, fixed_mask: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prune ``weight`` (out, in) given ``hessian`` (in, in) = 2/tokens * sum x x^T.

    ``n``/``m``: N:M pattern (N kept of every M), or None for unstructured at ``sparsity``.
    Returns (new weight float32 (out, in), mask bool (out, in) with True = pruned, info) where
    info has "loss" (sum of OBS losses), "percdamp_used", "retries", "dead" (dead inputs).
    The mask includes dead input columns, which are zeroed regardless of the pattern.

    ``fixed_mask`` (out, in) bool, True = pruned: sweep with this mask instead of choosing one
    (``sparsity``/``n``/``m`` are then ignored): the mask-fixed reconstruction of
    ``solvers/reconstruct.py``. Dead input columns then keep their weights where the mask keeps
    them (their input is always zero, so no value of theirs changes the error).
    """
    if fixed_mask is not None:
        m = n = None
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
    if fixed_mask is not None and fixed_mask.shape != weight.shape:
        raise ValueError(f"fixed_mask has shape {tuple(fixed_mask.shape)}, expected {tuple(weight.shape)}")
    structured = m is not None
    if structured:
        if n is None or not 1 <= n < m:
            raise LlmpruneError(f"N:M pattern {n}:{m} is invalid: it keeps N of every M weights, "
                                "so 1 <= N < M")
        if cols % m:
            raise LlmpruneError(f"in_features {cols} is not a multiple of M={m}: choose an M that "
                                "divides it or exclude this layer")
        if blocksize % m:
            # An N:M group must not straddle two blocks: the block's updates would split it.
            raise LlmpruneError(f"SparseGPT blocksize {blocksize} is not a multiple of M={m}: "
                                "use a blocksize such as 128")

    device = weight.device
    W = weight.detach().to(torch.float32, copy=True)  # (out, in)
    H = hessian.detach().to(device=device, dtype=torch.float32, copy=True)  # (in, in)
    if not all_finite(H):
        raise LlmpruneError("SparseGPT Hessian has NaN/Inf entries: the calibration activations "
                            "overflowed; calibrate in float32 or with fewer/shorter samples")

    dead = torch.diagonal(H) == 0  # (in,) inputs that were always zero
    if fixed_mask is None and not structured and sparsity <= 0:
        return W, torch.zeros(rows, cols, dtype=torch.bool, device=device), {
            "loss": 0.0, "percdamp_used": percdamp, "retries": 0, "dead": int(dead.sum().item())}
    torch.diagonal(H).masked_fill_(dead, 1)
    W.masked_fill_(dead.unsqueeze(0), 0)

    Hinv, damp_frac, retries = _damped_inverse(H, percdamp)

    mask = torch.zeros(rows, cols, dtype=torch.bool, device=device)  # (out, in)
    losses = torch.zeros(rows, device=device)  # (out,)
    sweep = _Sweep(rows, min(blocksize, cols), device)
    by_sort = _masks_by_sort(W.device)
    group_index = None if by_sort or not structured else torch.arange(m, device=device).unsqueeze(1)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1, mask1 = sweep.W1[:count], sweep.mask1[:count]  # (count, out)
        Hinv1 = sweep.Hinv1[:count, :count]
        Hinv1.copy_(Hinv[i1:i2, i1:i2])
        W1.copy_(W[:, i1:i2].t())
        d_sq = torch.diagonal(Hinv1) ** 2  # (count,)

        if fixed_mask is not None:
            mask1.copy_(fixed_mask[:, i1:i2].t())
        elif structured:
            mask1.zero_()
        else:
            saliency = W[:, i1:i2] ** 2 / d_sq.unsqueeze(0)  # (out, count)
            k = prune_count(sparsity, saliency.numel())
            mask1.copy_(_lowest_of_block(saliency, k, by_sort).t())

        num, zero = sweep.num, sweep.zero
        for i, (w, pruned, err, d, later) in enumerate(sweep.steps(count)):
            if structured and i % m == 0:
                # Chosen from the weights as updated so far, so earlier pruning is compensated.
                group = W1[i:i + m]  # (m, out)
                _prune_group(group ** 2 / d_sq[i:i + m].unsqueeze(1), m - n, mask1[i:i + m], group_index)
            # w - q is w where pruned and 0 where kept (were w not finite, both ways end in
            # a non-finite loss below); err = (w - q) / d
            torch.where(pruned, w, zero, out=num)
            torch.div(num, d, out=err)
            if later is not None:  # W[:, j] -= err_i U[i, j] for the later columns j of the block
                u_row, update, rest = later
                torch.mul(u_row, err, out=update)
                rest.sub_(update)

        # W1's row i still holds w_i as it was when column i was reached
        Q1 = W1.masked_fill(mask1, 0.0)  # (count, out)
        W[:, i1:i2] = Q1.t()
        mask[:, i1:i2] = mask1.t()
        # (w - q)^2 / d^2 per weight, laid out (out, count) as the plain loop sums it
        losses += ((W1 - Q1) ** 2 / d_sq.unsqueeze(1)).t().contiguous().sum(dim=1) / 2
        W[:, i2:] -= sweep.Err1[:count].t().contiguous() @ Hinv[i1:i2, i2:]

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
