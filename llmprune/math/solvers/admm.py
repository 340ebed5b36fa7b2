"""ADMM weight update and gradual ADMM pruning of one layer.

Paper: Boža 2024, "Fast and Effective Weight Update for Pruned Large Language Models", TMLR,
arXiv:2401.02938. Official code: fmfi-compbio/admm-pruning (commit 80392084), ``lib/admm.py``
``AdmmPruner.fasterprune``, called by ``lib/prune.py:476`` ``prune_admm`` with ``percdamp=0.1``.
Full procedure and line references: the spec ``/tmp/specs/admm.md`` (summarised here).

Problem: given the dense weights W0 (out, in), the Hessian H (in, in) and a mask (True = pruned),
find the sparse W minimising the reconstruction error ||(W - W0) X^T||^2. The official code first
normalises the inputs, so that every input column has unit energy (eps = 1e-8):

    d    = sqrt(diag H) + eps                       (in,)
    Hn   = diag(1/d) H diag(1/d)                    (unit diagonal)
    Wn   = W0 diag(d)                               (out, in)
    Hd   = Hn + rho0 I,  rho0 = percdamp * mean(diag Hn)      (~ percdamp)

and solves min_W (W - Wn) Hd (W - Wn)^T s.t. W = Z, Z zero on the mask, by ADMM with penalty rho
(scaled dual U, all (out, in); U = 0, W = Wn at the start; A = Hd + rho I factorised once):

    Z  <- (W + U) masked to zero                    projection onto the sparsity pattern
    U  <- U + W - Z                                 dual ascent
    W  <- (Wn Hd + rho (Z - U)) A^-1 = Wn + rho (Z - U - Wn) A^-1

and returns the last Z = (W + U) masked, divided back by d (so it is exactly zero on the mask).
Official defaults: 20 iterations, rho = 1 (fixed, no schedule), percdamp = 0.1.

Gradual pruning (``admm_prune``): during the first T = 15 iterations the mask is re-chosen before
each Z-step from |W + U| in the normalised coordinates (|w_ij| * ||x_j||, Wanda's score on the
ADMM iterate), at the cubic schedule s_t = s - s (1 - (t+1)/T)^3, t = 0..T-1; the last 5
iterations keep the mask fixed. Comparison groups, as in the official code:

* unstructured (default ``group="layer"``, official ``per_out=False``): the floor(s numel) lowest
  over the whole matrix. The official branch passes the *target* ``sparsity``, not s_t
  (``lib/admm.py:110``), so the default prunes at the full target from the first iteration and
  only re-selects the mask; ``cubic_unstructured=True`` applies the paper's cubic schedule instead.
* ``group="row"`` (official ``per_out=True``): the lowest floor(s_t in) of each output row.
* N:M (n kept of every m consecutive inputs of a row): the n largest of each group are kept for
  sure; of the others the floor(s_t numel) lowest over the whole matrix are pruned,
  s_t on the schedule with s = 1 - n/m, so the final mask is exactly N:M.

Our port differs in:
* H is llmprune's 2 X^T X / tokens, the official one X^T X; the normalisation removes the scale,
  so rho, percdamp and every iterate are the same (the eps = 1e-8 added to sqrt(diag H) is then
  relatively larger, still below float32 resolution for any live input).
* A^-1 from a Cholesky factorisation (A is symmetric positive definite, smallest eigenvalue
  >= rho0 + rho) instead of ``torch.inverse``; the W-step uses Wn Hd A^-1 = Wn - rho Wn A^-1 so each
  iteration is one (out, in) x (in, in) product plus elementwise work, as in the official code.
* N:M for any n:m (the official code hard-codes groups of 4 keeping 2 and forces s = 0.5, so its
  4:8 runs 2:4); exact counts floor(s numel) with stable ties (the official ``topk``/``kthvalue``
  break ties arbitrarily); ``prune_iterations > iterations`` is rejected (the official code would
  stop before reaching the target sparsity).
* Weights (out, in) instead of the official transposed (in, out) layout; float results agree to
  rounding (tests/test_admm.py compares with the literal ``benchmarks/official_admm.py``).
"""

from __future__ import annotations

import torch

from llmprune.errors import LlmpruneError
from llmprune.math.masks import lowest_along_last, prune_count, unstructured_mask
from llmprune.math.solvers.sparsegpt import all_finite

ITERATIONS = 20  # lib/admm.py:26 iters=20
PRUNE_ITERATIONS = 15  # lib/admm.py:26 iterative_prune=15
RHO = 1.0  # lib/admm.py:73
PERCDAMP = 0.1  # lib/prune.py:476 (also the fasterprune default, lib/admm.py:26)
EPS = 1e-8  # lib/admm.py:29


