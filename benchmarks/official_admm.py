"""Literal re-implementation of the official ADMM pruning (fmfi-compbio/admm-pruning, commit
80392084a939dff5b15a160fb46499b478905506, ``lib/admm.py`` ``AdmmPruner.fasterprune``), for parity
checks of ``llmprune.math.solvers.admm``.

Written step by step as the official code does it, with its variable names, its transposed
(in, out) weight layout, its normalisation, ``torch.inverse`` and its loops; comments cite
``lib/admm.py:LINE``. Differences, only where the official code cannot run as written here:
the ``print`` calls are dropped; the N:M mask of ``lib/admm.py:91`` is created on W's device
(the official one is a CPU tensor used to index a CUDA tensor); the result is returned instead of
written into ``layer.weight``.

Inputs: ``weight`` (out, in) as ``nn.Linear.weight``; ``XX`` (in, in) = X^T X summed over the
calibration tokens (``AdmmPruner.add_batch``, ``lib/admm.py:21-23``). llmprune's Hessian
H = 2 X^T X / tokens may be passed instead: the official code normalises XX by its diagonal
(lib/admm.py:29-32), so the scale cancels (``xx_from_inputs`` builds the official form).

``official_admm`` returns (new weight (out, in) float32, mask (out, in) bool, True = pruned).
``official_admm_fixed_mask`` is the official ``iterative_prune=0`` path (mask chosen once, then
``iters`` fixed-mask ADMM iterations) with the mask given instead of chosen at lib/admm.py:40-61,
i.e. the "ADMM update after a given mask" (e.g. Wanda's) of the paper.
"""

from __future__ import annotations

import torch


def xx_from_inputs(X: torch.Tensor) -> torch.Tensor:
    """lib/admm.py:21-23: XX += X.T @ X over all calibration tokens (no division)."""
    X = X.reshape(-1, X.shape[-1]).float()
    return X.T.matmul(X)


def _normalise(weight, XX, percdamp):
    """lib/admm.py:28-37: unit-diagonal XX, W scaled by the input norms and transposed, damping."""
    XX = XX.clone().float()
    norm = torch.diag(XX).sqrt() + 1e-8  # lib/admm.py:29
    XX = XX / norm  # lib/admm.py:31
    XX = (XX.T / norm).T  # lib/admm.py:32
    W = (weight.float().detach() * norm).T  # lib/admm.py:33, (in, out)
    rho0 = percdamp * torch.diag(XX).mean()  # lib/admm.py:35
    diag = torch.arange(XX.shape[0], device=XX.device)
    XX[diag, diag] += rho0  # lib/admm.py:37
    return XX, W, norm, diag


