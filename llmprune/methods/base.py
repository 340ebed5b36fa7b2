"""What mask methods share: the :class:`Selection` a per-layer function returns, the comparison
group and metric a config prunes with, and the step from a score to a mask.

Torch is imported where the tensors are handled, not at the top: a spec (names, options,
capabilities) must be readable without it (the report and the CLI's parser read only specs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmprune.errors import LlmpruneError
from llmprune.math import ACTIVATION_METRICS, GROUPS, METRICS
from llmprune.registry import METHODS, option

if TYPE_CHECKING:
    import torch

    from llmprune.stats import LayerStats


@dataclass
class Selection:
    """A method's choice for one layer, before refinement and reconstruction."""

    mask: torch.Tensor  # (out, in) bool, True = pruned
    weight: torch.Tensor  # (out, in) float32: the method's output (masked, or updated by its solver)
    info: dict
    score: torch.Tensor | None = None  # (out, in) higher = keep: DSnoT's N:M in-group choice
    perm: torch.Tensor | None = None  # (in,) channel order in which the mask is N:M (permute)
    updates: bool = False  # True when ``weight`` is not just the masked dense weight
    # the reconstruction ``weight`` already is for this mask ("obs": SparseGPT's sweep): asking for
    # it again changes nothing, asking for another one re-solves the kept weights
    own_update: str | None = None


def whole_structure_clashes(config, *extra: tuple[str, bool]) -> list[str]:
    """The flags a method removing whole channels, heads or blocks cannot follow that ``config`` sets
    (``extra``: more ``(flag, set)`` pairs of the method's own)."""
    return [name for name, on in (
        ("--pattern", config.pattern.structured), ("--true-sequential", config.true_sequential),
        ("--include/--exclude", bool(config.include or config.exclude)),
        ("--skip-attention/--skip-mlp", config.skip_attention or config.skip_mlp),
        ("--allocation", config.allocation != "uniform"), ("--permute", config.permute),
        ("--refine", config.refine is not None), ("--reconstruct", config.reconstruct is not None),
        ("--block-reconstruct", config.block_reconstruct is not None), *extra) if on]


def check_group(group: Any) -> None:
    if group is not None and group not in GROUPS:
        raise LlmpruneError(f"unknown comparison group {group!r}: use one of {', '.join(GROUPS)}")


@dataclass(frozen=True)
class ScoreOptions:
    """The knobs of the score-and-mask methods (magnitude, Wanda): the paper's ablation axes."""

    group: str | None = option(None, "comparison group: row, column or layer (None: the method's)")
    metric: str | None = option(None, "score: weight, activation or wanda (None: the method's)")
    use_variant: bool = option(False, "Wanda's alpha variant (per-row cumulative-score threshold)")

    def __post_init__(self) -> None:
        check_group(self.group)
        if self.metric is not None and self.metric not in METRICS:
            raise LlmpruneError(f"unknown metric {self.metric!r}: use one of {', '.join(METRICS)}")


def check_variant(config) -> None:
    if config.use_variant and config.pattern.structured:
        raise LlmpruneError(f"the Wanda variant (use_variant) is for unstructured sparsity, not "
                            f"{config.pattern}: drop use_variant or the N:M pattern")


def effective_group_metric(config) -> tuple[str | None, str | None]:
    """The comparison group and score metric ``config`` prunes with.

    The method's defaults fill what the config leaves open; the group is None for N:M (the
    pattern fixes the groups) and "row" for Wanda's variant (its threshold is per output row).
    The pruning code and the result record both use this, so a table never shows a group the
    masks were not computed in.
    """
    spec = METHODS.get(config.method)
    metric = config.metric or spec.default_metric
    if config.pattern.structured:
        return None, metric
    if config.use_variant:
        return "row", metric
    return config.group or spec.default_group, metric


def score_needs(config) -> tuple[str, ...]:
    """Input norms when the metric reads activations (magnitude with metric "weight": none)."""
    _, metric = effective_group_metric(config)
    return ("norms",) if metric in ACTIVATION_METRICS else ()


def mask_from_score(weight: torch.Tensor, s: torch.Tensor, config,
                    group: str | None, info: dict) -> Selection:
    """The mask of ``s`` (out, in; higher = keep) under ``config``'s pattern: N:M (permuted with
    ``permute``), the variant's per-row threshold, or exact counts per ``group``."""
    from llmprune.math.masks import (
        alpha_variant_search,
        channel_reallocation,
        nm_mask,
        permuted_nm_mask,
        unstructured_mask,
    )

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


def score_and_mask(weight: torch.Tensor, stats: LayerStats | None, config) -> Selection:
    """Score with the config's metric (|W|, ||X_j|| or |W| * ||X_j||), then mask."""
    from llmprune.math.scores import score

    group, metric = effective_group_metric(config)  # the same the result record shows
    if metric in ACTIVATION_METRICS and (stats is None or stats.sq_norm is None):
        raise ValueError(f"{config.method} with metric {metric!r} needs input norms; the engine passed none")
    sq_norm, tokens = (stats.sq_norm, stats.tokens) if stats is not None else (None, 0)
    s = score(weight, sq_norm, tokens, metric)  # (out, in) float32
    return mask_from_score(weight, s, config, group, {"metric": metric})


def finish(selection: Selection) -> tuple[torch.Tensor, dict]:
    """The selection's weight and its info with the counts of what was pruned."""
    info = selection.info
    info["pruned"] = int(selection.mask.sum().item())
    info["sparsity"] = info["pruned"] / selection.mask.numel()
    return selection.weight, info
