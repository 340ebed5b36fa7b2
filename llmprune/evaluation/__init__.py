"""Evaluation of a model in memory: perplexity (reference protocol), distance to the dense model (KL,
top-1 agreement, greedy-continuation agreement), zero-shot and LAMBADA/GSM8K (lm-eval)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmprune.errors import LlmpruneError

if TYPE_CHECKING:  # only annotations: importing the perplexity module should not load every config
    from llmprune.config import EvalConfig


@dataclass(frozen=True)
class DenseReference:
    """The dense model the distance metrics (KL, greedy-continuation agreement) compare with.

    ``key``: its fingerprint (:func:`llmprune.evaluation.distance.model_fingerprint`, taken before
    pruning); every cache of its outputs is filed under it. ``record``: the model evaluated is the
    dense model itself, so its caches are written (no distance is reported). ``model``: the dense
    model in memory beside the pruned one, for the exact KL (``kl_exact``) and to rebuild a cache
    that is missing; None: the caches must exist.
    """

    key: str
    record: bool = False
    model: Any = None


@dataclass
class Evaluation:
    """What :func:`evaluate` measured: the resolved config (its seqlen is the one used), the
    perplexity per dataset (each with its ``distance`` to the dense model when ``kl``), the
    zero-shot result and the greedy-continuation agreement (None when not asked for)."""

    config: EvalConfig
    perplexity: dict
    zeroshot: Any = None
    generation: Any = None

    def generation_dict(self) -> dict | None:
        return self.generation.to_dict() if self.generation is not None else None


def cache_root(evaluation: EvalConfig) -> Path:
    """Where the dense side's caches live: ``kl_cache``, else $LLMPRUNE_CACHE_DIR, else ~/.cache/llmprune."""
    from llmprune.evaluation.distance import default_cache_dir

    return Path(evaluation.kl_cache).expanduser() if evaluation.kl_cache else default_cache_dir()


def needs_dense(evaluation: EvalConfig) -> bool:
    """Whether ``evaluation`` compares with the dense model (KL or continuation agreement)."""
    return bool(evaluation.kl or evaluation.kl_exact or evaluation.generate)


def evaluate(model, tokenizer, evaluation: EvalConfig, data_dir=None, progress: bool = True,
             dense: DenseReference | None = None) -> Evaluation:
    """Perplexity on every dataset of ``evaluation``, then its zero-shot tasks, then the
    continuation agreement; with ``kl``, each perplexity pass also measures the distance to
    ``dense`` (on the same windows, from the same logits).

    Returns an :class:`Evaluation`; its config has the seqlen actually used (the model's when the
    config leaves it open).
    """
    from llmprune.evaluation.perplexity import evaluate_perplexity
    from llmprune.models import resolve_seqlen

    resolved = dataclasses.replace(evaluation, seqlen=resolve_seqlen(model, evaluation.seqlen))
    if needs_dense(resolved) and dense is None:
        raise LlmpruneError("the KL distance and the continuation agreement compare with the dense model, "
                            "but none was given: pass the dense model (llmprune eval --dense MODEL)")
    side = None
    if dense is not None and (resolved.kl or resolved.kl_exact):
        from llmprune.evaluation.distance import DenseSide

        exact = resolved.kl_exact and not dense.record
        if exact and dense.model is None:
            raise LlmpruneError("kl_exact runs the dense model beside the pruned one, but it is not in "
                                "memory: drop --kl-exact (the top-k approximation uses the dense cache)")
        side = DenseSide(key=dense.key, cache_dir=cache_root(resolved), topk=resolved.kl_topk,
                         model=dense.model if exact else None, record=dense.record)
    perplexity = {
        dataset: evaluate_perplexity(model, tokenizer, dataset, resolved.seqlen, data_dir=data_dir,
                                     batch_size=resolved.batch_size, max_windows=resolved.max_windows,
                                     progress=progress, dense=side)
        for dataset in resolved.datasets
    }
    zeroshot = None
    if resolved.zeroshot:
        from llmprune.evaluation.zeroshot import zeroshot as run_zeroshot

        zeroshot = run_zeroshot(model, tokenizer, list(resolved.zeroshot), limit=resolved.limit,
                                batch_size=resolved.batch_size, data_dir=data_dir, progress=progress)
    generation = None
    if resolved.generate and dense is not None:
        from llmprune.evaluation.generation import continuation_agreement

        generation = continuation_agreement(
            model, tokenizer, dense_key=dense.key, cache_dir=cache_root(resolved) / "generation",
            prompts=resolved.generate, new_tokens=resolved.generate_tokens, data_dir=data_dir,
            record=dense.record, dense_model=dense.model, progress=progress)
    return Evaluation(config=resolved, perplexity=perplexity, zeroshot=zeroshot, generation=generation)


