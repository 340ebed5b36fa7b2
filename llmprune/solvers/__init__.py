"""Solvers that update the kept weights while pruning (beyond choosing a mask)."""

from llmprune.solvers.reconstruct import reconstruct
from llmprune.solvers.sparsegpt import sparsegpt_prune

__all__ = ["sparsegpt_prune", "reconstruct"]
