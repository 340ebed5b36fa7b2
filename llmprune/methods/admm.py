"""admm: gradual ADMM pruning (a method), and the ADMM weight update after any mask (a reconstruction).

Boža 2024, "Fast and Effective Weight Update for Pruned Large Language Models", TMLR,
arXiv:2401.02938; official code fmfi-compbio/admm-pruning (``lib/admm.py`` ``AdmmPruner``). With
the layer's Hessian H = 2 XᵀX / tokens, both minimise ||(W - W0) Xᵀ||² over weights that are zero
on a mask, by ADMM in the coordinates where every input has unit energy (the official
normalisation by sqrt(diag H)):

    Z <- (W + U) masked,   U <- U + W - Z,   W <- (W0 Hd + rho (Z - U)) (Hd + rho I)^-1

* ``--reconstruct admm``: the mask is the method's (Wanda's, RIA's ...), fixed; 20 iterations at
  rho = 1 and damping 0.1 x mean(diag), the official defaults, instead of the OBS sweep.
* ``--method admm``: the official gradual pruning: during the first 15 of the 20 iterations the
  mask is re-chosen from |W + U| (Wanda's score on the iterate) over the whole matrix (the
  official ``per_out=False``), then the update runs on the final mask. The official code passes
  the target sparsity to every re-selection of an unstructured mask, so we do; N:M follows the
  cubic schedule, as the official N:M branch.

The arithmetic, every official line it follows and where it differs: ``llmprune.math.solvers.admm``.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmprune.checks import check_number, check_positive, check_positive_number
from llmprune.errors import LlmpruneError
from llmprune.methods.base import Selection
from llmprune.registry import METHODS, RECONSTRUCTIONS, MethodSpec, StepSpec, Supports, option

PAPER = ('Boža 2024, "Fast and Effective Weight Update for Pruned Large Language Models", Transactions on '
         'Machine Learning Research (arXiv:2401.02938{})')
CODE = "fmfi-compbio/admm-pruning"


@dataclass(frozen=True)
class ADMMOptions:
    """The ADMM solver's knobs (the update and the gradual pruning share them)."""

    admm_iterations: int = option(20, "ADMM iterations per layer")
    admm_rho: float = option(1.0, "ADMM penalty rho (the inputs are normalised to unit energy first)")
    admm_percdamp: float = option(0.1, "ADMM damping added to each input's diagonal after the inputs are "
                                       "normalised to unit energy (official 0.1)")

    def __post_init__(self) -> None:
        check_positive(self.admm_iterations, "admm_iterations")
        check_positive_number(self.admm_rho, "admm_rho", 1e6, "the official 1.0")
        check_number(self.admm_percdamp, "admm_percdamp", 0.0, 1e3, hint=": a small fraction such as 0.1")


@dataclass(frozen=True)
class GradualADMMOptions(ADMMOptions):
    admm_prune_iterations: int = option(15, "ADMM iterations that re-choose the mask (the rest keep it)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.admm_prune_iterations <= self.admm_iterations:
            raise LlmpruneError(f"admm_prune_iterations {self.admm_prune_iterations} must be from 0 to "
                                f"admm_iterations {self.admm_iterations}: the mask reaches the target only "
                                "at the last of them")


def update(dense, hessian, mask, config):
    """(new weight, info): the kept weights of ``dense`` re-solved for ``mask`` by ADMM."""
    from llmprune.math.solvers.admm import admm_update

    return admm_update(dense, hessian, mask, iterations=config.admm_iterations, rho=config.admm_rho,
                       percdamp=config.admm_percdamp)


def select(weight, stats, config) -> Selection:
    from llmprune.math.solvers.admm import admm_prune

    if stats is None or stats.hessian is None:
        raise ValueError("admm needs the input Hessian; the engine passed none")
    new, mask, info = admm_prune(weight.detach().float(), stats.hessian, config.sparsity, config.pattern.n,
                                 config.pattern.m, iterations=config.admm_iterations,
                                 prune_iterations=config.admm_prune_iterations, rho=config.admm_rho,
                                 percdamp=config.admm_percdamp)
    return Selection(mask, new, info, updates=True, own_update="admm")


SPEC = METHODS.add(MethodSpec(
    name="admm", label="ADMM", order=60, paper=PAPER.format(""), code=CODE,
    summary="gradual ADMM: the mask re-chosen from |W + U| over 15 iterations, then the ADMM update",
    options=GradualADMMOptions, needs=("hessian",), supports=Supports(), select=select, default_group="layer",
))

RECONSTRUCTION = RECONSTRUCTIONS.add(StepSpec(
    name="admm", label="ADMM update", suffix="+ADMM", order=30,
    paper=PAPER.format("; its update, mask fixed"),
    code=CODE, summary="re-solve the kept weights for the final mask by ADMM (20 iterations, rho 1)",
    options=ADMMOptions, needs=("hessian",), run=update,
))
