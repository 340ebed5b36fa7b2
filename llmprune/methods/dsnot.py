"""dsnot (a refiner): training-free prune-and-grow of a method's mask.

Zhang et al. 2024, "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs", ICLR,
arXiv:2310.08915; official code zyxxmu/DSnoT (``prune_DSnoT``). Per output row, a pruned weight is
swapped back in for a kept one whenever that shrinks the row's expected reconstruction error;
the math, its defaults and every place it differs from the official code are in
``llmprune.math.dsnot``. It follows any method that exposes its mask; SparseGPT's own update is
redone for the refined mask by the OBS reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmprune.checks import check_number, check_positive, choice
from llmprune.registry import REFINERS, StepSpec, option

SKIPS = ("mlp", "self_attn", "none")


@dataclass(frozen=True)
class DSnoTOptions:
    dsnot_cycles: int = option(50, "DSnoT maximum prune-and-grow cycles per layer")
    dsnot_threshold: float = option(0.1, "DSnoT update threshold on |reconstruction error| per row")
    dsnot_var_power: float = option(1.0, "DSnoT exponent of the input variance in the growing criterion")
    dsnot_skip: str = option("mlp", "DSnoT leaves these layers' masks as they are: mlp (official default), "
                                    "self_attn or none")

    def __post_init__(self) -> None:
        check_positive(self.dsnot_cycles, "dsnot_cycles")
        check_number(self.dsnot_threshold, "dsnot_threshold", 0.0)
        check_number(self.dsnot_var_power, "dsnot_var_power")
        object.__setattr__(self, "dsnot_skip", choice(self.dsnot_skip, SKIPS, "dsnot_skip"))


def refines(layer: str, config) -> bool:
    """Whether DSnoT changes layer ``layers.{i}.{part}.{proj}``'s mask (the official --skip_layer)."""
    from llmprune.math.dsnot import skipped

    return not skipped(layer, config.dsnot_skip)


def refine(dense, sel, stats, config, layer: str):
    """(mask, info): ``sel``'s mask after prune-and-grow (unchanged for a skipped layer)."""
    import torch

    from llmprune.math.dsnot import dsnot
    from llmprune.math.scores import score

    if not refines(layer, config):
        return sel.mask, {"name": "dsnot", "skipped": True}
    x_mean = stats.x_sum / max(stats.windows, 1)  # (in,) per-window sums, averaged
    var = stats.var_sum / max(stats.windows, 1)  # (in,)
    wanda = score(dense, stats.sq_norm, stats.tokens, "wanda")
    n, m = config.pattern.n, config.pattern.m
    perm = sel.perm if sel.perm is not None else slice(None)
    s = sel.score
    mask, info = dsnot(dense[:, perm], sel.mask[:, perm], x_mean[perm], var[perm], wanda[:, perm],
                       None if s is None else s[:, perm], n, m, cycles=config.dsnot_cycles,
                       threshold=config.dsnot_threshold, var_power=config.dsnot_var_power)
    out = torch.empty_like(mask)
    out[:, perm] = mask
    return out, {"name": "dsnot", **info}


SPEC = REFINERS.add(StepSpec(
    name="dsnot", label="DSnoT", suffix="+DSnoT", order=10,
    paper='Zhang, Zhao, Lin, Sun, Yao, Han, Tanner, Liu & Ji 2024, "Dynamic Sparse No Training: '
          'Training-Free Fine-tuning for Sparse LLMs", ICLR',
    code="zyxxmu/DSnoT",
    summary="training-free prune-and-grow of the mask, row by row",
    options=DSnoTOptions, needs=("norms", "moments"), run=refine, extra={"layer_filter": refines},
))
