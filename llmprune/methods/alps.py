"""alps: ADMM with an adaptive penalty for the mask, then conjugate gradients on the kept weights.

Meng, Behdin, Wang & Mazumder 2024, "ALPS: Improved Optimization for Highly Sparse One-Shot
Pruning for Large Language Models", NeurIPS, arXiv:2406.07831; official code mazumder-lab/ALPS
(``alps.py`` ``ALPS_admm``). With the layer's Hessian (damped by 1% of its mean diagonal, then
normalised to a unit diagonal) ALPS solves min ||(W - W0) Xᵀ||² over weights with the pattern's
support by ADMM, W-step (H + rho I)^-1 from one eigendecomposition, the support the projection of
(V + rho W) / rho onto the pattern (the largest |.| over the whole matrix, or N of every M), and
rho raised by 1.3 / 1.2 / 1.1 as fast as the support still changes (restarted with rho / 5 while
it does not move at all); it stops when the support settles (after 30 iterations at most 0.03%
of the kept count changing, or no change once rho was raised), at most 300 iterations. Then 10
conjugate-gradient steps solve the least squares on the final support (the paper's PCG; with the
unit diagonal its Jacobi preconditioner is the identity).

Official defaults throughout: the drivers pass rho = 0.1 (their ``--rho`` flag only names the
output file). Every difference of the port: ``llmprune.math.solvers.alps``. The official
procedure amplifies float rounding (its support still changes by ~20% per check at small rho):
run against itself with the Hessian perturbed by 1e-7 it agrees on 99.94% of the mask, which
bounds what a port can show (docs/parity.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmprune.checks import check_number, check_positive, check_positive_number
from llmprune.errors import LlmpruneError
from llmprune.methods.base import Selection
from llmprune.registry import METHODS, MethodSpec, Supports, option


@dataclass(frozen=True)
class ALPSOptions:
    alps_rho: float = option(0.1, "ALPS initial ADMM penalty (official 0.1)")
    alps_iterations: int = option(300, "ALPS maximum ADMM iterations")
    alps_update_iter: int = option(3, "ALPS iterations between penalty updates")
    alps_switch_iter: int = option(30, "ALPS iteration after which a settled support stops the ADMM")
    alps_cg_iterations: int = option(10, "ALPS conjugate-gradient steps on the final support")
    percdamp: float = option(0.01, "SparseGPT Hessian damping, as a fraction of mean diag(H)")

    def __post_init__(self) -> None:
        check_positive_number(self.alps_rho, "alps_rho", 1e6, "the official 0.1")
        for name in ("alps_iterations", "alps_update_iter"):
            check_positive(getattr(self, name), name)
        for name in ("alps_switch_iter", "alps_cg_iterations"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) \
                    or getattr(self, name) < 0:
                raise LlmpruneError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        check_number(self.percdamp, "percdamp", 0.0, 1e3, hint=": a small non-negative fraction such as 0.01")


def select(weight, stats, config) -> Selection:
    from llmprune.math.solvers.alps import alps_prune

    if stats is None or stats.hessian is None:
        raise ValueError("alps needs the input Hessian; the engine passed none")
    new, mask, info = alps_prune(weight.detach().float(), stats.hessian, config.sparsity, config.pattern.n,
                                 config.pattern.m, rho=config.alps_rho, max_iter=config.alps_iterations,
                                 update_iter=config.alps_update_iter, switch_iter=config.alps_switch_iter,
                                 percdamp=config.percdamp, pcg_iters=config.alps_cg_iterations)
    return Selection(mask, new, info, updates=True)


SPEC = METHODS.add(MethodSpec(
    name="alps", label="ALPS", order=65,
    paper='Meng, Behdin, Wang & Mazumder 2024, "ALPS: Improved Optimization for Highly Sparse One-Shot '
          'Pruning for Large Language Models", NeurIPS',
    code="mazumder-lab/ALPS",
    summary="ADMM with an adaptive penalty chooses the support, conjugate gradients solve the kept weights",
    options=ALPSOptions, needs=("hessian",), supports=Supports(), select=select, default_group="layer",
))
