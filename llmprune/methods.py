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
ria        Zhang et al. 2024 (ICLR), "Plug-and-Play": score (|W_ij| / sum_col + |W_ij| / sum_row)
           * ||X_j||^a (a = 0.5), one threshold over the whole matrix (the official default,
           ``per_outneuron`` off); ``permute`` with N:M: its heuristic channel reallocation.

Composable steps after the method (``prune_weight``): ``refine`` (refine.py, DSnoT) changes the
mask, ``reconstruct`` (solvers/reconstruct.py) re-solves the kept weights for the final mask.
A method that exposes its choice (``select``: mask, output weight, scores, permutation) can be
combined with both; SparseGPT's own update is redone for a refined mask.

Every method maps ``weight (out, in) float32, LayerStats, PruneConfig`` to
``(pruned weight float32 with zeros where pruned, info)``; ``info`` is JSON-ready. An N:M
pattern keeps N of every M consecutive input weights of each row (the group is then irrelevant);
otherwise ``config.sparsity`` is applied per group with exact counts. Sparsity 0 prunes nothing.

Differences from the reference codes that can move a perplexity comparison slightly:
  * counts are exact, ``floor(s * group)``; reference magnitude, RIA and SparseGPT prune
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
import math
from dataclasses import dataclass
from typing import Callable

import torch

from llmprune.allocation import check_spread, get_allocation
from llmprune.config import GROUPS, METRICS, PruneConfig
from llmprune.errors import LlmpruneError
from llmprune.masks import (alpha_variant_search, channel_reallocation, nm_mask, permuted_nm_mask,
                            unstructured_mask)
from llmprune.refine import dsnot, get_refiner, skipped
from llmprune.results import effective_group_metric
from llmprune.scores import ACTIVATION_METRICS, ria_score, score
from llmprune.solvers.reconstruct import reconstruct
from llmprune.solvers.sparsegpt import saliency, sparsegpt_prune

# norms: sum x^2 per input; hessian: 2/n sum x x^T; moments: per-window sums and variances (DSnoT)
STAT_KINDS = frozenset({"norms", "hessian", "moments"})
PERMUTE_METHODS = ("ria", "wanda")  # the official RIA code permutes channels for these two


@dataclass(frozen=True)
class LayerStats:
    """Calibration statistics of one Linear layer's input."""

    tokens: int  # calibration tokens seen
    sq_norm: torch.Tensor | None = None  # (in,) float32: sum over tokens of x_j**2
    hessian: torch.Tensor | None = None  # (in, in) float32: 2/tokens * sum x x^T
    x_sum: torch.Tensor | None = None  # (in,) float32: sum over tokens of x_j
    var_sum: torch.Tensor | None = None  # (in,) float32: sum over windows of the window's variance of x_j
    windows: int = 0  # calibration windows seen (moments)


@dataclass
class Selection:
    """A method's choice for one layer, before refinement and reconstruction."""

    mask: torch.Tensor  # (out, in) bool, True = pruned
    weight: torch.Tensor  # (out, in) float32: the method's output (masked, or updated by its solver)
    info: dict
    score: torch.Tensor | None = None  # (out, in) higher = keep: DSnoT's N:M in-group choice
    perm: torch.Tensor | None = None  # (in,) channel order in which the mask is N:M (permute)
    updates: bool = False  # True when ``weight`` is not just the masked dense weight


PruneFn = Callable[[torch.Tensor, "LayerStats | None", PruneConfig], "tuple[torch.Tensor, dict]"]
SelectFn = Callable[[torch.Tensor, "LayerStats | None", PruneConfig], Selection]


@dataclass(frozen=True)
class Method:
    name: str
    needs: frozenset[str]  # subset of STAT_KINDS; empty: no calibration at all
    default_group: str  # "row" | "column" | "layer"
    default_metric: str | None  # None: the method does not rank by a scores.py metric
    prune: PruneFn
    doc: str
    check: Callable[[PruneConfig], None] | None = None  # config errors caught before calibration
    select: SelectFn | None = None  # the choice before refinement (needed by refine/reconstruct)
    # structured.py's StructuredSpec for a method that removes whole channels and heads; its
    # ``prune`` then scores the input channels of a layer: (weight, moments, config) -> (in,)
    structured: object | None = None


