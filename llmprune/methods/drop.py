"""What the depth methods (shortgpt, angular) share: their option, what distinguishes one from the
other besides its block statistic, and the combinations they refuse.

A depth method removes whole decoder blocks (``llmprune.engine.drop`` runs the dense pass and the
removal): the model keeps ``num_hidden_layers - n`` blocks, renumbered, and its config says so,
so the result saves and loads as a standard, shallower checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from llmprune.checks import check_number
from llmprune.errors import LlmpruneError
from llmprune.methods.base import whole_structure_clashes
from llmprune.registry import option


@dataclass(frozen=True)
class DropOptions:
    remove_blocks: int = option(0, "depth methods (shortgpt, angular): decoder blocks to remove (0: round("
                                   "sparsity x blocks))")

    def __post_init__(self) -> None:
        value = check_number(self.remove_blocks, "remove_blocks")
        if value != int(value) or value < 0:
            raise LlmpruneError(f"remove_blocks {self.remove_blocks} must be a whole number of blocks, at "
                                "least 0 (0: round(sparsity x blocks))")
        object.__setattr__(self, "remove_blocks", int(value))


@dataclass(frozen=True)
class DropSpec:
    """How a depth method chooses: ``choose(cosines, states, n) -> (blocks, scores)`` from the
    per-block mean cosine between input and output (all tokens) and the last-token states at
    every block boundary (L+1 tensors (windows, hidden), the last after the final norm)."""

    choose: Callable
    score_name: str  # what ``scores`` are, as the report names them


def removed_count(config, blocks: int) -> int:
    """Blocks to remove: ``remove_blocks``, else the sparsity's share of the blocks (rounded);
    at least one, and at least one block must stay."""
    n = config.remove_blocks or round(config.sparsity * blocks)
    if n < 1:
        raise LlmpruneError(f"sparsity {config.sparsity:g} of {blocks} blocks removes no block: give "
                            "--remove-blocks N or a larger --sparsity")
    if n >= blocks:
        raise LlmpruneError(f"removing {n} of {blocks} decoder blocks would leave no block: remove at most "
                            f"{blocks - 1}")
    return n


def check(config) -> None:
    clashes = whole_structure_clashes(config, ("--offload", config.offload is not None))
    if clashes:
        raise LlmpruneError(f"{config.method} removes whole decoder blocks: {clashes[0]} does not apply "
                            "(choose how many with --remove-blocks N)")
