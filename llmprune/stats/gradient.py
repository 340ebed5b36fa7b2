"""Block-local ("regional") gradients: Wanda++'s statistic (Yang et al. 2025, arXiv:2503.04992).

For calibration window n entering the block as X_n, the loss is the L2 norm of the block's output,
L_n = ||f(X_n; W)||_2, and each prunable weight's regional gradient is dL_n/dW, from a backward
pass through this one block only (the rest of the model is never differentiated). The windows'
gradients are aggregated as a root mean square,

    G_ij = sqrt( mean over windows n of (dL_n / dW_ij)^2 ),

as GBLM-Pruner aggregates per-sample gradients (Wanda++ has no official code; the RMS and the
plain norm, rather than its square, are our reading of the paper). Each window is differentiated
alone, so a window's gradient is not mixed with another's whatever the calibration batch.
"""

from __future__ import annotations

import torch
from torch import nn

from llmprune.blocks import block_output
from llmprune.registry import COLLECTORS, CollectorSpec

NAME = "regional_grad"


def _memory(in_features: int, tokens: int, block_params: int) -> int:
    """One window's activations kept for the backward pass (about 24 floats per token and
    hidden unit for a LLaMA block), plus one float32 sum and one gradient per block weight."""
    return 24 * tokens * in_features * 4 + 3 * block_params * 4


def regional_gradients(block: nn.Module, hidden: torch.Tensor, kwargs: dict, layers: dict,
                       device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """G (out, in) float32 for every layer of ``layers`` (name -> nn.Linear inside ``block``),
    from the windows ``hidden`` (windows, seqlen, hidden) through the block's current weights."""
    dev = device if device is not None else hidden.device
    weights = {name: layer.weight for name, layer in layers.items()}
    params = list(block.parameters())
    flags = [p.requires_grad for p in params]
    sums = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
    try:
        for p in params:  # gradients for the prunable weights only
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for n in range(hidden.shape[0]):
                out = block_output(block(hidden[n:n + 1].to(dev), **kwargs))  # (1, seqlen, hidden)
                loss = out.float().norm()
                grads = torch.autograd.grad(loss, list(weights.values()))
                for (name, _), g in zip(weights.items(), grads):
                    sums[name] += g.float().square()
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    windows = max(hidden.shape[0], 1)
    return {name: s.div_(windows).sqrt_() for name, s in sums.items()}


COLLECTORS.add(CollectorSpec(NAME, "block-local gradient of the block output's L2 norm per weight (Wanda++)",
                             "block", regional_gradients, backward=True, memory=_memory))
