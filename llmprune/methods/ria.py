"""ria: drop the smallest (|W_ij| / sum_col|W| + |W_ij| / sum_row|W|) * ||X_j||^a of the whole matrix.

Zhang, Bai, Lin, Wang & Liu 2024, "Plug-and-Play: An Efficient Post-training Pruning Method for
Large Language Models", ICLR; official code
biomedical-cybernetics/Relative-importance-and-activation-pruning. Relative importance times the
input norm to the power a (a = 0.5), one threshold over the whole matrix (the official default,
``per_outneuron`` off). With ``permute`` and an N:M pattern: its heuristic channel reallocation
before masking. The official ``prune_ria`` prunes scores ``<=`` the value at int(s * n), one weight
more than our exact int(s * n).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmprune.checks import check_number
from llmprune.methods.base import check_group, mask_from_score
from llmprune.registry import METHODS, MethodSpec, Supports, option


@dataclass(frozen=True)
class RiaOptions:
    ria_a: float = option(0.5, "RIA activation exponent a in (|W|/sum_row + |W|/sum_col) * ||X||^a")
    group: str | None = option(None, "comparison group: row, column or layer (None: the method's)")

    def __post_init__(self) -> None:
        check_number(self.ria_a, "ria_a", hint=" (the official default is 0.5)")
        check_group(self.group)


def select(weight, stats, config):
    from llmprune.math.scores import ria_score

    if stats is None or stats.sq_norm is None:
        raise ValueError("ria needs input norms; the engine passed none")
    s = ria_score(weight, stats.sq_norm, stats.tokens, config.ria_a)  # (out, in)
    return mask_from_score(weight, s, config, config.group or "layer", {"a": config.ria_a})


SPEC = METHODS.add(MethodSpec(
    name="ria", label="RIA", order=40,
    paper='Zhang, Bai, Lin, Zhao, Hou & Cannistraci 2024, "Plug-and-Play: An Efficient Post-training Pruning '
          'Method for Large Language Models", ICLR',
    code="biomedical-cybernetics/Relative-importance-and-activation-pruning",
    summary="relative importance x input norm^a, one threshold per matrix; channel permutation for N:M",
    options=RiaOptions, needs=("norms",), supports=Supports(permute=True), select=select,
    default_group="layer",
))