class _Problem:
    """The normalised layer problem, factorised once for one rho."""

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor, percdamp: float, rho: float):
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        cols = weight.shape[1]
        if hessian.shape != (cols, cols):
            raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
        if rho <= 0 or percdamp < 0:
            raise LlmpruneError(f"ADMM needs rho > 0 and percdamp >= 0, got rho {rho:g}, "
                                f"percdamp {percdamp:g}")
        H = hessian.detach().to(device=weight.device, dtype=torch.float32)
        if not all_finite(H):
            raise LlmpruneError("ADMM Hessian has NaN/Inf entries: the calibration activations overflowed; "
                                "calibrate in float32 or with fewer/shorter samples")
        self.hessian = H
        self.norm = torch.diagonal(H).clamp_min(0).sqrt() + EPS  # (in,)
        A = H / self.norm.unsqueeze(0) / self.norm.unsqueeze(1)  # (in, in) unit diagonal
        rho0 = percdamp * torch.diagonal(A).mean()
        torch.diagonal(A).add_(rho0 + rho)
        lower, info = torch.linalg.cholesky_ex(A)
        if info.item() != 0:
            raise LlmpruneError(f"ADMM: the normalised Hessian + {rho:g} I is not positive definite "
                                "(the Hessian is not symmetric PSD); recollect it in float32")
        self.rho_ainv = torch.cholesky_inverse(lower).mul_(rho)  # (in, in) rho A^-1
        self.w0 = weight.detach().to(torch.float32)  # (out, in)
        self.wn = self.w0 * self.norm  # (out, in) normalised dense weights
        self.rho = rho

    def step(self, W: torch.Tensor, U: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One ADMM iteration in place on W, U; returns Z."""
        Z = (W + U).masked_fill_(mask, 0.0)
        U.add_(W).sub_(Z)
        torch.addmm(self.wn, Z - U - self.wn, self.rho_ainv, out=W)
        return Z

    def finish(self, W: torch.Tensor, U: torch.Tensor, mask: torch.Tensor, iterations: int,
               prune_iterations: int = 0) -> tuple[torch.Tensor, dict]:
        """The last Z in the caller's units, and the info dict; raises if it is not finite."""
        Z = (W + U).masked_fill_(mask, 0.0)
        if not (all_finite(Z) and all_finite(W)):
            raise LlmpruneError(f"ADMM diverged (non-finite weights after {iterations} iterations): "
                                "lower --admm-rho or raise --percdamp")
        residual = float((torch.linalg.norm(W - Z) / torch.linalg.norm(Z).clamp_min(1e-30)).item())
        out = Z / self.norm  # (out, in) exactly 0 on the mask
        delta = out - self.w0
        loss = float(((delta @ self.hessian) * delta).sum().item()) / 2
        return out, {"iterations": iterations, "prune_iterations": prune_iterations, "rho": self.rho,
                     "loss": loss, "residual": residual,
                     "sparsity": float(mask.sum().item()) / max(mask.numel(), 1)}


def admm_update(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, *,
                iterations: int = ITERATIONS, rho: float = RHO, percdamp: float = PERCDAMP,
                ) -> tuple[torch.Tensor, dict]:
    """ADMM reconstruction of ``weight`` (out, in) for a fixed ``mask`` (True = pruned), with
    ``hessian`` (in, in) = 2 X^T X / tokens. Returns (new weight float32, zero exactly on the mask;
    info with "iterations", "rho", "loss" = 1/2 sum_rows dW H dW^T, "residual" = ||W - Z|| / ||Z||)."""
    if mask.shape != weight.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(weight.shape)}")
    if iterations < 0:
        raise LlmpruneError(f"ADMM iterations must be >= 0, got {iterations}")
    problem = _Problem(weight, hessian, percdamp, rho)
    mask = mask.to(device=problem.wn.device, dtype=torch.bool)
    W, U = problem.wn.clone(), torch.zeros_like(problem.wn)
    for _ in range(iterations):
        problem.step(W, U, mask)
    return problem.finish(W, U, mask, iterations)


def _cubic(sparsity: float, t: int, steps: int) -> float:
    """The official schedule s - s (1 - (t+1)/T)^3 (lib/admm.py:89, 104)."""
    return sparsity - sparsity * (1 - (t + 1) / steps) ** 3


def _lowest_flat(score: torch.Tensor, k: int) -> torch.Tensor:
    """``lowest_along_last`` of the flattened ``score`` (stable ties), faster on a large matrix:
    an unsorted ``topk`` is exact unless the k-th value is tied, then the general selection."""
    flat = score.reshape(-1)
    if not 0 < k < flat.numel():
        return lowest_along_last(flat, k).view_as(score)
    values, indices = torch.topk(flat, k, largest=False, sorted=False)
    if int((flat == values.max()).sum().item()) != 1:
        return lowest_along_last(flat, k).view_as(score)
    return torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, indices, True).view_as(score)


