"""flap: remove the input channels with the smallest Var(x_j) * ||W_:j||^2; their mean output becomes a bias.

An, Zhao, Yu, Tang & Wang 2024, "Fluctuation-based Adaptive Structured Pruning for Large Language
Models", AAAI; official code CASIA-IVA-Lab/FLAP. The WIFV metric S_j = Var(x_j) * sum_i W_ij^2;
a head's score is the sum of S_j^2 over its dimensions (as its code does for attention). The
removed channels' mean contribution W[:, removed] @ mean(x)[removed] becomes a bias of
down_proj / o_proj. Its statistics come from the dense model, as in the official code; the same
fraction in every block (its "UL-UM" structure).
"""

from __future__ import annotations

from llmprune.methods.shrink import ShrinkOptions, StructuredSpec, check
from llmprune.registry import METHODS, MethodSpec, Supports


def channel_score(weight, moments, config):
    return moments.var * weight.detach().float().pow(2).sum(dim=0)  # (in,)


SPEC = METHODS.add(MethodSpec(
    name="flap", label="FLAP",
    paper='An, Zhao, Yu, Tang & Wang 2024, "Fluctuation-based Adaptive Structured Pruning for Large Language '
          'Models", AAAI',
    code="CASIA-IVA-Lab/FLAP",
    summary="remove whole MLP channels / KV groups by input fluctuation x ||W||^2, with bias compensation",
    options=ShrinkOptions, needs=("channel",), supports=Supports(unstructured=False, nm=False, shrink=True,
                                                                    select=False),
    channel_score=channel_score, check=check, default_group="layer",
    structured=StructuredSpec(head_power=2, dense_statistics=True, bias=True),
))
