"""Literal re-implementation of SparseLLM's LLaMA MLP step (github:BaiTheBest/SparseLLM).

Follows ``llama_sparsellm`` in ``model_utils.py`` and ``SparseGPT_LlaMA`` in ``pruning_utils.py``
at commit 27fe26a0caea5c42e91cbeddaee9711be6e17205, step by step, with their variable names,
their (features, tokens) column layout, their Hessian accumulation and their in-place damping.
Written from reading the code, not copied. Comments ``mu:N`` / ``pu:N`` cite model_utils.py /
pruning_utils.py lines.

What is NOT reproduced: the block loop, the hooks and the attention layers (plain SparseGPT,
``pu:221``); the caller passes the MLP's inputs X (captured in the dense forward of the block,
``mu:413`` -- the official code captures every Linear of the block in one dense pass when
``--true-sequential`` is off, its default and the only setting under which the MLP code runs)
and, optionally, the dense MLP output Y (``mu:446``, ``down_proj``'s output in that pass).

``dtype`` is the model's dtype, in which the official code stores activations, weights, the
pseudo-inverses and the p-system inverse (float16 for LLaMA-2 with ``torch_dtype='auto'``);
float32 by default so that tests on a CPU compare the algorithm, not the rounding.

    from benchmarks.official_sparsellm import official_llama_mlp
    weights, masks = official_llama_mlp(gate, up, down, X, sparsity=0.5, nsamples=32)
"""

from __future__ import annotations

import math

import torch
from torch import nn


def add_batch(H: torch.Tensor, nsamples: int, inp: torch.Tensor) -> int:
    """``SparseGPT_LlaMA.add_batch`` (pu:194-219) for one sample inp (1, seq, cols): running 2/n sum."""
    tmp = inp.shape[0]
    inp = inp.reshape((-1, inp.shape[-1])).t()
    H *= nsamples / (nsamples + tmp)
    nsamples += tmp
    inp = math.sqrt(2 / nsamples) * inp.float()
    H += inp.matmul(inp.t())
    return nsamples


def hessian_of(inp_cols: torch.Tensor, nsamples: int) -> torch.Tensor:
    """The Hessian of (cols, tokens) inputs fed as ``nsamples`` samples (pu:189, mu:526-540)."""
    tmp_p = inp_cols.T.reshape((nsamples, -1, inp_cols.size(0)))
    H = torch.zeros((inp_cols.size(0), inp_cols.size(0)), device=inp_cols.device)
    seen = 0
    for j in range(nsamples):
        seen = add_batch(H, seen, tmp_p[j].unsqueeze(0))
    return H


