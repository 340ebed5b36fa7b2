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
"""

from __future__ import annotations

import math

import torch

from llmprune.errors import LlmpruneError
from llmprune.masks import prune_count

MAX_RETRIES = 3  # percdamp 0.01 -> 0.1 -> 1 -> 10


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor | None:
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


def _damped_inverse(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float, int]:
    """chol(H^-1) (upper) with ``percdamp * mean(diag H)`` damping, raised x10 on failure."""
    mean_diag = torch.diagonal(H).mean().item()
    damp_frac, Hinv = percdamp, None
    for retries in range(MAX_RETRIES + 1):
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

    Hinv, damp_frac, retries = _damped_inverse(H, percdamp)

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