METHODS: dict[str, Method] = {}


def register(name: str, needs=(), default_group: str = "row", default_metric: str | None = None,
             check: Callable[[PruneConfig], None] | None = None, selects: bool = False, structured=None):
    """Decorator adding a prune function to ``METHODS``; a name registered twice is an error.

    ``selects``: the function returns a :class:`Selection` (so refine/reconstruct can follow);
    its ``prune`` is then the selection's weight and info."""
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
        prune_fn = (lambda w, st, c: _finish(fn(w, st, c))) if selects else fn
        METHODS[name] = Method(name, needs, default_group, default_metric, prune_fn,
                               inspect.getdoc(fn) or "", check, fn if selects else None, structured)
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
    _check_steps(config, method)


def _check_steps(config: PruneConfig, method: Method) -> None:
    """Allocation, permutation, refinement and reconstruction: names, ranges, combinations."""
    spec = get_allocation(config.allocation)
    pattern = config.pattern
    if spec.name == "owl":
        check_spread(config.owl_lambda, config.sparsity, "owl_lambda")
        if not (config.owl_m > 0):
            raise LlmpruneError(f"owl_m {config.owl_m} must be positive (the official default is 5)")
    if spec.name == "depth":
        check_spread(config.depth_delta, config.sparsity, "depth_delta")
    if pattern.structured and spec.name != "uniform" and not ({"*", method.name} & spec.nm_methods):
        if not spec.nm_methods:
            raise LlmpruneError(f"allocation {spec.name!r} is for unstructured sparsity only (no official code "
                                "defines it for N:M): drop the N:M pattern or use allocation uniform")
        raise LlmpruneError(f"allocation {spec.name!r} with an N:M pattern is defined by the official code only for "
                            f"{', '.join(sorted(spec.nm_methods))}, not for {method.name}: use unstructured sparsity "
                            "or allocation uniform")
    if config.permute:
        if not pattern.structured:
            raise LlmpruneError("permute reorders input channels for an N:M pattern: give --pattern N:M or drop --permute")
        if method.name not in PERMUTE_METHODS:
            raise LlmpruneError(f"permute (RIA's channel reallocation) is defined for {' and '.join(PERMUTE_METHODS)}, "
                                f"not {method.name}")
    if config.refine is not None:
        get_refiner(config.refine)
        skipped("layers.0.mlp.x", config.dsnot_skip)  # validates the name
    if (config.refine is not None or config.reconstruct) and method.select is None:
        raise LlmpruneError(f"method {method.name} does not expose its mask: refine/reconstruct cannot follow it")


def _method_needs(config: PruneConfig) -> frozenset[str]:
    method = get_method(config.method)
    if method.default_metric is None:
        return method.needs
    metric = config.metric or method.default_metric
    norms = frozenset({"norms"}) if metric in ACTIVATION_METRICS else frozenset()
    return (method.needs - {"norms"}) | norms


def block_needs(config: PruneConfig) -> frozenset[str]:
    """Statistics each block's calibration pass collects: the method's, plus refinement's and
    the reconstruction's Hessian."""
    needs = _method_needs(config)
    if config.refine is not None:
        needs |= get_refiner(config.refine).needs
    if config.reconstruct:
        needs |= {"hessian"}
    return needs


def needs_for(config: PruneConfig) -> frozenset[str]:
    """Calibration statistics this config needs anywhere (e.g. wanda with metric "weight": none;
    magnitude with allocation owl: norms, for OWL's dense statistics pass)."""
    needs = block_needs(config)
    if get_allocation(config.allocation).needs_data:
        needs |= {"norms"}
    return needs


