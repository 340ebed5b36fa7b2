"""uniform (an allocation): every decoder block pruned to the target sparsity (or N:M)."""

from __future__ import annotations

from llmprune.registry import ALLOCATIONS, StepSpec


def targets(blocks: int, config, ratios=None):
    from llmprune.math.allocation import uniform_targets

    return uniform_targets(blocks, config.sparsity, config.pattern.n, config.pattern.m)


SPEC = ALLOCATIONS.add(StepSpec(
    name="uniform", label="uniform", order=0, paper="none (a baseline)", code="none",
    summary="every block at the target", run=targets, extra={"nm": True},
))
