"""Mask-fixed reconstruction: keep a given mask, re-solve the kept weights.

Idea: any method that only *chooses* a mask (magnitude, Wanda, RIA, DSnoT) leaves the kept
weights as they were, although the layer's output has lost the pruned weights' share. With the
mask fixed, the kept weights that minimise the layer reconstruction error ||W X - W' X||^2 can
be found column by column with the Optimal Brain Surgeon update, exactly the sweep SparseGPT
runs (Frantar & Alistarh 2023, arXiv:2301.00774), only with the mask given instead of chosen:

    err_i   = (w_i - q_i) / [chol(H^-1)]_ii          q_i = w_i where kept, 0 where pruned
    W[:, i:] -= err_i [chol(H^-1)]_{i, i:}           the later columns absorb the error

with H = 2 X X^T / tokens, the Hessian SparseGPT's hooks collect. The RIA code offers the same
(``--reconstruction``: ``fasterprune(mask=W_mask)``). Wanda's 2:4 mask plus this update is the
cheap route to SparseGPT-level 2:4 quality: the mask costs no Hessian inverse per column block,
the update one sweep.

Pure math: tensors in, tensors out (``sparsegpt_prune`` with ``fixed_mask``).
"""

from __future__ import annotations

import torch

from llmprune.math.solvers.sparsegpt import sparsegpt_prune


def reconstruct(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, percdamp: float = 0.01,
                blocksize: int = 128) -> tuple[torch.Tensor, dict]:
    """The kept weights of ``weight`` (out, in) re-solved for ``mask`` (True = pruned), given
    ``hessian`` (in, in). Returns (new weight float32 with zeros exactly where ``mask`` is True,
    info with the OBS "loss", damping used and dead inputs)."""
    new_weight, _, info = sparsegpt_prune(weight, hessian, 0.0, percdamp=percdamp, blocksize=blocksize,
                                          fixed_mask=mask)
    return new_weight, info