def _nm_pruned(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``masks.nm_mask`` (the m - n lowest of every m inputs, lower index first among ties) by
    ranking all pairs of a group: a few cheap ops instead of a selection per tiny group."""
    group = score.reshape(score.shape[0], -1, m)  # (out, in/m, m)
    a, b = group.unsqueeze(-1), group.unsqueeze(-2)  # weight i, weight j of a group
    index = torch.arange(m, device=score.device)
    earlier = index.view(1, m) < index.view(m, 1)  # (m, m) j before i
    rank = ((b < a) | ((b == a) & earlier)).sum(dim=-1)  # (out, in/m, m)
    return (rank < m - n).view_as(score)


def _choose_mask(score: torch.Tensor, target: float, n: int | None, m: int | None,
                 group: str) -> torch.Tensor:
    """Pruned mask at sparsity ``target`` from ``score`` (out, in) = |W + U| (normalised)."""
    if m is None:
        if group == "layer":
            return _lowest_flat(score, prune_count(target, score.numel()))
        return unstructured_mask(score, target, group)
    # the n largest of every m are kept for sure; the rest compete over the whole matrix
    candidate = _nm_pruned(score, n, m)
    values = score[candidate]  # (numel (m-n)/m,) row-major, so ties keep the lower index first
    chosen = _lowest_flat(values, min(prune_count(target, score.numel()), values.numel()))
    return torch.zeros_like(candidate).masked_scatter_(candidate, chosen)


def _validate_pattern(weight: torch.Tensor, sparsity: float, n: int | None, m: int | None,
                      group: str) -> None:
    if (n is None) != (m is None):
        raise LlmpruneError("ADMM N:M needs both n and m (n kept of every m)")
    if m is not None:
        if not 1 <= n < m:
            raise LlmpruneError(f"N:M pattern {n}:{m} is invalid: it keeps N of every M weights, "
                                "so 1 <= N < M")
        if weight.shape[1] % m:
            raise LlmpruneError(f"in_features {weight.shape[1]} is not a multiple of M={m}: choose an M "
                                "that divides it or exclude this layer")
    elif not 0 <= sparsity < 1:
        raise LlmpruneError(f"sparsity {sparsity:g} is outside [0, 1)")
    if group not in ("layer", "row"):
        raise LlmpruneError(f"ADMM compares weights per 'layer' or per 'row', got {group!r}")


def admm_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
               n: int | None = None, m: int | None = None, *, iterations: int = ITERATIONS,
               prune_iterations: int = PRUNE_ITERATIONS, rho: float = RHO, percdamp: float = PERCDAMP,
               group: str = "layer", cubic_unstructured: bool = False,
               ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Gradual ADMM pruning of ``weight`` (out, in) with ``hessian`` (in, in) = 2 X^T X / tokens.

    ``n``/``m``: N:M (n kept of every m inputs; ``sparsity`` is then 1 - n/m), else unstructured at
    ``sparsity`` compared per ``group`` ("layer" as the official default, or "row"). The mask is
    re-chosen in each of the first ``prune_iterations`` iterations (0: chosen once from the dense
    weights, then a fixed-mask update). Returns (new weight float32, mask True = pruned, info)."""
    _validate_pattern(weight, sparsity, n, m, group)
    if not 0 <= prune_iterations <= iterations:
        raise LlmpruneError(f"ADMM prune_iterations {prune_iterations} must be in [0, iterations "
                            f"{iterations}]: the mask reaches the target sparsity only at the last of them")
    target = 1 - n / m if m is not None else sparsity
    problem = _Problem(weight, hessian, percdamp, rho)
    W, U = problem.wn.clone(), torch.zeros_like(problem.wn)
    if target <= 0:
        return problem.w0.clone(), torch.zeros_like(W, dtype=torch.bool), {
            "iterations": 0, "prune_iterations": 0, "rho": rho, "loss": 0.0, "residual": 0.0, "sparsity": 0.0}
    # the official unstructured per-layer branch prunes at the target throughout (lib/admm.py:110)
    flat = m is None and group == "layer" and not cubic_unstructured
    mask = _choose_mask(W.abs(), target, n, m, group)  # prune_iterations == 0: chosen once
    for t in range(iterations):
        if t < prune_iterations:
            level = target if flat else _cubic(target, t, prune_iterations)
            mask = _choose_mask((W + U).abs_(), level, n, m, group)
        problem.step(W, U, mask)
    new, info = problem.finish(W, U, mask, iterations, prune_iterations)
    return new, mask, info
