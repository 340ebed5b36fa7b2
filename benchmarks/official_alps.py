"""Literal re-implementation of the official ALPS layer solver, for parity checks.

mazumder-lab/ALPS at commit 8af9e6b5c8b1b06a028bde6065e5c38829df3a19, ``alps.py``:
``ALPS_prune.add_batch`` (XtX += X^T X, never averaged), ``ALPS_prune.ALPS_admm`` (ridge, unit-diagonal
normalisation, ADMM with the adaptive rho, top-k projection, the CG back-solve) and ``cg_batch``.
Step by step as the official code does it: its variable names, its (in, out) layout of B, its float64
eigendecomposition and float64 inverse cast to float32, its per-check error computation (used only
by a commented-out print), its three A-products per CG iteration. The only changes: the hard-coded
``'cuda:0'`` becomes the device of the inputs, and the layer object becomes tensors in and out.

Call defaults as the official scripts: ``llama.py:121`` and ``opt.py:124`` call
``ALPS_admm(sp=args.sp, nm_n=args.nm_n, nm_m=args.nm_m, rho=0.1)`` (the ``--rho`` flag is only used in
the result file's name), so rho=0.1, max_iter=300, update_iter=3, switch_iter=30 (alps.py:72).

    new_weight, mask = official_alps(weight, sp=0.7, X=inputs)          # raw inputs (tokens, in)
    new_weight, mask = official_alps(weight, sp=0.0, nm_n=2, nm_m=4, XtX=XtX)
    XtX = xtx_from_llmprune(H, tokens)                                   # from llmprune's 2 X^T X / tokens
"""

from __future__ import annotations

import numpy as np
import torch


def xtx_from_llmprune(hessian: torch.Tensor, tokens: int) -> torch.Tensor:
    """llmprune's H = 2 X^T X / tokens -> the official XtX = X^T X (alps.py:68)."""
    return hessian.float() * (tokens / 2.0)


def _project(B, totp, num_cout, k_spar, nm_n, nm_m, new_dim, dev):
    """alps.py:227-236 (the same block appears at 128-144, 155-165, 203-212): out-of-place here."""
    if nm_n == 0:
        B = B.clone().reshape(-1)
        _, loss_idx = torch.topk(-B ** 2, totp * num_cout - k_spar)
        B[loss_idx] = 0
        return B.reshape(totp, num_cout)
    B = B.t().reshape((new_dim, nm_m))
    _, loss_idx = torch.topk(-B ** 2, nm_m - nm_n, dim=1)
    B = B.scatter(src=torch.zeros((new_dim, nm_m - nm_n)).to(dev), dim=1, index=loss_idx)
    return B.reshape(num_cout, totp).t()


def cg_batch(A, B, A_supp, X0, rtol=1e-3, atol=0., maxiter=None):
    """alps.py:280-396, M_bmm=None (identity), one system per column of B (in, out)."""
    n, m = B.shape
    X_k = X0
    R_k = B - A @ X_k  # alps.py:318
    R_k = R_k * A_supp
    Z_k = R_k
    P_k = torch.zeros_like(Z_k)
    P_k1, R_k1, R_k2, X_k1, Z_k1, Z_k2 = P_k, R_k, R_k, X0, Z_k, Z_k
    B_norm = torch.norm(B, dim=1)  # alps.py:332: norms over the outputs, per input
    stopping_matrix = torch.max(rtol * B_norm, atol * torch.ones_like(B_norm))
    for k in range(1, maxiter + 1):  # alps.py:340
        Z_k = R_k
        if k == 1:
            P_k, R_k1, X_k1, Z_k1 = Z_k, R_k, X_k, Z_k
        else:
            R_k2, Z_k2, P_k1, R_k1, Z_k1, X_k1 = R_k1, Z_k1, P_k, R_k, Z_k, X_k
            denominator = (R_k2 * Z_k2).sum(0)
            denominator[denominator == 0] = 1e-8
            beta = (R_k1 * Z_k1).sum(0) / denominator
            P_k = Z_k1 + beta.unsqueeze(0) * P_k1
        denominator = (P_k * (A @ P_k)).sum(0)  # alps.py:361
        denominator[denominator == 0] = 1e-8
        alpha = (R_k1 * Z_k1).sum(0) / denominator
        X_k = X_k1 + alpha.unsqueeze(0) * P_k
        R_k = R_k1 - alpha.unsqueeze(0) * (A @ P_k)
        R_k = R_k * A_supp
        residual_norm = torch.norm(A @ X_k - B, dim=1)  # alps.py:369: the full residual
        if (residual_norm <= stopping_matrix).all():
            break
    return X_k


