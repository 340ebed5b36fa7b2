"""magnitude: drop the smallest |W_ij|, by default over the whole matrix. No calibration.

Han et al. 2015, "Learning both Weights and Connections for Efficient Neural Networks" (NeurIPS);
the LLM baseline of Wanda and SparseGPT. Score |W_ij|, one threshold over the whole matrix
(group "layer"), as locuslab/wanda ``prune_magnitude``. Counts are exact, floor(s * group); the
reference prunes ``|W| <= sorted[int(s * numel)]``, one weight more plus every tie.
"""

from __future__ import annotations

from llmprune.methods.base import ScoreOptions, check_variant, score_and_mask, score_needs
from llmprune.registry import METHODS, MethodSpec, Supports

SPEC = METHODS.add(MethodSpec(
    name="magnitude", label="Magnitude", order=10,
    paper='Han, Pool, Tran & Dally 2015, "Learning both Weights and Connections for Efficient Neural '
          'Networks", NeurIPS',
    code="locuslab/wanda (prune_magnitude)",
    summary="drop the smallest |W|, one threshold per matrix; no calibration",
    options=ScoreOptions, supports=Supports(), select=score_and_mask, check=check_variant,
    default_group="layer", default_metric="weight", needs_for=score_needs,
))
