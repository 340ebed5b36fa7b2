"""Solvers that update the kept weights while pruning (beyond choosing a mask)."""

from llmprune.math.solvers.reconstruct import reconstruct
from llmprune.math.solvers.sparsegpt import sparsegpt_prune

__all__ = ["sparsegpt_prune", "reconstruct"]
