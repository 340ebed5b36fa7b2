"""ALPS: prune a layer by ADMM with an adaptive penalty, then refine the kept weights by CG.

Paper: Meng, Behdin, Wang & Mazumder 2024, "ALPS: Improved Optimization for Highly Sparse One-Shot
Pruning for Large Language Models", NeurIPS, arXiv:2406.07831. Official code: mazumder-lab/ALPS
``alps.py`` ``ALPS_prune.ALPS_admm`` and ``cg_batch`` (commit 8af9e6b); the spec with line numbers is
/tmp/specs/alps.md.

Problem (per layer, W (out, in), H (in, in) the layer's Hessian):

    min_B  tr((B - B0) A (B - B0)^T)   s.t.  B sparse (per-layer top-k, or N:M along the input dim)

solved in the normalised coordinates of the official code:
    H_d = H + percdamp * mean(diag H) * I,   s = sqrt(diag H_d) + 1e-8   (in,)
    A   = diag(s)^-1 H_d diag(s)^-1  (unit diagonal),   B0 = W diag(s),   C = B0 A.

ADMM on  B = D  with D in the sparse set, penalty rho, dual V (all (out, in)):
    B <- (C - V + rho D) (A + rho I)^-1          (A = Q diag(L) Q^T: one eigh, reused for every rho)
    D <- P((V + rho B) / rho)                    (P: keep the largest |.|, zero the rest)
    V <- V + rho (B - D)
Every ``update_iter`` (3) iterations, with c = number of support entries that changed since the last
check and k = number of kept weights, rho is adapted:
    c/k > 0.1: rho *= 1.3;   c/k > 0.005: rho *= 1.2   (both mark "rho has grown")
    c > 0 (a few changes): rho *= 1.1 if rho has grown, else rho /= 5 and restart (B, D, V) from
                           (B0, P(B0), 0)
    c = 0: stop if rho has grown, else rho /= 5
then rho = min(rho, 1e6), (A + rho I)^-1 is rebuilt, and after ``switch_iter`` (30) iterations the loop
also stops once c/k < 3e-4. At most ``max_iter`` (300) iterations. Finally B <- P(B), and the kept
entries are refined by 10 iterations of conjugate gradients on A_SS b_S = C_S, one system per output row
(the official "PCG": its preconditioner is the identity, which is Jacobi because diag A = 1), started
at P(B) and stopped early only if every input column's full residual ||(B A - C)[:, j]|| falls below
1e-4 ||C[:, j]||. The new weight is B diag(s)^-1.

Mask: unstructured compares all weights of the layer at once (the official top-k over the whole
flattened matrix, not per row); N:M keeps the n largest of every m consecutive input weights of each
row (the official ``nm_n`` counts KEPT weights, as llmprune does). The initial mask P(B0) ranks
|W_ij| * s_j, a Wanda-like score.

Hessian scale: the official code uses XtX = sum x x^T (not averaged); llmprune's H = 2 XtX / tokens.
Damping is relative to mean(diag) and A is unit-diagonal, so everything above is invariant to the
scale of H (except the 1e-8 added to s, negligible next to sqrt(diag)): H is used as given.

Differences from the official code (same iterates in exact arithmetic unless stated):
  * weights are kept in llmprune's (out, in) layout (the official B is (in, out)): B (A + rho I)^-1
    instead of (A + rho I)^-1 B, same numbers.
  * (A + rho I)^-1 = Q diag(1/(L + rho)) Q^T is formed in float32 from the float64 eigenvectors (the
    official forms it in float64 then casts), and only when rho changed (the official rebuilds it at
    every check, also when rho is capped): 2-3x faster on a CPU, differences ~1e-6 relative.
  * the official computes, at every check, the relative error of the pruned iterate, used only by a
    commented-out print: skipped (one matmul per check).
  * CG: the official multiplies A by the search direction twice per iteration and recomputes A X for
    its stopping test; we keep A X up to date with the same product (one matmul per iteration).
  * exact counts: unstructured prunes floor(sparsity * numel) (``prune_count``; the official keeps
    round((1 - sp) * numel), at most one weight apart); ties go to the lower index (official: topk's).
  * the support is the projection's mask (official: D == 0 / B != 0, which differ only on weights
    that are exactly zero before the projection).
  * a non-finite iterate raises an LlmpruneError instead of silently writing NaN weights.
"""

