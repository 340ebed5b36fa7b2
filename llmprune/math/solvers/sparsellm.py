"""SparseLLM: prune a gated MLP's three layers together through auxiliary activations.

Paper: Bai et al. 2024, "SparseLLM: Towards Global Pruning of Pre-trained Language Models",
NeurIPS, arXiv:2402.17946. Official code: github:BaiTheBest/SparseLLM, ``llama_sparsellm`` in
``model_utils.py`` (commit 27fe26a; full step-by-step account with line numbers in the spec).

Idea: SparseGPT prunes each Linear on its own, so the errors of gate/up are never corrected by
down. SparseLLM splits the MLP ``Y = W_d (act(W_g X) * (W_u X))`` at its activations with the
auxiliary variables s (gate output), z (up output) and p (down input) and minimises

    alpha ||s - W_g X||^2 + alpha ||z - W_u X||^2 + gamma ||p - act(s) * z||^2 + beta ||Y - W_d p||^2

over sparse W and free s, z, p, where X are the MLP's inputs and Y the *dense* MLP's output on the
same X. Rows below are tokens (our layout; the official code holds them as columns).
Initialisation: s, z, p are the dense activations. Iteration t = 0 .. iterations-1:

    1. t > 0 only: refit the dense weights by least squares,
         W_u = (X^+ z)^T, W_g = (X^+ s)^T, W_d = (p^+ Y)^T          (^+ : pseudo-inverse)
    2. prune each with SparseGPT (``sparsegpt_prune``, a fresh mask every time): gate and up with
       H = 2 X^T X / tokens, down with H = 2 p^T p / tokens of the current p;
    3. (not after the last pruning: these no longer change the weights)
         p = (beta W_d^T W_d + gamma I)^-1 (beta W_d^T Y + gamma act(s) * z)      (row form)
         z = (alpha W_u X + gamma act(s) * p) / (alpha + gamma act(s)^2)
         s: ``s_steps`` gradient steps of size ``s_lr`` on alpha||s - W_g X||^2
            + gamma||p - act(s) * z||^2 (official: 2 steps of 0.01)
    4. record loss_t = mean (Y - MLP_sparse(X))^2 (the official ``train_loss``).

The weights of the *last* pruning are returned (as the official code does; not the best
iteration; ``info["losses"]`` shows the trajectory). With ``iterations=1`` this is plain SparseGPT
on the three layers. Official defaults for LLaMA: alpha = beta = gamma = 5, 4 iterations (1 for
the blocks 1, 30 and 31 of LLaMA-2-7B, a per-model hack left to the caller), SparseGPT with
percdamp 0.01, blocksize 128; attention layers get plain SparseGPT.

Our port differs from the official code in:
  * float32 throughout; the official code keeps X^+, p^+, s, z, p, the weights and
    (beta W^T W + gamma I)^-1 in the model's dtype (float16 for LLaMA-2).
  * z's update is the exact minimiser for any alpha, gamma; the official
    ``(W_u X + act(s) p) / (act(s)^2 + 1)`` is that formula for alpha == gamma only (its default).
  * p is solved with a Cholesky factorisation, not ``torch.inverse`` then a product.
  * the least-squares refits X^+ z, p^+ Y are solved by the normal equations in float64 (a
    Cholesky factor of XᵀX computed once): for inputs of full column rank that is the
    pseudo-inverse's solution, at a fraction of the SVDs' cost (they were 90% of the time, 18-35x
    SparseGPT on SmolLM2's MLP); cond(XᵀX) = cond(X)² ~ 1.5e8 there, far inside float64. A
    rank-deficient X or p takes the pseudo-inverse (torch's default cutoff, not rcond 1e-15,
    which in float32 would invert rounding noise).
  * s's gradient is formed in one pass (the official loops over chunks of 1000 tokens; every
    token's gradient is independent, so the steps are the same).
  * SparseGPT masks: exact counts per 128-column block (``sparsegpt_prune``), where the official
    ``fasterprune`` prunes ``<= sorted[int(s * numel)]``, one more per block plus ties.
  * ``compound_damping=True`` (default) reproduces an aliasing effect of the official code:
    ``fasterprune`` damps the layer's stored Hessian in place, and gate/up keep theirs for all
    iterations, so iteration t (0-based) runs with percdamp_eff = (1 + percdamp)^(t+1) - 1
    (0.01, 0.0201, 0.0303, 0.0406); down's Hessian is rebuilt from p each time (percdamp).
  * the last iteration's auxiliary updates are skipped (they cannot change the result).

N:M: ``n`` KEPT of every ``m`` (the official ``--prunen`` counts pruned weights: prunen = m - n).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llmprune.errors import LlmpruneError
from llmprune.math.solvers.sparsegpt import all_finite, sparsegpt_prune

ITERATIONS = 4  # official ``opt_epochs`` for LLaMA
ALPHA = BETA = GAMMA = 5.0  # official LLaMA penalties (OPT uses 0.1)
S_LR, S_STEPS = 0.01, 2  # official ``s_learning_rate``, ``s_update_epochs``
_FIX = "use more calibration samples, fewer --sparsellm-iterations or a larger --percdamp"


def _check(what: str, tensors: list[torch.Tensor], step: int) -> None:
    if not all(all_finite(t) for t in tensors):
        raise LlmpruneError(f"SparseLLM diverged (non-finite {what} after {step} iterations): {_FIX}")


def _act_grad(act: Callable[[torch.Tensor], torch.Tensor], s: torch.Tensor) -> torch.Tensor:
    """act'(s) elementwise; autograd on a copy, usable from inside no_grad/inference_mode."""
    if act is F.silu:
        sig = torch.sigmoid(s)
        return sig * (1 + s * (1 - sig))
    with torch.inference_mode(False), torch.enable_grad():
        leaf = s.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(act(leaf).sum(), leaf)
    return grad.detach()


