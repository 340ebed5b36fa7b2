"""llmprune: one-shot pruning of open LLMs without retraining (Wanda, magnitude, SparseGPT)."""

__version__ = "0.1.0"
