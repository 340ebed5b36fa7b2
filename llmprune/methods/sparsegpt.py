"""sparsegpt: mask by w^2 / [chol(H^-1)]_ii^2 per column block and OBS-update the kept weights.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", ICML, arXiv:2301.00774; official code IST-DASLab/sparsegpt. H = 2 XᵀX / n is the
layer input's Hessian, damped by ``percdamp`` x mean(diag H); columns are swept in blocks of
``blocksize``, each block's mask chosen from the saliency above, and the error of every pruned
weight is spread over the columns not yet visited (``llmprune.math.solvers.sparsegpt``). Our
Hessian is normalised per token, the reference's per sample: a constant factor, the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmprune.checks import check_number, check_positive
from llmprune.errors import LlmpruneError
from llmprune.methods.base import Selection
from llmprune.registry import METHODS, MethodSpec, Supports, option


@dataclass(frozen=True)
class SolverOptions:
    """The OBS sweep's knobs (SparseGPT and the mask-fixed reconstruction share them)."""

    percdamp: float = option(0.01, "SparseGPT Hessian damping, as a fraction of mean diag(H)")
    blocksize: int = option(128, "SparseGPT column block size")

    def __post_init__(self) -> None:
        check_number(self.percdamp, "percdamp", 0.0, 1e3, hint=": a small non-negative fraction such as 0.01")
        check_positive(self.blocksize, "blocksize")


def check(config) -> None:
    m = config.pattern.m
    if m is not None and config.blocksize % m:
        raise LlmpruneError(f"SparseGPT blocksize {config.blocksize} is not a multiple of M={m}: "
                            f"use a blocksize such as {config.blocksize - config.blocksize % m or m}")


def select(weight, stats, config) -> Selection:
    from llmprune.math.solvers.sparsegpt import saliency, sparsegpt_prune

    if stats is None or stats.hessian is None:
        raise ValueError("sparsegpt needs the input Hessian; the engine passed none")
    new_weight, mask, info = sparsegpt_prune(
        weight, stats.hessian, config.sparsity, config.pattern.n, config.pattern.m,
        percdamp=config.percdamp, blocksize=config.blocksize)
    s = None
    if config.refine is not None and config.pattern.structured:  # DSnoT's N:M in-group choice
        s = saliency(weight, stats.hessian, config.percdamp)
    return Selection(mask, new_weight, info, score=s, updates=True, own_update="obs")


SPEC = METHODS.add(MethodSpec(
    name="sparsegpt", label="SparseGPT", order=20,
    paper='Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in '
          'One-Shot", ICML',
    code="IST-DASLab/sparsegpt",
    summary="OBS: mask by w^2 / [H^-1]_ii^2 per column block, update the kept weights",
    options=SolverOptions, needs=("hessian",), supports=Supports(), select=select, check=check,
    default_group="layer",
))
