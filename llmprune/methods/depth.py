"""depth (an allocation): sparsity rising linearly with depth, block i of L at
s - delta + 2 delta i / (L - 1).

The mean is exactly s. No official code (a simple baseline beside OWL); unstructured only.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmprune.checks import check_number
from llmprune.registry import ALLOCATIONS, StepSpec, option


@dataclass(frozen=True)
class DepthOptions:
    depth_delta: float = option(0.08, "depth allocation: first block target - delta, last target + delta")

    def __post_init__(self) -> None:
        check_number(self.depth_delta, "depth_delta")


def check(config) -> None:
    from llmprune.math.allocation import check_spread

    check_spread(config.depth_delta, config.sparsity, "depth_delta")


def targets(blocks: int, config, ratios=None):
    from llmprune.math.allocation import depth_targets

    return depth_targets(blocks, config.sparsity, config.depth_delta)


SPEC = ALLOCATIONS.add(StepSpec(
    name="depth", label="depth", prefix="Depth-", order=20, paper="none (a baseline)", code="none",
    summary="sparsity rising linearly with depth", options=DepthOptions, run=targets, check=check,
    extra={"nm": False},
))
