"""random: drop a uniformly random set of weights in each output row (exact counts), or N of every M.

The baseline every pruning paper beats, written as a third-party llmprune plugin: one module that
registers a MethodSpec when llmprune loads the entry point ``random`` of the group
``llmprune.methods``. Nothing in llmprune names it. Torch is imported when a layer is pruned, so
llmprune can read the spec (for ``--help``, recipes and report tables) without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmprune.checks import check_positive
from llmprune.methods.base import mask_from_score
from llmprune.registry import METHODS, MethodSpec, Supports, option


@dataclass(frozen=True)
class RandomOptions:
    random_seed: int = option(0, "seed of the random scores (each layer draws from it in turn)")

    def __post_init__(self) -> None:
        check_positive(self.random_seed + 1, "random_seed + 1")


def select(weight, stats, config):
    import torch

    generator = torch.Generator().manual_seed(config.random_seed + weight.shape[0] * 7919 + weight.shape[1])
    score = torch.rand(weight.shape, generator=generator).to(weight.device)  # (out, in), higher = keep
    return mask_from_score(weight, score, config, "row", {"seed": config.random_seed})


METHODS.add(MethodSpec(
    name="random", label="Random", paper="the usual baseline", code="tests/plugins/llmprune-random",
    summary="a uniformly random mask per output row", options=RandomOptions, supports=Supports(),
    select=select,
))
