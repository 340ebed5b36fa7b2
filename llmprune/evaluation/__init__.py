"""Evaluation of a model in memory: perplexity (reference protocol) and zero-shot (lm-eval)."""

from __future__ import annotations

import dataclasses
from typing import Any

from llmprune.config import EvalConfig


def evaluate(model, tokenizer, evaluation: EvalConfig, data_dir=None, progress: bool = True
             ) -> tuple[EvalConfig, dict, Any]:
    """Perplexity on every dataset of ``evaluation``, then its zero-shot tasks.

    Returns ``(resolved config, {dataset: PerplexityResult}, ZeroShotResult or None)``; the
    resolved config has the seqlen actually used (the model's when the config leaves it open).
    """
    from llmprune.evaluation.perplexity import evaluate_perplexity
    from llmprune.models import default_seqlen

    seqlen = evaluation.seqlen or getattr(model, "seqlen", None) or default_seqlen(model)
    resolved = dataclasses.replace(evaluation, seqlen=int(seqlen))
    perplexity = {
        dataset: evaluate_perplexity(model, tokenizer, dataset, resolved.seqlen, data_dir=data_dir,
                                     batch_size=resolved.batch_size, max_windows=resolved.max_windows,
                                     progress=progress)
        for dataset in resolved.datasets
    }
    zeroshot = None
    if resolved.zeroshot:
        from llmprune.evaluation.zeroshot import zeroshot as run_zeroshot

        zeroshot = run_zeroshot(model, tokenizer, list(resolved.zeroshot), limit=resolved.limit,
                                batch_size=resolved.batch_size, data_dir=data_dir, progress=progress)
    return resolved, perplexity, zeroshot
