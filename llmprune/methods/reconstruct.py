"""obs (a reconstruction): after any mask, re-solve the kept weights for ||WX - W'X||^2, mask fixed.

The OBS sweep of SparseGPT (Frantar & Alistarh 2023) with the mask given instead of chosen
(``llmprune.math.solvers.reconstruct``): columns in blocks of ``blocksize``, each pruned weight's
error spread over the columns not yet visited through the damped inverse Hessian's Cholesky
factor. It follows any method that exposes its mask (``--reconstruct``).
"""

from __future__ import annotations

from llmprune.methods.sparsegpt import SolverOptions
from llmprune.registry import RECONSTRUCTIONS, StepSpec


def reconstruct(dense, hessian, mask, config):
    """(new weight, info): the kept weights of ``dense`` re-solved for ``mask``."""
    from llmprune.math.solvers.reconstruct import reconstruct as solve

    return solve(dense, hessian, mask, config.percdamp, config.blocksize)


SPEC = RECONSTRUCTIONS.add(StepSpec(
    name="obs", label="reconstruct", suffix="+reconstruct", order=20,
    paper='Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in '
          'One-Shot", ICML (its OBS update, mask fixed)',
    code="IST-DASLab/sparsegpt",
    summary="re-solve the kept weights for the final mask (OBS sweep, mask fixed)",
    options=SolverOptions, needs=("hessian",), run=reconstruct,
))
