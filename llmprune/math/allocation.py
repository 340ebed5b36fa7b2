"""Per-block sparsity allocation: how much of each decoder block to prune.

Uniform pruning removes the target fraction s from every block. At high sparsity that is not the
best split: some blocks hold the features that matter most.

owl    Outlier-Weighted Layerwise sparsity. Yin et al., "Outlier Weighed Layerwise Sparsity (OWL):
       A Missing Secret Sauce for Pruning LLMs to High Sparsity", ICML 2024, arXiv:2310.05175;
       official code luuyin/OWL ``lib/prune_all.py`` (``prune_wanda_outlier``,
       ``prune_sparsegpt_outlier``, ``prune_mag_outlier``, ``prune_wanda_outlier_structure``).
       What the official code does, and what is done here:

       * a "layer" is a **decoder block**: the Wanda scores |W_ij| * ||X_j|| of every Linear of the
         block are flattened and concatenated, and the block's outlier ratio is
         D = share of those scores above M x their mean (``check_outlier_mean``; the code keeps
         it in percent, the scale cancels below). The statistics come from a separate pass of the
         calibration windows through the *dense* model (no pruning between blocks), before any
         block is pruned; the Wanda score is used for D whatever the pruning method.
       * normalisation (unstructured): r = (D - min D) / (max D - min D) * 2 lambda, then
         r = r - mean(r) + (1 - s) is the block's *density*, and its sparsity is 1 - r. So the
         block sparsities span exactly 2 lambda, the block with the most outliers is pruned
         least, and their mean is exactly s (every block of a LLaMA model has the same number of
         weights, so the overall sparsity is s too). The official code does **not** clip to
         s +- lambda: the span is 2 lambda but it is centred on the mean, so when D is skewed
         one side reaches further than lambda from s. A block sparsity <= 0 becomes 0.01 as in the
         official code; one >= 1 becomes 0.99 (the official code would prune the whole block).
       * N:M (``prune_wanda_outlier_structure``, Wanda only): r = (D - min) / (max - min) *
         Lamda, r = round(r - mean(r)) (numpy's round half to even), and the block prunes
         ``prune_n - r`` of every M weights. The official Lamda counts weights per group
         (their example: 5:8 with Lamda 2); here ``owl_lambda`` is a fraction as for
         unstructured and Lamda = lambda * M, so block i keeps N + r_i of every M. A block that
         would keep all M is left dense (the official code skips prune_n = 0); one that would keep
         none keeps 1. The mean is kept only up to the rounding.

depth  Sparsity rising linearly with depth: block i of L gets s - delta + 2 delta i / (L - 1),
       mean exactly s. No official code; unstructured only.

Pure math: numbers in, numbers out (the dense statistics pass lives in ``pipeline.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from llmprune.errors import LlmpruneError

OWL_MIN_SPARSITY = 0.01  # the official code's replacement for a block sparsity <= 0
MAX_SPARSITY = 0.99  # ours: a block is never pruned completely


def check_spread(value: float, sparsity: float, name: str) -> None:
    """lambda / delta must lie in [0, min(s, 1 - s)] so that the block sparsities can stay in [0, 1]."""
    limit = min(sparsity, 1.0 - sparsity)
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= limit + 1e-12):
        raise LlmpruneError(f"{name} {value} is outside [0, min(s, 1 - s)] = [0, {limit:g}] for "
                            f"sparsity {sparsity:g}")


# ---- OWL ---------------------------------------------------------------------------------------

def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Share of the scores (all Linears of a block, concatenated) above ``m`` x their mean."""
    flat = torch.cat([s.detach().float().reshape(-1).cpu() for s in scores])  # (all weights,)
    return (flat > flat.mean() * m).sum().item() / flat.numel()


