"""Evaluation of a model in memory: perplexity (reference protocol) and zero-shot (lm-eval)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from llmprune.errors import LlmpruneError

if TYPE_CHECKING:  # only annotations: importing the perplexity module should not load every config
    from llmprune.config import EvalConfig


def evaluate(model, tokenizer, evaluation: EvalConfig, data_dir=None, progress: bool = True
             ) -> tuple[EvalConfig, dict, Any]:
    """Perplexity on every dataset of ``evaluation``, then its zero-shot tasks.

    Returns ``(resolved config, {dataset: PerplexityResult}, ZeroShotResult or None)``; the
    resolved config has the seqlen actually used (the model's when the config leaves it open).
    """
    from llmprune.evaluation.perplexity import evaluate_perplexity
    from llmprune.models import resolve_seqlen

    resolved = dataclasses.replace(evaluation, seqlen=resolve_seqlen(model, evaluation.seqlen))
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


def check_eval_memory(model, evaluation: EvalConfig) -> None:
    """Refuse an evaluation batch whose activations and logits cannot fit, naming the limit.

    A window's pass keeps about ``seqlen x (6 hidden + 3 intermediate)`` float32 activations of
    one block at a time (the calibration check's estimate). Where the perplexity applies the
    output head a chunk of positions at a time (see :mod:`llmprune.evaluation.perplexity`), the
    logits add only ``LOGITS_CHUNK x vocab`` floats whatever the batch; otherwise a batch
    materialises ``batch x seqlen x vocab`` float32 logits, and about as much again for the
    log-softmax: with a 128k vocabulary 1 GiB per 2048-token window. (A model whose head is
    found but whose logits it does not reproduce falls back to full logits at run time,
    unchecked here.)
    """
    if not evaluation.datasets:
        return
    from llmprune.blocks import available_bytes, block_device
    from llmprune.evaluation.perplexity import split_head
    from llmprune.models import get_blocks, resolve_seqlen

    seqlen = resolve_seqlen(model, evaluation.seqlen)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    inner = int(getattr(text, "intermediate_size", 0) or 4 * hidden)
    per_window = seqlen * (6 * hidden + 3 * inner) * 4
    what = "activations"
    if split_head(model) is None:
        head = model.get_output_embeddings()
        vocab = int(head.weight.shape[0] if head is not None else text.vocab_size)
        per_window += 2 * seqlen * vocab * 4
        what = "activations and logits"
    free = available_bytes(block_device(get_blocks(model)[-1]))
    if free is not None and evaluation.batch_size * per_window > free:
        fits = max(int(free // per_window), 1)
        raise LlmpruneError(
            f"evaluation batch size {evaluation.batch_size} x seqlen {seqlen} needs about "
            f"{evaluation.batch_size * per_window / 2**30:.1f} GiB for the {what}, but "
            f"{free / 2**30:.1f} GiB are free: use --batch-size {fits} or less"
        )
