"""llmprune: one-shot pruning of open LLMs without retraining.

{components}.

Patterns: unstructured, N:M (e.g. "2:4", NVIDIA's convention: keep N of every M weights) or
structured (whole channels and heads). Each name below has its own help() with an example; the
guide is docs/python.md, the command line ``llmprune --help``.

    prune_model(model, config, ...)        check, load, evaluate, prune, evaluate, save: one call
    load_model(name_or_path)               (model, tokenizer) from a hub id, folder, .gguf or "smollm2-135m"
    prune(model, tokenizer, config)        prune a loaded model in place; returns a PruneReport
    plan(model, config)                    every check of a config against a model, before calibration
    run(plan, model, tokenizer)            execute a plan (prune = plan + run)
    evaluate_perplexity(model, tok, name)  perplexity on wikitext2, ptb, c4 or a local text file
    perplexity(model, tokens, seqlen)      perplexity of a token stream, in windows of seqlen
    zeroshot(model, tokenizer, tasks)      zero-shot accuracy through lm-eval (boolq, rte, piqa, ...)
    save_pruned(model, tokenizer, path)    a Hugging Face checkpoint plus llmprune.json
    recover(model, teacher, tok, config)   distillation or LoRA after pruning that keeps the zeros
    PruneConfig                            what to prune and how: method, sparsity, pattern, options
    CalibConfig                            calibration data: dataset, nsamples, seqlen, seed
    EvalConfig                             evaluation: datasets, seqlen, max_windows, zero-shot tasks
    RecoverConfig                          recovery training: method, steps, lr, data
    ExportConfig                           checkpoint format: dense, compressed, compressed-tensors
    PruneReport                            what prune did: sparsity per layer, timings
    PruneResult                            what prune_model did: report, perplexities, record, paths
    LlmpruneError                          every user error: one line saying what is wrong and the fix

Example::

    >>> import llmprune
    >>> config = llmprune.PruneConfig(method="wanda", sparsity=0.5)
    >>> result = llmprune.prune_model("smollm2-135m", config, evaluate="wikitext2",
    ...                               save="smollm2-wanda", data_dir="../shared/data")
    >>> print(result.summary())
"""

from __future__ import annotations

import importlib
import os
import sys
import types

# OpenMP threads that spin while waiting stall badly whenever another process shares the
# cores (a 64x64 matmul measured 1000x slower on a busy 2-core machine); set before torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# name -> module; imported on first use so `import llmprune` stays cheap (no torch)
_EXPORTS = {
    "LlmpruneError": "llmprune.errors",
    "PruneConfig": "llmprune.config",
    "CalibConfig": "llmprune.config",
    "EvalConfig": "llmprune.config",
    "ExportConfig": "llmprune.config",
    "RecoverConfig": "llmprune.config",
    "load_model": "llmprune.models",
    "prune": "llmprune.engine",
    "plan": "llmprune.engine",
    "run": "llmprune.engine",
    "PruneReport": "llmprune.engine",
    "prune_model": "llmprune.pipeline",
    "PruneResult": "llmprune.pipeline",
    "evaluate_perplexity": "llmprune.evaluation.perplexity",
    "perplexity": "llmprune.evaluation.perplexity",
    "zeroshot": "llmprune.evaluation.zeroshot",
    "save_pruned": "llmprune.io",
    "recover": "llmprune.recover",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llmprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names and the public API (imported lazily, so listing it loads no torch)."""
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package's docstring names the registered methods, asked of the registry when read
    (``help(llmprune)``), so that ``import llmprune`` stays cheap and the list is never stale."""

    @property
    def __doc__(self) -> str:  # type: ignore[override]
        text = self.__dict__.get("__doc__") or ""
        try:  # importlib: the registry loads only when the docstring is read
            components = importlib.import_module("llmprune.pipeline").available()
        except Exception:  # noqa: BLE001 - a broken plugin must not hide the rest of the help
            components = "Methods: see `llmprune prune --help`"
        return text.replace("{components}", components)


sys.modules[__name__].__class__ = _Package
