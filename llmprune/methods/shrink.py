"""What the shrink methods (wanda-sp, flap) share: their options, what distinguishes one from
another besides its channel score, and the combinations they refuse.

A shrink method removes whole MLP channels and attention heads (``llmprune.engine.shrink`` does
the surgery); its per-layer function scores the input channels of the layer that reads them
(down_proj for MLP channels, o_proj for head dimensions). ``width_allocation`` decides how much
each block loses: the same everywhere, FLAP's global search, or OWL's outlier-weighted ratios
(which use OWL's own ``owl_m`` / ``owl_lambda``, declared here too so that they reach a shrink
method without ``--allocation``, whose per-block sparsity targets are the mask engine's).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from llmprune.checks import check_positive, choice
from llmprune.errors import LlmpruneError
from llmprune.methods.base import whole_structure_clashes
from llmprune.methods.owl import OwlOptions
from llmprune.registry import option

STRUCTURES = ("mlp", "heads", "both")
WIDTH_ALLOCATIONS = ("uniform", "global", "owl")
# OWL's own knobs (its allocation's fields, same defaults and help), which width_allocation owl uses
_OWL = {f.name: f for f in fields(OwlOptions)}


@dataclass(frozen=True)
class ShrinkOptions:
    structure: str = option("mlp", "structured methods (wanda-sp, flap): remove mlp (intermediate channels), "
                                   "heads (whole KV groups: a KV head with its query heads) or both")
    channel_multiple: int = option(32, "structured methods: keep a multiple of this many MLP channels (32: "
                                       "llama.cpp's q8_0 block; 1: the exact ratio)")
    width_allocation: str = option("uniform", "structured methods: MLP width and KV groups per block: "
                                              "uniform (the same in every block), global (FLAP's adaptive "
                                              "search: one ranking of all blocks' standardised scores) or "
                                              "owl (more removed from blocks with fewer outliers; owl_m, "
                                              "owl_lambda)")
    owl_m: float = option(_OWL["owl_m"].default, _OWL["owl_m"].metadata["help"])
    owl_lambda: float = option(_OWL["owl_lambda"].default, _OWL["owl_lambda"].metadata["help"])

    def __post_init__(self) -> None:
        object.__setattr__(self, "structure", choice(self.structure, STRUCTURES, "structure"))
        check_positive(self.channel_multiple, "channel_multiple")
        object.__setattr__(self, "width_allocation",
                           choice(self.width_allocation, WIDTH_ALLOCATIONS, "width allocation"))
        OwlOptions(owl_m=self.owl_m)  # OWL's own check of M


@dataclass(frozen=True)
class StructuredSpec:
    """What distinguishes one shrink method from another, besides its channel score."""

    head_power: int  # a head's score is the sum of S_j ** head_power over its dimensions
    dense_statistics: bool  # statistics from the dense model (FLAP) or the pruned blocks before (Wanda-sp)
    bias: bool  # add the removed channels' mean contribution as a bias


def check(config) -> None:
    if not 0.0 < config.sparsity < 1.0:
        raise LlmpruneError(f"structured sparsity {config.sparsity} is outside (0, 1): give the fraction of "
                            "each block's parameters to remove, such as 0.3")
    clashes = whole_structure_clashes(config)
    if clashes:
        raise LlmpruneError(f"{config.method} removes whole channels and heads: {clashes[0]} does not apply "
                            "(use --structure mlp|heads|both to choose what is removed, --width-allocation "
                            "global|owl for widths that differ per block)")
    if config.width_allocation == "owl":
        from llmprune.math.allocation import check_spread  # torch: the specs load without it

        check_spread(config.owl_lambda, config.sparsity, "owl_lambda")
        return
    changed = [f"--{name.replace('_', '-')}" for name in ("owl_m", "owl_lambda")
               if getattr(config, name) != _OWL[name].default]
    if changed:
        raise LlmpruneError(f"{changed[0]} sets OWL's per-block widths, which --width-allocation "
                            f"{config.width_allocation} does not use: add --width-allocation owl or drop it")
