"""llmprune: one-shot pruning of open LLMs without retraining (Wanda, magnitude, SparseGPT)."""

from __future__ import annotations

import importlib
import os

# OpenMP threads that spin while waiting stall badly whenever another process shares the
# cores (a 64x64 matmul measured 1000x slower on a busy 2-core machine); set before torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# name -> module; imported on first use so `import llmprune` stays cheap
_EXPORTS = {
    "LlmpruneError": "llmprune.errors",
    "PruneConfig": "llmprune.config",
    "CalibConfig": "llmprune.config",
    "EvalConfig": "llmprune.config",
    "load_model": "llmprune.models",
    "prune": "llmprune.engine",
    "plan": "llmprune.engine",
    "run": "llmprune.engine",
    "PruneReport": "llmprune.engine",
    "evaluate_perplexity": "llmprune.evaluation.perplexity",
    "perplexity": "llmprune.evaluation.perplexity",
    "zeroshot": "llmprune.evaluation.zeroshot",
    "save_pruned": "llmprune.io",
    "recover": "llmprune.recover",
    "RecoverConfig": "llmprune.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llmprune' has no attribute {name!r}")