from __future__ import annotations

import math

import torch

from llmprune.errors import LlmpruneError
from llmprune.math.masks import lowest_along_last, nm_mask, prune_count
from llmprune.math.solvers.sparsegpt import all_finite

# The official rho schedule (alps.py:176-199): thresholds on (changed support) / (kept weights).
FAST_CHANGE, FAST_GROWTH = 0.1, 1.3
MEDIUM_CHANGE, MEDIUM_GROWTH = 0.005, 1.2
SLOW_GROWTH, SHRINK = 1.1, 5.0
SWITCH_CHANGE = 0.0003
NORM_EPS = 1e-8


def _normalise(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, s): the damped Hessian scaled to unit diagonal, and the scale s (in,)."""
    A = H.clone()
    A.diagonal().add_(percdamp * A.diagonal().mean())
    s = A.diagonal().sqrt() + NORM_EPS  # (in,)
    A /= s.unsqueeze(0)
    A /= s.unsqueeze(1)
    return A, s


def _project(Z: torch.Tensor, prune: int, n: int | None, m: int | None) -> torch.Tensor:
    """Mask (True = pruned) of the smallest |Z|: ``prune`` of the whole layer, or m - n per N:M group."""
    score = Z.square()
    if m is not None:
        return nm_mask(score, n, m)
    return lowest_along_last(score.reshape(-1), prune).view_as(Z)


class _ShiftedInverse:
    """(A + rho I)^-1 from one eigendecomposition of A, rebuilt only when rho changes."""

    def __init__(self, A: torch.Tensor):
        L, Q = torch.linalg.eigh(A.double())  # float64 as the official code
        self.L, self.Q = L, Q.float()  # (in,), (in, in)
        self.rho = None
        self.inv = None

    def __call__(self, rho: float) -> torch.Tensor:
        if rho != self.rho:
            scale = (1.0 / (self.L + rho)).float()  # (in,)
            self.inv = (self.Q * scale.unsqueeze(0)) @ self.Q.t()
            self.rho = rho
        return self.inv


def _next_rho(change: int, kept: float, rho: float, grown: bool) -> tuple[float, bool, str]:
    """The official schedule: (new rho, rho has grown, "go" | "reset" | "stop")."""
    if change / kept > FAST_CHANGE:
        return rho * FAST_GROWTH, True, "go"
    if change / kept > MEDIUM_CHANGE:
        return rho * MEDIUM_GROWTH, True, "go"
    if change > 0:
        return (rho * SLOW_GROWTH, grown, "go") if grown else (rho / SHRINK, grown, "reset")
    return (rho, grown, "stop") if grown else (rho / SHRINK, grown, "go")


def _admm(A: torch.Tensor, B0: torch.Tensor, C: torch.Tensor, prune: int, n: int | None, m: int | None,
          kept: float, rho: float, max_iter: int, update_iter: int, switch_iter: int,
          rho_max: float) -> tuple[torch.Tensor, dict]:
    """ADMM with the adaptive penalty; returns the last B (dense) and counters."""
    inverse = _ShiftedInverse(A)
    prev_mask = _project(B0, prune, n, m)  # (out, in)
    D_init = B0.masked_fill(prev_mask, 0.0)
    D, V = D_init.clone(), torch.zeros_like(B0)
    B, grown, resets, it = B0, False, 0, 0
    for it in range(max_iter):
        B = (C - V + rho * D) @ inverse(rho)  # (out, in)
        Z = (V + rho * B) / rho
        mask = _project(Z, prune, n, m)
        D = Z.masked_fill_(mask, 0.0)
        V += rho * (B - D)
        if (it + 1) % update_iter:
            continue
        if not all_finite(B):
            raise LlmpruneError(f"ALPS ADMM diverged (non-finite weights after {it + 1} iterations): "
                                "check the layer's weights and calibration for Inf/NaN or raise percdamp")
        change = int((mask != prev_mask).sum().item())
        rho, grown, action = _next_rho(change, kept, rho, grown)
        if action == "stop":
            break
        if action == "reset":
            B, D, V, resets = B0.clone(), D_init.clone(), torch.zeros_like(B0), resets + 1
        prev_mask = mask
        rho = min(rho, rho_max)
        if it >= switch_iter and change / kept < SWITCH_CHANGE:
            break
    return B, {"iterations": it + 1, "rho_final": rho, "resets": resets}


def _cg(A: torch.Tensor, C: torch.Tensor, X: torch.Tensor, keep: torch.Tensor, iters: int,
        rtol: float) -> tuple[torch.Tensor, int]:
    """CG on A_SS x_S = C_S for each row (support ``keep``), from X; the official stopping test."""
    AX = X @ A  # (out, in), kept up to date below
    R = (C - AX) * keep
    stop = rtol * torch.linalg.vector_norm(C, dim=0)  # (in,): official norms over the outputs
    P, rz_prev, steps = R, None, 0
    for _ in range(iters):
        steps += 1
        rz = (R * R).sum(dim=1, keepdim=True)  # (out, 1)
        if rz_prev is not None:
            P = R + rz / torch.where(rz_prev == 0, 1e-8, rz_prev) * P
        AP = P @ A
        den = (P * AP).sum(dim=1, keepdim=True)
        alpha = rz / torch.where(den == 0, 1e-8, den)
        X = X + alpha * P
        AX += alpha * AP
        R = (R - alpha * AP) * keep
        rz_prev = rz
        if bool((torch.linalg.vector_norm(AX - C, dim=0) <= stop).all()):
            break
    return X, steps


def _relative_error(A: torch.Tensor, B: torch.Tensor, B0: torch.Tensor, total: float) -> float:
    """tr((B - B0) A (B - B0)^T) / tr(B0 A B0^T): the official ``error``."""
    E = B - B0
    return float(((E @ A) * E).sum().item()) / total


def alps_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, n: int | None = None,
               m: int | None = None, *, rho: float = 0.1, max_iter: int = 300, update_iter: int = 3,
               switch_iter: int = 30, rho_max: float = 1e6, percdamp: float = 0.01, pcg_iters: int = 10,
               pcg_rtol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prune ``weight`` (out, in) given ``hessian`` (in, in) = 2/tokens * sum x x^T with ALPS.

    ``sparsity``: unstructured fraction, compared over the whole layer; or ``n``/``m``: N kept of every
    M consecutive input weights. Defaults are the official ones (``rho`` 0.1 as llama.py/opt.py pass
    it, 300 iterations, checks every 3, switch after 30, rho <= 1e6, 1% damping, 10 CG iterations at
    rtol 1e-4). Returns (new weight float32, mask bool True = pruned, info).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
    W = weight.detach().to(torch.float32, copy=True)  # (out, in)
    H = hessian.detach().to(device=W.device, dtype=torch.float32)  # (in, in)
    if not all_finite(H):
        raise LlmpruneError("ALPS Hessian has NaN/Inf entries: the calibration activations overflowed; "
                            "calibrate in float32 or with fewer/shorter samples")
    if m is not None:
        nm_mask(W[:1], n, m)  # validates the pattern against in_features (raises LlmpruneError)
        prune, kept = 0, W.numel() * n / m
    else:
        prune = prune_count(sparsity, W.numel())
        kept = W.numel() - prune
        if prune == 0:
            return W, torch.zeros_like(W, dtype=torch.bool), {
                "iterations": 0, "rho_final": rho, "resets": 0, "admm_error": 0.0, "cg_iterations": 0,
                "error": 0.0}
    A, s = _normalise(H, percdamp)
    B0 = W * s  # (out, in)
    C = B0 @ A  # (out, in): the official YtX
    total = float((C * B0).sum().item())
    B, info = _admm(A, B0, C, prune, n, m, kept, rho, max_iter, update_iter, switch_iter, rho_max)
    mask = _project(B, prune, n, m)
    B = B.masked_fill(mask, 0.0)
    info["admm_error"] = _relative_error(A, B, B0, total)
    B, info["cg_iterations"] = _cg(A, C, B, (~mask).float(), pcg_iters, pcg_rtol)
    info["error"] = _relative_error(A, B, B0, total)
    W = B / s
    if not (all_finite(W) and math.isfinite(info["error"])):
        raise LlmpruneError(f"ALPS ADMM diverged (non-finite weights after {info['iterations']} "
                            "iterations): check the layer's weights and calibration for Inf/NaN or "
                            "raise percdamp")
    return W, mask, info
