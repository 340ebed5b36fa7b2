"""owl (an allocation): outlier-weighted layerwise sparsity; blocks with more outliers are pruned less.

Yin et al. 2024, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning
LLMs to High Sparsity", ICML, arXiv:2310.05175; official code luuyin/OWL. A block's outlier ratio D
is the share of its Wanda scores above M x their mean, from a pass of the calibration windows
through the dense model before any block is pruned (the engine's dense statistics pass); block
sparsities span 2 lambda around the target, mean exactly the target. N:M (the official
``prune_wanda_outlier_structure``, Wanda only): block i keeps N + r_i of every M. The math and
where it differs from the official code: ``llmprune.math.allocation``.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmprune.checks import check_number, check_positive
from llmprune.errors import LlmpruneError
from llmprune.registry import ALLOCATIONS, StepSpec, option


@dataclass(frozen=True)
class OwlOptions:
    owl_m: float = option(5.0, "OWL outlier threshold M: a Wanda score is an outlier above M x the "
                               "block's mean score")
    owl_lambda: float = option(0.08, "OWL lambda: block sparsities span 2*lambda around the target (N:M: "
                                     "lambda*M weights per group)")
    owl_nsamples: int | None = option(None, "calibration windows for OWL's dense statistics pass (None: all, "
                                            "as the official code)")

    def __post_init__(self) -> None:
        check_positive(self.owl_nsamples, "owl_nsamples", allow_none=True)
        if check_number(self.owl_m, "owl_m") <= 0:
            raise LlmpruneError(f"owl_m {self.owl_m} must be positive (the official default is 5)")


def check(config) -> None:
    from llmprune.math.allocation import check_spread

    check_spread(config.owl_lambda, config.sparsity, "owl_lambda")


def targets(blocks: int, config, ratios):
    """Per-block targets from the outlier ratios of the blocks with selected layers (``ratios``)."""
    from llmprune.math.allocation import owl_targets

    return owl_targets(ratios, config.sparsity, config.pattern.n, config.pattern.m, config.owl_lambda)


SPEC = ALLOCATIONS.add(StepSpec(
    name="owl", label="OWL", prefix="OWL-", order=10,
    paper='Yin, Wu, Zhang, Hsieh, Wang, Jia, Li, Jaiswal, Pechenizkiy, Liang, Bendersky, Wang & Liu 2024, '
          '"Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High '
          'Sparsity", ICML',
    code="luuyin/OWL",
    summary="outlier-weighted per-block sparsity from a dense statistics pass",
    options=OwlOptions, needs=("norms",), run=targets, check=check, extra={"nm": True, "dense_pass": True},
))