def _rho_update(supp_change, k_spar, rho, init_rho, B, D, V, B_orig, D_init, dev):
    """alps.py:176-195; returns (rho, init_rho, B, D, V, stop)."""
    if supp_change / k_spar > 0.1:
        return rho * 1.3, True, B, D, V, False
    if supp_change / k_spar > 0.005:
        return rho * 1.2, True, B, D, V, False
    if supp_change > 0.5:
        if init_rho:
            return rho * 1.1, init_rho, B, D, V, False
        B = B_orig.clone().to(dev)
        return rho / 5, init_rho, B, D_init.clone().to(dev), torch.zeros_like(B).to(dev), False
    if init_rho:
        return rho, init_rho, B, D, V, True
    return rho / 5, init_rho, B, D, V, False


def _ridge_and_normalise(XtX, W):
    """alps.py:85-96: 1% ridge, unit diagonal; returns (XtX, X_norm, YtX)."""
    damp1 = 0.01 * torch.mean(torch.diag(XtX)).item()  # alps.py:86
    diag = torch.arange(XtX.shape[0], device=XtX.device)
    XtX[diag, diag] += damp1
    X_norm = torch.diag(XtX).sqrt() + 1e-8  # alps.py:91
    XtX = XtX / X_norm
    XtX = (XtX.T / X_norm).T
    YtX = torch.matmul(W * X_norm, XtX)  # alps.py:96, (out, in)
    return XtX, X_norm, YtX


def official_alps(weight: torch.Tensor, sp: float, nm_n: int = 0, nm_m: int = 0, *,
                  X: torch.Tensor | None = None, XtX: torch.Tensor | None = None, rho: float = 0.1,
                  max_iter: int = 300, update_iter: int = 3,
                  switch_iter: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """``ALPS_admm`` on weight (out, in) with XtX = X^T X (or X (tokens, in)).

    Returns (new weight (out, in), mask True = pruned)."""
    dev = weight.device
    if XtX is None:
        X = X.reshape(-1, X.shape[-1]).float()
        XtX = X.t() @ X  # alps.py:68 (inp is (in, tokens) there)
    W = weight.clone().float()  # alps.py:75-76
    XtX, X_norm, YtX = _ridge_and_normalise(XtX.clone().float(), W)
    B = (W * X_norm).t().clone()  # alps.py:103, (in, out)
    B_orig = B.clone()
    V = torch.zeros_like(B)
    D_supp = torch.zeros_like(B)
    totp, num_cout = B.shape
    L, Q = torch.linalg.eigh(XtX.double())  # alps.py:113
    XTX_inv = (Q @ ((1 / (L + rho)) * Q).T).float()
    init_rho = False
    Res0 = torch.sum(B_orig * YtX.T)  # alps.py:120-122
    params = B.shape[0] * B.shape[1]
    k_spar = int(np.round((1 - sp) * params))  # alps.py:125: the KEPT count
    new_dim = 0
    if nm_n != 0:
        new_dim = int(totp * num_cout / nm_m)  # alps.py:135-137
        k_spar = totp * num_cout * nm_n / nm_m
    proj = (totp, num_cout, k_spar if nm_n == 0 else 0, nm_n, nm_m, new_dim, dev)
    D = _project(B, *proj)  # alps.py:128-144
    D_suppp = (D == 0).to(torch.float)
    D_init = D.clone()
    for i_admm in range(max_iter):  # alps.py:148
        B = XTX_inv @ (YtX.T - V + rho * D)
        D = _project((V + rho * B) / rho, *proj)
        D_supp = (D == 0).to(torch.float)
        V = V + rho * (B - D)
        if (i_admm + 1) % update_iter == 0:  # alps.py:169
            supp_change = torch.sum((D_supp - D_suppp) ** 2)
            rho, init_rho, B, D, V, stop = _rho_update(supp_change, k_spar, rho, init_rho, B, D, V,
                                                       B_orig, D_init, dev)
            if stop:
                break
            D_suppp = D_supp.clone()
            if rho > 1e6:
                rho = 1e6
            XTX_inv = (Q @ ((1 / (L + rho)) * Q).T).float()  # alps.py:201
            Btest = _project(B, *proj)  # alps.py:203-215: only for a commented-out print
            Resc = torch.matmul(XtX, Btest) - YtX.T
            Resc = torch.diag(torch.matmul((Btest - B_orig).t(), Resc))
            _errorc = (torch.sum(Resc) / Res0).item()
            if nm_n == 0:
                B = Btest  # alps.py:204: B.reshape(-1) is a view, the official zeroes B in place
            if i_admm >= switch_iter and supp_change / k_spar < 0.0003:  # alps.py:224
                break
    B = _project(B, *proj)  # alps.py:227-236
    B = cg_batch(XtX, YtX.T, (B != 0).to(torch.float), X0=B, rtol=1e-4, atol=0., maxiter=10)  # :251
    new_weight = (B.t() / X_norm)  # alps.py:268
    return new_weight, new_weight == 0