def _initial_mask(W, sparsity, prune_n, per_out):
    """lib/admm.py:40-61 (iterative_prune == 0): mask = 1 where KEPT, (in, out)."""
    if prune_n != 0:  # lib/admm.py:41-48: groups of 4, keep the 2 largest, whatever prune_n is
        WT = W.T.reshape((W.shape[1] * W.shape[0] // 4, 4)).abs()
        mask = torch.zeros_like(WT)
        sort_inds = WT.sort(dim=1)[1]
        mask[torch.arange(WT.shape[0]), sort_inds[:, 2]] = 1
        mask[torch.arange(WT.shape[0]), sort_inds[:, 3]] = 1
        mask = mask.reshape(W.T.shape).T
    elif per_out:  # lib/admm.py:49-52
        thres = (W).abs().sort(dim=0)[0][int(W.shape[0] * sparsity)]
        mask = ((W).abs() >= thres.unsqueeze(0))
    else:  # lib/admm.py:56-60
        topk = torch.topk(W.abs().flatten(), k=int(W.numel() * sparsity), largest=False)
        mask = torch.ones(W.numel(), dtype=torch.bool, device=W.device)
        mask[topk.indices] = 0
        mask = mask.reshape(W.shape)
    return mask


def _gradual_mask(W, U, itt, sparsity, prune_n, iterative_prune, per_out):
    """lib/admm.py:87-115: the mask (1 = KEPT, (in, out)) of iteration ``itt``."""
    if prune_n != 0:
        sparsity = 0.5  # lib/admm.py:88
        cur_sparsity = sparsity - sparsity * (1 - (itt + 1) / iterative_prune) ** 3  # lib/admm.py:89
        WT = (W + U).T.reshape((W.shape[1] * W.shape[0] // 4, 4)).abs()
        mask = torch.zeros(WT.shape, dtype=torch.bool, device=W.device)  # official: on the CPU
        sort_inds = WT.sort(dim=1)[1]
        mask[torch.arange(WT.shape[0]), sort_inds[:, 2]] = 1
        mask[torch.arange(WT.shape[0]), sort_inds[:, 3]] = 1
        mask = mask.reshape(W.T.shape).T
        Z2 = (W + U).abs()  # lib/admm.py:97
        Z2[mask] = torch.inf
        thres = Z2.flatten().kthvalue(int(W.numel() * cur_sparsity) + 1)[0]
        return (Z2 >= thres)  # lib/admm.py:100
    cur_sparsity = sparsity - sparsity * (1 - (itt + 1) / iterative_prune) ** 3  # lib/admm.py:104
    if per_out:  # lib/admm.py:105-108
        thres = (W + U).abs().sort(dim=0)[0][int(W.shape[0] * cur_sparsity)]
        return ((W + U).abs() >= thres.unsqueeze(0))
    # lib/admm.py:110: the target `sparsity`, not cur_sparsity
    topk = torch.topk((W + U).abs().flatten(), k=int(W.numel() * sparsity), largest=False)
    mask = torch.ones(W.numel(), dtype=torch.bool, device=W.device)
    mask[topk.indices] = 0
    return mask.reshape(W.shape)


def _admm_loop(XX, W, diag, mask, iters, choose):
    """lib/admm.py:73-123. ``choose(W, U, itt)`` returns a new mask or None (keep the old one)."""
    rho = 1  # lib/admm.py:73
    XY = XX.matmul(W)  # lib/admm.py:76, XX already damped by rho0
    XX[diag, diag] += rho  # lib/admm.py:78
    XXinv = torch.inverse(XX)  # lib/admm.py:80
    U = torch.zeros_like(W)  # lib/admm.py:83
    for itt in range(iters):  # lib/admm.py:85
        new_mask = choose(W, U, itt)
        if new_mask is not None:
            mask = new_mask
        Z = (W + U) * mask  # lib/admm.py:117
        U = U + (W - Z)  # lib/admm.py:119
        W = XXinv.matmul(XY + rho * (Z - U))  # lib/admm.py:121
    Z = (W + U) * mask  # lib/admm.py:123
    return Z, mask


def official_admm(weight, XX, sparsity, prune_n=0, prune_m=0, percdamp=.1, iterative_prune=15,
                  iters=20, per_out=False):
    """``AdmmPruner.fasterprune`` (lib/admm.py:25-127); prune_admm calls it with percdamp=0.1
    (lib/prune.py:476) and the other defaults. Returns (new weight (out, in), pruned mask (out, in))."""
    XX, W, norm, diag = _normalise(weight, XX, percdamp)
    mask = None
    if iterative_prune == 0:
        mask = _initial_mask(W, sparsity, prune_n, per_out)
    if iters == 0:  # lib/admm.py:65-71
        Z = (W) * mask
        return (Z.T / norm).reshape(weight.shape), ~mask.bool().T

    def choose(W, U, itt):
        if iterative_prune > 0 and itt < iterative_prune:  # lib/admm.py:86
            return _gradual_mask(W, U, itt, sparsity, prune_n, iterative_prune, per_out)
        return None

    Z, mask = _admm_loop(XX, W, diag, mask, iters, choose)
    out = (Z.T / norm)  # lib/admm.py:124
    return out.reshape(weight.shape), ~mask.bool().T


def official_admm_fixed_mask(weight, XX, pruned_mask, percdamp=.1, iters=20):
    """The iterative_prune=0 path of ``fasterprune`` with the given mask (True = pruned, (out, in))
    in place of the one chosen at lib/admm.py:40-61. Returns the new weight (out, in)."""
    XX, W, norm, diag = _normalise(weight, XX, percdamp)
    mask = (~pruned_mask.bool()).T.to(W.dtype)  # (in, out), 1 = kept, like lib/admm.py:48
    Z, _ = _admm_loop(XX, W, diag, mask, iters, lambda W, U, itt: None)
    return (Z.T / norm).reshape(weight.shape)