def _finish(selection: Selection) -> tuple[torch.Tensor, dict]:
    info = selection.info
    info["pruned"] = int(selection.mask.sum().item())
    info["sparsity"] = info["pruned"] / selection.mask.numel()
    return selection.weight, info


def prune_weight(method: Method, weight: torch.Tensor, stats: LayerStats | None, config: PruneConfig,
                 layer: str = "") -> tuple[torch.Tensor, dict]:
    """The method on one layer (``layer`` = "layers.{i}.{name}"), then the refinement and the
    reconstruction the config asks for. Returns (new weight float32, JSON-ready info)."""
    if config.refine is None and not config.reconstruct:
        return method.prune(weight, stats, config)
    sel = method.select(weight, stats, config)
    dense = weight.detach().float()
    mask = sel.mask
    if config.refine is not None:
        mask, sel.info["refine"] = _refine(dense, sel, stats, config, layer)
    changed = mask is not sel.mask and not torch.equal(mask, sel.mask)
    if sel.updates and not changed:
        new = sel.weight  # the method's own update for this very mask (SparseGPT)
    elif config.reconstruct or sel.updates:
        new, sel.info["reconstruct"] = reconstruct(dense, stats.hessian, mask, config.percdamp, config.blocksize)
    else:
        new = dense.masked_fill(mask, 0.0)
    return _finish(Selection(mask, new, sel.info))


def _refine(dense: torch.Tensor, sel: Selection, stats: LayerStats, config: PruneConfig,
            layer: str) -> tuple[torch.Tensor, dict]:
    if skipped(layer, config.dsnot_skip):
        return sel.mask, {"name": config.refine, "skipped": True}
    x_mean = stats.x_sum / max(stats.windows, 1)  # (in,) per-window sums, averaged
    var = stats.var_sum / max(stats.windows, 1)  # (in,)
    wanda = score(dense, stats.sq_norm, stats.tokens, "wanda")
    score_ = sel.score
    n, m = config.pattern.n, config.pattern.m
    perm = sel.perm if sel.perm is not None else slice(None)
    mask, info = dsnot(dense[:, perm], sel.mask[:, perm], x_mean[perm], var[perm], wanda[:, perm],
                       None if score_ is None else score_[:, perm], n, m, cycles=config.dsnot_cycles,
                       threshold=config.dsnot_threshold, var_power=config.dsnot_var_power)
    out = torch.empty_like(mask)
    out[:, perm] = mask
    return out, {"name": config.refine, **info}


def _mask_from_score(weight: torch.Tensor, s: torch.Tensor, config: PruneConfig, group: str,
                     info: dict) -> Selection:
    perm = None
    if config.pattern.structured:
        n, m = config.pattern.n, config.pattern.m
        if config.permute:
            perm = channel_reallocation(s, m)
            mask = permuted_nm_mask(s, n, m, perm)
            info["permuted"] = True
        else:
            mask = nm_mask(s, n, m)
        info["group"] = None
    elif config.use_variant:
        mask, alpha, _ = alpha_variant_search(s, config.sparsity)
        info.update(group="row", alpha=alpha)
    else:
        mask = unstructured_mask(s, config.sparsity, group)
        info["group"] = group
    return Selection(mask, weight.detach().float().masked_fill(mask, 0.0), info, score=s, perm=perm)


# ---- score-and-mask methods (magnitude, wanda) ------------------------------------------------

def _check_score_config(config: PruneConfig) -> None:
    if config.use_variant and config.pattern.structured:
        raise LlmpruneError(f"the Wanda variant (use_variant) is for unstructured sparsity, not "
                            f"{config.pattern}: drop use_variant or the N:M pattern")


