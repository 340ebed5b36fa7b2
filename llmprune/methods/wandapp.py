"""wanda++: Wanda's score with block-local ("regional") gradients added.

Yang et al. 2025, "Wanda++: Pruning Large Language Models via Regional Gradients",
arXiv:2503.04992 (ICLR 2025 workshop on sparsity in LLMs). No official code: implemented from the
paper. The regional gradient score (RGS) of weight W_ij is

    S_ij = (alpha * G_ij + ||X_j||_2) * |W_ij|

with ||X_j||_2 Wanda's input norm and G the gradient of the L2 norm of the decoder block's output
with respect to W, from a backward pass through this one block (``llmprune.stats.gradient``:
per-window gradients aggregated as a root mean square). Scores are compared within each output
row, as Wanda's. Where the paper left us to choose: the RMS aggregation over windows, the norm of
the whole window's output as the loss, and alpha = 100 as the default. Only the score is here; the
paper's regional optimisation (a few block-local weight updates) is not.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmprune.checks import check_number
from llmprune.methods.base import mask_from_score
from llmprune.registry import METHODS, MethodSpec, Supports, option


@dataclass(frozen=True)
class WandaPPOptions:
    wandapp_alpha: float = option(100.0,
                                  "Wanda++ weight alpha of the regional gradient in (alpha |G| + ||X||) |W|")

    def __post_init__(self) -> None:
        check_number(self.wandapp_alpha, "wandapp_alpha", 0.0)


def select(weight, stats, config):
    from llmprune.math.scores import input_norm

    grad = stats.extra["regional_grad"].to(weight.device)  # (out, in)
    norm = input_norm(stats.sq_norm, stats.tokens)  # (in,)
    s = (config.wandapp_alpha * grad + norm) * weight.detach().float().abs()  # (out, in)
    return mask_from_score(weight, s, config, "row", {"alpha": config.wandapp_alpha})


SPEC = METHODS.add(MethodSpec(
    name="wanda++", label="Wanda++", order=45,
    paper='Yang, Zhen, Ganesh, Galstyan, Huybrechts, Müller, Kübler, Swaminathan, Mouchtaris, Bodapati, '
          'Susanj, Zhang, FitzGerald & Kumar 2025, "Wanda++: Pruning Large Language Models via Regional '
          'Gradients", ICLR Workshop on Sparsity in LLMs (arXiv:2503.04992)',
    code="none (implemented from the paper)",
    summary="(alpha |G| + ||X_j||) |W|, G the block-local gradient of the block output's norm",
    options=WandaPPOptions, needs=("norms", "regional_grad"), supports=Supports(), select=select,
))