def _normalised(ratios: Sequence[float], span: float) -> list[float]:
    """(D - min) / (max - min) * span, centred on its mean; all zero when every D is equal
    (the official code divides by zero there)."""
    lo, hi = min(ratios), max(ratios)
    if hi == lo:
        return [0.0] * len(ratios)
    r = [(d - lo) * (1.0 / (hi - lo) * span) for d in ratios]
    mean = sum(r) / len(r)
    return [x - mean for x in r]


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float) -> list[float]:
    """Block sparsities from outlier ratios D (unstructured): more outliers, lower sparsity."""
    if not ratios:
        return []
    density = [x + (1.0 - sparsity) for x in _normalised(ratios, 2.0 * lam)]
    out = []
    for d in density:
        s = 1.0 - d
        if s <= 0:
            s = OWL_MIN_SPARSITY
        out.append(min(s, MAX_SPARSITY))
    return out


def owl_nm_keep(ratios: Sequence[float], n: int, m: int, lam: float) -> list[int]:
    """Kept weights per group of ``m`` for each block (official ``prune_wanda_outlier_structure``),
    within [1, m]; ``m`` means the block stays dense."""
    shifts = [round(x) for x in _normalised(ratios, lam * m)]  # Python round: half to even, as numpy
    return [min(max(n + r, 1), m) for r in shifts]


def capped_shares(shares: Sequence[float], caps: Sequence[float]) -> list[float]:
    """``shares`` (e.g. block removal fractions) held to at most ``caps``, what a capped one loses
    given in equal parts to those still below their cap, until none is over (or all are full): the
    sum stays where ``sum(shares) <= sum(caps)``. A structured block must keep at least one MLP
    channel and one KV group, which OWL's spread (up to 2 lambda above the mean) can exceed."""
    out = [float(s) for s in shares]
    for _ in range(len(out) + 1):  # each round fills at least one block, the last one only clips
        excess = sum(max(s - c, 0.0) for s, c in zip(out, caps))
        out = [min(s, c) for s, c in zip(out, caps)]
        room = [i for i, (s, c) in enumerate(zip(out, caps)) if s < c]
        if excess <= 0 or not room:
            break
        for i in room:
            out[i] += excess / len(room)
    return out


# ---- depth -------------------------------------------------------------------------------------

def depth_sparsities(blocks: int, sparsity: float, delta: float) -> list[float]:
    if blocks == 1:
        return [sparsity]
    return [min(max(sparsity - delta + 2.0 * delta * i / (blocks - 1), 0.0), MAX_SPARSITY)
            for i in range(blocks)]


# ---- the plan the pipeline follows -------------------------------------------------------------

@dataclass
class BlockTargets:
    """What each block is pruned to: unstructured sparsity, or N:M kept count (``keep``)."""

    allocation: str
    sparsity: list[float]  # per block, the target sparsity
    keep: list[int] | None = None  # per block, N kept of every M (N:M allocations only)
    outlier_ratio: list[float | None] | None = None  # OWL's D per block (fraction, not percent)
    seconds: float = 0.0  # the statistics pass

    def to_dict(self) -> dict:
        out = {"allocation": self.allocation, "block_sparsity": list(self.sparsity), "seconds": self.seconds}
        if self.keep is not None:
            out["block_keep"] = list(self.keep)
        if self.outlier_ratio is not None:
            out["outlier_ratio"] = list(self.outlier_ratio)
        return out


def uniform_targets(blocks: int, sparsity: float, n: int | None, m: int | None) -> BlockTargets:
    """Every block at the target (N:M: every block keeps ``n`` of ``m``)."""
    return BlockTargets("uniform", [sparsity] * blocks, [n] * blocks if m is not None else None)


def owl_targets(ratios: Sequence[float], sparsity: float,
                n: int | None, m: int | None, lam: float) -> BlockTargets:
    """OWL's targets from the blocks' outlier ratios D (unstructured, or N:M kept counts)."""
    if m is not None:
        keep = owl_nm_keep(ratios, n, m, lam)
        return BlockTargets("owl", [1.0 - k / m for k in keep], keep, list(ratios))
    return BlockTargets("owl", owl_sparsities(ratios, sparsity, lam), None, list(ratios))


def depth_targets(blocks: int, sparsity: float, delta: float) -> BlockTargets:
    """Sparsity rising linearly with depth (unstructured only)."""
    return BlockTargets("depth", depth_sparsities(blocks, sparsity, delta))