def _score_and_mask(weight: torch.Tensor, stats: LayerStats | None, config: PruneConfig,
                    method: str) -> Selection:
    group, metric = effective_group_metric(config)  # the same the result record shows
    if metric in ACTIVATION_METRICS and (stats is None or stats.sq_norm is None):
        raise ValueError(f"{method} with metric {metric!r} needs input norms; the pipeline passed none")
    sq_norm, tokens = (stats.sq_norm, stats.tokens) if stats is not None else (None, 0)
    s = score(weight, sq_norm, tokens, metric)  # (out, in) float32
    return _mask_from_score(weight, s, config, group, {"metric": metric})


@register("magnitude", default_group="layer", default_metric="weight", check=_check_score_config, selects=True)
def magnitude(weight: torch.Tensor, stats: LayerStats | None, config: PruneConfig) -> Selection:
    """Magnitude pruning: drop the smallest |W|, by default over the whole matrix. No calibration."""
    return _score_and_mask(weight, stats, config, "magnitude")


@register("wanda", needs=("norms",), default_group="row", default_metric="wanda", check=_check_score_config,
          selects=True)
def wanda(weight: torch.Tensor, stats: LayerStats | None, config: PruneConfig) -> Selection:
    """Wanda: drop the smallest |W_ij| * ||X_j||_2 of each output row; no weight update."""
    return _score_and_mask(weight, stats, config, "wanda")


# ---- ria ---------------------------------------------------------------------------------------

def _check_ria_config(config: PruneConfig) -> None:
    if config.metric is not None or config.use_variant:
        raise LlmpruneError("ria has its own score (relative importance x activation^a): metric and "
                            "use_variant do not apply; drop them")
    if not (isinstance(config.ria_a, (int, float)) and math.isfinite(config.ria_a)):
        raise LlmpruneError(f"ria_a {config.ria_a!r} must be a finite number (the official default is 0.5)")


@register("ria", needs=("norms",), default_group="layer", check=_check_ria_config, selects=True)
def ria(weight: torch.Tensor, stats: LayerStats | None, config: PruneConfig) -> Selection:
    """RIA: drop the smallest (|W|/sum_col|W| + |W|/sum_row|W|) * ||X_j||^a of the whole matrix."""
    if stats is None or stats.sq_norm is None:
        raise ValueError("ria needs input norms; the pipeline passed none")
    s = ria_score(weight, stats.sq_norm, stats.tokens, config.ria_a)  # (out, in)
    group = config.group or "layer"
    return _mask_from_score(weight, s, config, group, {"a": config.ria_a})


# ---- sparsegpt ---------------------------------------------------------------------------------

def _check_sparsegpt_config(config: PruneConfig) -> None:
    if config.group is not None or config.metric is not None or config.use_variant:
        raise LlmpruneError("sparsegpt chooses its own mask from the Hessian (per column block): "
                            "group, metric and use_variant do not apply; drop them")
    m = config.pattern.m
    if m is not None and config.blocksize % m:
        raise LlmpruneError(f"SparseGPT blocksize {config.blocksize} is not a multiple of M={m}: "
                            f"use a blocksize such as {config.blocksize - config.blocksize % m or m}")


@register("sparsegpt", needs=("hessian",), default_group="layer", check=_check_sparsegpt_config, selects=True)
def sparsegpt(weight: torch.Tensor, stats: LayerStats | None, config: PruneConfig) -> Selection:
    """SparseGPT: mask by w^2 / [chol(H^-1)]_ii^2 per column block and OBS-update the kept weights."""
    if stats is None or stats.hessian is None:
        raise ValueError("sparsegpt needs the input Hessian; the pipeline passed none")
    new_weight, mask, info = sparsegpt_prune(
        weight, stats.hessian, config.sparsity, config.pattern.n, config.pattern.m,
        percdamp=config.percdamp, blocksize=config.blocksize)
    s = None
    if config.refine is not None and config.pattern.structured:  # DSnoT's N:M in-group choice
        s = saliency(weight, stats.hessian, config.percdamp)
    return Selection(mask, new_weight, info, score=s, updates=True)


# the structured methods (wanda-sp, flap) register themselves; imported last (they use register)
from llmprune import structured as _structured  # noqa: E402,F401