def fasterprune(W: torch.Tensor, H: torch.Tensor, sparsity: float, prunen: int = 0, prunem: int = 0,
                blocksize: int = 128, percdamp: float = 0.01, exact_count: bool = False,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``SparseGPT_LlaMA.fasterprune`` (pu:221-315). ``H`` is the layer's stored ``self.H``: it is
    modified IN PLACE (dead fix and damping, pu:237-247), as in the official code. Returns the
    float32 pruned W and the mask (True = pruned). ``exact_count`` (not official; for tests that
    isolate the one known difference): prune exactly the first int(s * numel) of a stable sort."""
    W = W.clone().float()
    rows, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns, device=W.device)
    H[diag, diag] += damp  # pu:247, in place on self.H
    Hc = torch.linalg.cholesky(H)
    Hc = torch.cholesky_inverse(Hc)
    Hinv = torch.linalg.cholesky(Hc, upper=True)
    full_mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh  # pu:271
            if exact_count:
                mask1 = torch.zeros(tmp.numel(), dtype=torch.bool, device=tmp.device)
                mask1[torch.sort(tmp.flatten(), stable=True).indices[:int(tmp.numel() * sparsity)]] = True
                mask1 = mask1.view_as(tmp)
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        full_mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, full_mask


def _update_s(s, X, z, p, w_gate, alpha, gamma, dtype):
    """s update (mu:598-629): 2 epochs of one gradient step per chunk of 1000 tokens, lr 0.01."""
    w = w_gate.to(dtype=torch.float32).requires_grad_(True)
    s_update_epochs = 2
    s_learning_rate = 0.01
    for _ in range(s_update_epochs):
        batch_size = 1000
        for k in range(0, s.size(-1), batch_size):
            chunk = slice(k, k + batch_size)
            X_batch = X[:, chunk].to(dtype=torch.float32).requires_grad_(True)
            z_batch = z[:, chunk].to(dtype=torch.float32).requires_grad_(True)
            p_batch = p[:, chunk].to(dtype=torch.float32).requires_grad_(True)
            s_batch = s[:, chunk].to(dtype=torch.float32).requires_grad_(True)
            with torch.enable_grad():
                loss_s = alpha * torch.norm(s_batch - torch.matmul(w, X_batch)) ** 2
                loss_s += gamma * torch.norm(p_batch - nn.functional.silu(s_batch) * z_batch) ** 2
            loss_s.backward()
            with torch.no_grad():
                s_batch -= s_learning_rate * s_batch.grad
            s_batch.grad.zero_()
            s[:, chunk] = s_batch.detach().to(dtype=dtype)
    return s


@torch.no_grad()
def official_llama_mlp(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, X_rows: torch.Tensor,
                       Y_rows: torch.Tensor | None = None, sparsity: float = 0.5, prunen: int = 0,
                       prunem: int = 0, percdamp: float = 0.01, blocksize: int = 128, opt_epochs: int = 4,
                       nsamples: int = 1, dtype: torch.dtype = torch.float32, exact_count: bool = False,
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The MLP part of ``llama_sparsellm`` (mu:418-635). ``X_rows`` (tokens, hidden) = the MLP
    inputs, tokens = nsamples * seqlen; ``Y_rows`` the dense MLP output (None: computed here as
    down_proj's output in the dense pass). ``prunen`` counts PRUNED weights of every ``prunem``
    (official). ``exact_count``: see ``fasterprune``. Returns ({"gate", "up", "down"} -> final
    weight in ``dtype``, -> mask)."""
    weight = {"mlp.gate_proj": gate.to(dtype).clone(), "mlp.up_proj": up.to(dtype).clone(),
              "mlp.down_proj": down.to(dtype).clone()}
    X_rows = X_rows.to(dtype)
    # the dense forward with hooks (mu:413): outputs of gate/up, input and output of down
    s_rows = X_rows @ weight["mlp.gate_proj"].T
    z_rows = X_rows @ weight["mlp.up_proj"].T
    p_rows = nn.functional.silu(s_rows) * z_rows
    if Y_rows is None:
        Y_rows = p_rows @ weight["mlp.down_proj"].T
    Y_rows = Y_rows.to(dtype)
    H = {"mlp.gate_proj": hessian_of(X_rows.T, nsamples), "mlp.up_proj": hessian_of(X_rows.T, nsamples),
         "mlp.down_proj": hessian_of(p_rows.T, nsamples)}  # each layer's own self.H (pu:189)
    alpha, beta, gamma = 5.0, 5.0, 5.0  # mu:435-437
    X, Y = X_rows.T, Y_rows.T  # mu:450, (hidden, tokens)
    z, p, s = z_rows.T.clone(), p_rows.T.clone(), s_rows.T.clone()  # mu:475-477, (inter, tokens)
    Xinv = torch.pinverse(X.to(dtype=torch.float32)).to(dtype)  # mu:482 (``.half()``)
    target_layer_names = ["mlp.up_proj", "mlp.gate_proj", "mlp.down_proj"]  # mu:418
    masks = {}
    for opt_step in range(opt_epochs):
        if opt_step > 0:  # optimize W (mu:493-517)
            weight["mlp.up_proj"] = torch.matmul(z, Xinv)
            pinv = torch.pinverse(p.to(dtype=torch.float32)).to(dtype)
            weight["mlp.down_proj"] = torch.matmul(Y, pinv)
            weight["mlp.gate_proj"] = torch.matmul(s, Xinv)
            H["mlp.down_proj"] = hessian_of(p, nsamples)  # mu:524-540
        for name in target_layer_names:  # prune W (mu:544-554)
            W, masks[name] = fasterprune(weight[name], H[name], sparsity, prunen=prunen, prunem=prunem,
                                         percdamp=percdamp, blocksize=blocksize, exact_count=exact_count)
            weight[name] = W.to(dtype)
        # optimize p (mu:561-577)
        next_weight = weight["mlp.down_proj"]
        m1 = beta * torch.matmul(next_weight.T, next_weight)
        m2 = gamma * torch.eye(m1.shape[0], device=m1.device)
        av = torch.inverse(m1 + m2).to(dtype=dtype)
        layer_nl_output = nn.functional.silu(s) * z
        m3 = beta * torch.matmul(next_weight.T, Y)
        m4 = gamma * layer_nl_output
        af = m3 + m4
        p = torch.matmul(av, af)
        # optimize z (mu:586-589)
        w = weight["mlp.up_proj"]
        m = torch.matmul(w, X)
        swish = nn.functional.silu(s)
        z = (m + swish * p) / (swish ** 2 + 1)
        # optimize s (mu:598-629)
        s = _update_s(s, X, z, p, weight["mlp.gate_proj"], alpha, gamma, dtype)
    names = {"mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}
    return ({names[k]: v for k, v in weight.items()}, {names[k]: masks[k] for k in names})


def llama_epochs(layer_index: int) -> int:
    """``opt_epochs`` of block ``layer_index`` (mu:440-442): 4, but 1 for blocks 1, 30 and 31."""
    return 1 if layer_index in (1, 30, 31) else 4
