"""Pruning methods and their registry (one function and one decorator per method).

magnitude  Han et al. 2015, "Learning both Weights and Connections for Efficient Neural
           Networks"; the LLM baseline of Wanda/SparseGPT. Score |W_ij|, one threshold over
           the whole matrix (group "layer"), as locuslab/wanda ``prune_magnitude``.
wanda      Sun, Liu, Bair & Kolter 2023, "A Simple and Effective Pruning Approach for Large
           Language Models", arXiv:2306.11695. Score |W_ij| * ||X_j||_2, compared within each
           output row; no weight update. Options: ``group``/``metric`` (the paper's ablation),
           ``use_variant`` (its appendix's cumulative-score threshold).
sparsegpt  Frantar & Alistarh 2023, arXiv:2301.00774: mask by w^2 / [chol(H^-1)]_ii^2 per column
           block, OBS update of the kept weights (see ``solvers/sparsegpt.py``).

Every method maps ``weight (out, in) float32, LayerStats, PruneConfig`` to
``(pruned weight float32 with zeros where pruned, info)``; ``info`` is JSON-ready. An N:M
pattern keeps N of every M consecutive input weights of each row (the group is then irrelevant);
otherwise ``config.sparsity`` is applied per group with exact counts. Sparsity 0 prunes nothing.

Differences from the reference codes that can move a perplexity comparison slightly:
  * counts are exact, ``floor(s * group)``; reference magnitude and SparseGPT prune
    ``score <= sorted[int(s * numel)]``: one more weight per matrix / per 128-column block, plus
    every tie with the threshold (fp16 weights tie often). Reference Wanda per-row is exact, as
    here (stable sort, lower index first among ties);
  * N:M ties: the references use ``topk`` (unspecified tie order), we use a stable sort;
  * the reference averages squared norms per sample, we per token, and its Hessian is
    normalised per sample, ours per token: constant factors, the same masks and SparseGPT updates
    (damping is relative to mean(diag H)).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from llmprune.config import GROUPS, METRICS, PruneConfig
from llmprune.errors import LlmpruneError
from llmprune.masks import alpha_variant_search, nm_mask, unstructured_mask
from llmprune.results import effective_group_metric
from llmprune.scores import ACTIVATION_METRICS, score
from llmprune.solvers.sparsegpt import sparsegpt_prune

STAT_KINDS = frozenset({"norms", "hessian"})


@dataclass(frozen=True)
class LayerStats:
    """Calibration statistics of one Linear layer's input."""

    tokens: int  # calibration tokens seen
    sq_norm: torch.Tensor | None = None  # (in,) float32: sum over tokens of x_j**2
    hessian: torch.Tensor | None = None  # (in, in) float32: 2/tokens * sum x x^T


PruneFn = Callable[[torch.Tensor, "LayerStats | None", PruneConfig], "tuple[torch.Tensor, dict]"]


@dataclass(frozen=True)
class Method:
    name: str
    needs: frozenset[str]  # subset of STAT_KINDS; empty: no calibration at all
    default_group: str  # "row" | "column" | "layer"
    default_metric: str | None  # None: the method does not rank by a scores.py metric
    prune: PruneFn
    doc: str
    check: Callable[[PruneConfig], None] | None = None  # config errors caught before calibration


METHODS: dict[str, Method] = {}


def register(name: str, needs=(), default_group: str = "row", default_metric: str | None = None,
             check: Callable[[PruneConfig], None] | None = None):
    """Decorator adding a prune function to ``METHODS``; a name registered twice is an error."""
    needs = frozenset(needs)
    if not needs <= STAT_KINDS:
        raise ValueError(f"method {name!r}: unknown statistics {sorted(needs - STAT_KINDS)}")
    if default_group not in GROUPS:
        raise ValueError(f"method {name!r}: default_group must be one of {GROUPS}")
    if default_metric is not None and default_metric not in METRICS:
        raise ValueError(f"method {name!r}: default_metric must be one of {METRICS} or None")

    def decorator(fn: PruneFn) -> PruneFn:
        if name in METHODS:
            raise ValueError(f"pruning method {name!r} is already registered")
        METHODS[name] = Method(name, needs, default_group, default_metric, fn,
                               inspect.getdoc(fn) or "", check)
        return fn

    return decorator


def get_method(name: str) -> Method:
    """The registered method called ``name`` (case-insensitive)."""
    method = METHODS.get(str(name).lower())
    if method is None:
        raise LlmpruneError(
            f"unknown pruning method {name!r}: known methods are {', '.join(sorted(METHODS))}")
    return method


