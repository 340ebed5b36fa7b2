"""Pruning scores: how much each weight matters, before any mask is chosen.

Idea: a weight whose removal changes the layer's output least should go first. Three metrics,
the Wanda paper's ablation axis (Sun et al. 2023, "A Simple and Effective Pruning Approach for
Large Language Models", arXiv:2306.11695, Table 9):

    weight      S_ij = |W_ij|                      (magnitude pruning, Han et al. 2015)
    activation  S_ij = ||X_j||_2                   (input-channel norm only)
    wanda       S_ij = |W_ij| * ||X_j||_2          (Wanda)

where ``||X_j||_2 = sqrt(sq_norm_j / tokens)`` and ``sq_norm_j = sum over calibration tokens of
x_j**2``, accumulated in float32. It is the square root, the norm, not its square: ranking by
``|W| * ||x||**2`` over-weights outlier channels and gives a different mask. (The locuslab/wanda
code keeps the mean over samples rather than tokens; a constant factor, the same ranking.)

Pure math: tensors in, tensors out.
"""

from __future__ import annotations

import torch

from llmprune.errors import LlmpruneError

# Metrics that read calibration statistics (the rest need no data at all).
from llmprune.math import (
    ACTIVATION_METRICS,  # noqa: E402,F401  (re-exported)
    METRICS,
)


def input_norm(sq_norm: torch.Tensor, tokens: int) -> torch.Tensor:
    """Per-input-channel L2 norm ``sqrt(sq_norm / tokens)``, float32, shape (in,)."""
    if tokens <= 0:
        raise LlmpruneError(
            "no calibration tokens reached this layer: check the calibration data (nsamples, seqlen)"
        )
    return torch.sqrt(sq_norm.float() / tokens)  # (in,)


def score(weight: torch.Tensor, sq_norm: torch.Tensor | None, tokens: int, metric: str) -> torch.Tensor:
    """Importance of each weight of a Linear layer: higher = keep. Returns (out, in) float32.

    ``weight`` is (out, in); ``sq_norm`` is (in,), the sum over calibration tokens of x_j**2,
    and may be None only for the "weight" metric.
    """
    if metric not in METRICS:
        raise LlmpruneError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    w = weight.detach().float()  # (out, in)
    if metric == "weight":
        return w.abs()
    if sq_norm is None:
        raise ValueError(f"metric {metric!r} needs the input norms (sq_norm), got None")
    if sq_norm.shape != (w.shape[1],):
        raise ValueError(f"sq_norm has shape {tuple(sq_norm.shape)}, expected ({w.shape[1]},)")
    norm = input_norm(sq_norm.to(w.device), tokens).unsqueeze(0)  # (1, in)
    if metric == "activation":
        return norm.expand_as(w).clone()
    return w.abs() * norm  # wanda


def ria_score(weight: torch.Tensor, sq_norm: torch.Tensor, tokens: int, a: float = 0.5) -> torch.Tensor:
    """RIA, Relative Importance and Activations (Zhang et al., ICLR 2024, "Plug-and-Play: An
    Efficient Post-training Pruning Method for Large Language Models"; official code
    biomedical-cybernetics/Relative-importance-and-activation-pruning ``lib/prune.py``)::

        S_ij = (|W_ij| / sum_k |W_kj|  +  |W_ij| / sum_k |W_ik|) * ||X_j||_2 ** a

    the weight's share of its input column plus its share of its output row, times the input
    channel's norm to the power ``a`` (official default 0.5). ``||X_j||`` here is per token; the
    official code's per-sample sums differ by a constant factor, which no ranking sees.
    Returns (out, in) float32; higher = keep.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    w = weight.detach().float().abs()  # (out, in)
    if sq_norm is None or sq_norm.shape != (w.shape[1],):
        raise ValueError(f"ria needs sq_norm of shape ({w.shape[1]},)")
    relative = w / w.sum(dim=0, keepdim=True) + w / w.sum(dim=1, keepdim=True)  # column share + row share
    return relative * input_norm(sq_norm.to(w.device), tokens).unsqueeze(0) ** a