def _mlp(x: torch.Tensor, w: dict[str, torch.Tensor], act: Callable) -> torch.Tensor:
    return (act(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T  # (tokens, hidden)


def _update_p(down: torch.Tensor, y: torch.Tensor, a: torch.Tensor, beta: float,
              gamma: float) -> torch.Tensor:
    """argmin_p beta||Y - p W_d^T||^2 + gamma||p - a||^2 (rows), a = act(s) * z: (tokens, inter)."""
    lhs = beta * down.T @ down  # (inter, inter)
    lhs.diagonal().add_(gamma)
    lower, info = torch.linalg.cholesky_ex(lhs)
    if info.item() != 0:
        raise LlmpruneError("SparseLLM: beta W_d^T W_d + gamma I is not positive definite; use gamma > 0")
    rhs = beta * y @ down + gamma * a  # (tokens, inter)
    return torch.cholesky_solve(rhs.T, lower).T


def _update_z(ux: torch.Tensor, sig: torch.Tensor, p: torch.Tensor, alpha: float,
              gamma: float) -> torch.Tensor:
    """argmin_z alpha||z - W_u X||^2 + gamma||p - act(s) * z||^2, elementwise (tokens, inter)."""
    return (alpha * ux + gamma * sig * p) / (alpha + gamma * sig ** 2)


def _update_s(s: torch.Tensor, gx: torch.Tensor, z: torch.Tensor, p: torch.Tensor, act: Callable,
              alpha: float, gamma: float, lr: float, steps: int) -> torch.Tensor:
    """Gradient steps on alpha||s - W_g X||^2 + gamma||p - act(s) * z||^2 (summed, as official)."""
    for _ in range(steps):
        grad = 2 * alpha * (s - gx) - 2 * gamma * (p - act(s) * z) * z * _act_grad(act, s)
        s = s - lr * grad
    return s


def _gram(a: torch.Tensor) -> torch.Tensor | None:
    """The Cholesky factor of aᵀa in float64 (None when aᵀa is singular: then the pseudo-inverse)."""
    a64 = a.double()
    lower, info = torch.linalg.cholesky_ex(a64.T @ a64)
    return lower if info.item() == 0 else None


def _lstsq(a: torch.Tensor, b: torch.Tensor, lower: torch.Tensor | None = None) -> torch.Tensor:
    """a⁺ b, the least-squares solution of a w = b (a (tokens, k) of full column rank): by the
    normal equations in float64, which give the pseudo-inverse's solution for a full-rank ``a``
    at a fraction of an SVD's cost (cond(aᵀa) = cond(a)², ~1e8 for SmolLM2's MLP inputs, far
    inside float64); a rank-deficient ``a`` takes the pseudo-inverse, as the official code."""
    if lower is None:
        lower = _gram(a)
    if lower is None:
        return torch.linalg.pinv(a) @ b
    return torch.cholesky_solve(a.double().T @ b.double(), lower).to(torch.float32)


def _prune_all(dense: dict[str, torch.Tensor], h_x: torch.Tensor, h_p: torch.Tensor, damp_x: float,
               prune: dict) -> tuple[dict, dict, dict]:
    """SparseGPT on gate and up (inputs X) and down (inputs p): weights, masks, OBS losses."""
    weights, masks, losses = {}, {}, {}
    for name in ("up", "gate", "down"):  # the official order (independent of each other)
        h, damp = (h_p, prune["percdamp"]) if name == "down" else (h_x, damp_x)
        weights[name], masks[name], info = sparsegpt_prune(dense[name], h, percdamp=damp, **prune["kw"])
        losses[name] = info["loss"]
    return weights, masks, losses


def _validate(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, x: torch.Tensor,
              iterations: int, gamma: float) -> None:
    inter, hidden = gate.shape
    if up.shape != (inter, hidden) or down.shape != (hidden, inter):
        raise ValueError(f"gate {tuple(gate.shape)}, up {tuple(up.shape)}, down {tuple(down.shape)}: "
                         "expected gate/up (inter, hidden) and down (hidden, inter)")
    if x.dim() != 2 or x.shape[1] != hidden:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected (tokens, {hidden})")
    if iterations < 1:
        raise LlmpruneError(f"--sparsellm-iterations {iterations} must be at least 1")
    if gamma <= 0:
        raise LlmpruneError(f"SparseLLM gamma {gamma} must be > 0 (it regularises the solve for p)")


def sparsellm_mlp(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, x: torch.Tensor,
                  target: torch.Tensor | None, sparsity: float, n: int | None = None,
                  m: int | None = None, *, act: Callable[[torch.Tensor], torch.Tensor] = F.silu,
                  iterations: int = ITERATIONS, alpha: float = ALPHA, beta: float = BETA,
                  gamma: float = GAMMA, s_lr: float = S_LR, s_steps: int = S_STEPS,
                  percdamp: float = 0.01, blocksize: int = 128, compound_damping: bool = True,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Prune a gated MLP ``down(act(gate x) * up x)`` jointly (see the module docstring).

    ``gate``/``up`` (inter, hidden), ``down`` (hidden, inter): dense weights; ``x`` (tokens, hidden):
    the MLP's inputs (after the norm); ``target`` (tokens, hidden): what the sparse MLP should
    output, None for the dense MLP's output on ``x`` (the official target). ``sparsity`` or
    ``n``/``m`` (N kept of every M) as in ``sparsegpt_prune``. Returns ({"gate", "up", "down"}
    -> float32 weight, same keys -> bool mask (True = pruned), info) with info "iterations",
    "losses" (MSE of the sparse MLP to the target after each pruning; the first is plain
    SparseGPT's), "loss" (the last), "sparsegpt_loss" (last OBS losses per layer), "percdamp_x".
    """
    _validate(gate, up, down, x, iterations, gamma)
    dense = {k: w.detach().to(torch.float32) for k, w in (("gate", gate), ("up", up), ("down", down))}
    x = x.detach().to(torch.float32)
    tokens = x.shape[0]
    s, z = x @ dense["gate"].T, x @ dense["up"].T  # (tokens, inter)
    p = act(s) * z  # (tokens, inter): the dense down_proj inputs
    y = p @ dense["down"].T if target is None else target.detach().to(torch.float32)  # (tokens, hidden)
    h_x = 2 * x.T @ x / tokens  # (hidden, hidden)
    x_gram = None
    prune = {"percdamp": percdamp, "kw": {"sparsity": sparsity, "n": n, "m": m, "blocksize": blocksize}}
    losses: list[float] = []
    for step in range(iterations):
        if step > 0:
            if x_gram is None:
                x_gram = _gram(x)
            dense = {"gate": _lstsq(x, s, x_gram).T, "up": _lstsq(x, z, x_gram).T, "down": _lstsq(p, y).T}
            _check("refitted weights", list(dense.values()), step)
        damp_x = (1 + percdamp) ** (step + 1) - 1 if compound_damping else percdamp
        try:
            weights, masks, obs = _prune_all(dense, h_x, 2 * p.T @ p / tokens, damp_x, prune)
        except LlmpruneError as exc:
            if step == 0:  # plain SparseGPT on the dense weights: its own message says it all
                raise
            raise LlmpruneError(f"SparseLLM diverged (SparseGPT failed on the refitted weights after "
                                f"{step} iterations): {_FIX}") from exc
        losses.append(float(((_mlp(x, weights, act) - y) ** 2).mean().item()))
        if not math.isfinite(losses[-1]):
            raise LlmpruneError(f"SparseLLM diverged (non-finite output after {step + 1} iterations): {_FIX}")
        if step == iterations - 1:
            break
        sig = act(s)  # (tokens, inter), of the s before this round's updates (as official)
        p = _update_p(weights["down"], y, sig * z, beta, gamma)
        z = _update_z(x @ weights["up"].T, sig, p, alpha, gamma)
        s = _update_s(s, x @ weights["gate"].T, z, p, act, alpha, gamma, s_lr, s_steps)
        _check("auxiliary variables", [p, z, s], step + 1)
    info = {"iterations": iterations, "losses": losses, "loss": losses[-1], "sparsegpt_loss": obs,
            "percdamp_x": damp_x}
    return weights, masks, info