def validate_config(config: PruneConfig) -> None:
    """Reject option combinations the method cannot honour; called once, before calibration."""
    method = get_method(config.method)
    if method.check is not None:
        method.check(config)


def needs_for(config: PruneConfig) -> frozenset[str]:
    """Calibration statistics this config needs (e.g. wanda with metric "weight": none)."""
    method = get_method(config.method)
    if method.default_metric is None:
        return method.needs
    metric = config.metric or method.default_metric
    norms = frozenset({"norms"}) if metric in ACTIVATION_METRICS else frozenset()
    return (method.needs - {"norms"}) | norms


def _apply(weight: torch.Tensor, mask: torch.Tensor, info: dict) -> tuple[torch.Tensor, dict]:
    pruned = weight.detach().float().masked_fill(mask, 0.0)
    info["pruned"] = int(mask.sum().item())
    info["sparsity"] = info["pruned"] / mask.numel()
    return pruned, info


# ---- score-and-mask methods (magnitude, wanda) ------------------------------------------------

def _check_score_config(config: PruneConfig) -> None:
    if config.use_variant and config.pattern.structured:
        raise LlmpruneError(f"the Wanda variant (use_variant) is for unstructured sparsity, not "
                            f"{config.pattern}: drop use_variant or the N:M pattern")


def _score_and_mask(weight: torch.Tensor, stats: LayerStats | None, config: PruneConfig,
                    method: str) -> tuple[torch.Tensor, dict]:
    group, metric = effective_group_metric(config)  # the same the result record shows
    if metric in ACTIVATION_METRICS and (stats is None or stats.sq_norm is None):
        raise ValueError(f"{method} with metric {metric!r} needs input norms; the pipeline passed none")
    sq_norm, tokens = (stats.sq_norm, stats.tokens) if stats is not None else (None, 0)
    s = score(weight, sq_norm, tokens, metric)  # (out, in) float32
    info: dict = {"metric": metric}
    if config.pattern.structured:
        mask = nm_mask(s, config.pattern.n, config.pattern.m)
        info["group"] = None
    elif config.use_variant:
        mask, alpha, _ = alpha_variant_search(s, config.sparsity)
        info.update(group="row", alpha=alpha)
    else:
        mask = unstructured_mask(s, config.sparsity, group)
        info["group"] = group
    return _apply(weight, mask, info)


@register("magnitude", default_group="layer", default_metric="weight", check=_check_score_config)
def magnitude(weight: torch.Tensor, stats: LayerStats | None,
              config: PruneConfig) -> tuple[torch.Tensor, dict]:
    """Magnitude pruning: drop the smallest |W|, by default over the whole matrix. No calibration."""
    return _score_and_mask(weight, stats, config, "magnitude")


@register("wanda", needs=("norms",), default_group="row", default_metric="wanda", check=_check_score_config)
def wanda(weight: torch.Tensor, stats: LayerStats | None,
          config: PruneConfig) -> tuple[torch.Tensor, dict]:
    """Wanda: drop the smallest |W_ij| * ||X_j||_2 of each output row; no weight update."""
    return _score_and_mask(weight, stats, config, "wanda")


# ---- sparsegpt ---------------------------------------------------------------------------------

def _check_sparsegpt_config(config: PruneConfig) -> None:
    if config.group is not None or config.metric is not None or config.use_variant:
        raise LlmpruneError("sparsegpt chooses its own mask from the Hessian (per column block): "
                            "group, metric and use_variant do not apply; drop them")
    m = config.pattern.m
    if m is not None and config.blocksize % m:
        raise LlmpruneError(f"SparseGPT blocksize {config.blocksize} is not a multiple of M={m}: "
                            f"use a blocksize such as {config.blocksize - config.blocksize % m or m}")


@register("sparsegpt", needs=("hessian",), default_group="layer", check=_check_sparsegpt_config)
def sparsegpt(weight: torch.Tensor, stats: LayerStats | None,
              config: PruneConfig) -> tuple[torch.Tensor, dict]:
    """SparseGPT: mask by w^2 / [chol(H^-1)]_ii^2 per column block and OBS-update the kept weights."""
    if stats is None or stats.hessian is None:
        raise ValueError("sparsegpt needs the input Hessian; the pipeline passed none")
    new_weight, mask, info = sparsegpt_prune(
        weight, stats.hessian, config.sparsity, config.pattern.n, config.pattern.m,
        percdamp=config.percdamp, blocksize=config.blocksize)
    info["pruned"] = int(mask.sum().item())
    info["sparsity"] = info["pruned"] / mask.numel()
    return new_weight, info
