"""wanda: drop the smallest |W_ij| * ||X_j||_2 of each output row; no weight update.

Sun, Liu, Bair & Kolter 2024, "A Simple and Effective Pruning Approach for Large Language
Models", ICLR, arXiv:2306.11695; official code locuslab/wanda. ||X_j||_2 is the L2 norm of
input channel j over all calibration tokens, and scores are compared within each output row
(the paper's ablation: ``group`` and ``metric``; its appendix's cumulative-score threshold:
``use_variant``). The reference averages squared norms per sample, ours per token: a constant
factor, the same masks. N:M keeps N of every M (the reference's ``prune_n`` counts zeros).
"""

from __future__ import annotations

from llmprune.methods.base import ScoreOptions, check_variant, score_and_mask, score_needs
from llmprune.registry import METHODS, MethodSpec, Supports

SPEC = METHODS.add(MethodSpec(
    name="wanda", label="Wanda", order=30,
    paper='Sun, Liu, Bair & Kolter 2024, "A Simple and Effective Pruning Approach for Large '
          'Language Models", ICLR',
    code="locuslab/wanda",
    summary="drop the smallest |W_ij| * ||X_j||_2 of each output row; no weight update",
    options=ScoreOptions, needs=("norms",), supports=Supports(permute=True, nm_allocation=True),
    select=score_and_mask, check=check_variant, default_group="row", default_metric="wanda",
    needs_for=score_needs,
))
