"""wanda-sp: remove the input channels with the smallest mean_i |W_ij| * ||x_j||_2 (whole channels and heads).

Wanda's structured variant, as An et al.'s FLAP code ships it (``prune_wanda_sp``,
CASIA-IVA-Lab/FLAP). S_j = mean over output rows i of |W_ij| * ||x_j||_2 on the input of the layer
that reads channel j; a head's score is the sum of its dimensions' S_j, a KV group's the sum of its
query heads'. Its statistics come from the blocks already pruned, as in its code, which prunes the
same fraction in every block.

Per-block widths (ours; the official ``prune_wanda_sp`` has none): ``--width-allocation global``
takes the per-block counts from FLAP's global search (``llmprune.methods.flap``) run on these
scores from a dense pass (the official FLAP code's "WIFN" metric is this score; heads by the sum
of S_j, not S_j^2), then picks the channels in the usual sequential pass; ``owl`` takes each
block's fraction from OWL's outlier ratios. No bias compensation either way.
"""

from __future__ import annotations

from llmprune.methods.shrink import ShrinkOptions, StructuredSpec, check
from llmprune.registry import METHODS, MethodSpec, Supports


def channel_score(weight, moments, config):
    import torch

    norm = torch.sqrt(moments.sq_norm / max(moments.tokens, 1))  # (in,)
    return (weight.detach().float().abs() * norm).mean(dim=0)  # (in,)


SPEC = METHODS.add(MethodSpec(
    name="wanda-sp", label="Wanda-sp",
    paper='An, Zhao, Yu, Tang & Wang 2024, "Fluctuation-based Adaptive Structured Pruning for Large Language '
          'Models", AAAI (its Wanda-sp baseline)',
    code="CASIA-IVA-Lab/FLAP (prune_wanda_sp)",
    summary="remove whole MLP channels / KV groups with the smallest mean |W| * ||x||",
    options=ShrinkOptions, needs=("channel",), supports=Supports(unstructured=False, nm=False, shrink=True,
                                                                    select=False),
    channel_score=channel_score, check=check, default_group="layer",
    structured=StructuredSpec(head_power=1, dense_statistics=False, bias=False),
))