def pruned_checkpoint(model) -> str | None:
    """What pruned ``model`` when it names a checkpoint folder llmprune saved after pruning (its
    ``llmprune.json`` holds a pruning config), e.g. ``"wanda 50%"``; None for anything else."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    try:
        record = json.loads((Path(model).expanduser() / "llmprune.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    config = record.get("config") if isinstance(record, dict) else None
    if not isinstance(config, dict) or not config.get("method"):
        return None
    sparsity = config.get("sparsity")
    pattern = config.get("pattern") or "unstructured"
    unstructured = pattern == "unstructured" and isinstance(sparsity, (int, float))
    setting = f"{sparsity:.0%}" if unstructured else pattern
    return f"{config['method']} {setting}"


def check_dense_source(model, flag: str = "--model") -> None:
    """Refuse, before any work, a distance request whose dense side would be an already pruned checkpoint."""
    pruned = pruned_checkpoint(model)
    if pruned is not None:
        raise LlmpruneError(
            f"{flag} {model} is already pruned ({pruned}, says its llmprune.json), so it cannot be the dense "
            f"reference of --eval-kl/--generate: measure it with `llmprune eval --model {model} --dense "
            "DENSE_MODEL --eval-kl`")


def dense_caches_ready(model, tokenizer, evaluation: EvalConfig, reference: DenseReference,
                       data_dir=None) -> bool:
    """Whether every cache of the dense side that ``evaluation`` reads is on disk and valid (checked
    by reading it, as a pruned run would): the KL's per dataset, the continuations' for ``generate``."""
    from llmprune.data import eval_tokens
    from llmprune.evaluation.distance import DenseSide
    from llmprune.evaluation.perplexity import window_count
    from llmprune.models import resolve_seqlen

    seqlen = resolve_seqlen(model, evaluation.seqlen)
    if evaluation.kl or evaluation.kl_exact:
        side = DenseSide(key=reference.key, cache_dir=cache_root(evaluation), topk=evaluation.kl_topk)
        for dataset in evaluation.datasets:
            flat = eval_tokens(dataset, tokenizer, seqlen, data_dir=data_dir).reshape(-1)
            windows = window_count(flat, seqlen, evaluation.max_windows)
            if windows < 1 or not side.ready(dataset, flat[: windows * seqlen].view(windows, seqlen)):
                return False
    if evaluation.generate:
        from llmprune.evaluation import generation

        prompts, _ = generation.select_prompts(tokenizer, evaluation.generate, data_dir=data_dir)
        key = generation.cache_key(reference.key, prompts, evaluation.generate_tokens)
        path = generation.cache_path(cache_root(evaluation) / "generation", key)
        if generation.read_cache(path, key, (evaluation.generate, evaluation.generate_tokens))[0] is None:
            return False
    return True


def dense_reference(model, evaluation: EvalConfig, keep: bool = False) -> DenseReference | None:
    """The :class:`DenseReference` of ``model`` (still dense) where ``evaluation`` needs one; with
    ``keep`` (or ``kl_exact``), a copy of it stays in memory beside the model about to be pruned."""
    if not needs_dense(evaluation):
        return None
    from llmprune.evaluation.distance import model_fingerprint

    copy_ = None
    if keep or evaluation.kl_exact:
        check_dense_copy(model)
        copy_ = copy.deepcopy(model)
    return DenseReference(key=model_fingerprint(model), model=copy_)


def check_dense_copy(model) -> None:
    """Refuse to copy the dense model (for ``kl_exact``) where the copy cannot fit, naming the fix."""
    from llmprune.blocks import available_bytes

    size = sum(p.numel() * p.element_size() for p in model.parameters())
    size += sum(b.numel() * b.element_size() for b in model.buffers())
    device = next(model.parameters()).device
    free = available_bytes(device)
    if free is not None and 2 * size > free:
        raise LlmpruneError(
            f"--kl-exact keeps a copy of the dense model ({size / 2**30:.1f} GiB) beside the pruned one, but "
            f"{free / 2**30:.1f} GiB are free: drop --kl-exact (the top-k approximation needs no copy)")


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
