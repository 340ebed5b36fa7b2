"""angular: remove the n consecutive blocks l..l+n-1 whose ends are closest, min_l d(x^l, x^(l+n)).

Gromov, Tirumala, Shapourian, Glorioso & Roberts 2025, "The Unreasonable Ineffectiveness of the
Deeper Layers", ICLR, arXiv:2403.17887; no official code was released. d is the angular distance
arccos(cos(x^l, x^(l+n))) / pi between the hidden state entering block l and the one leaving block
l+n-1, on the last token of each calibration window, averaged over the windows (the paper's
choice: the final token of C4 validation samples); the state after the last block is the
final-norm output, as transformers' ``hidden_states`` give it. The paper then heals with QLoRA;
here that is ``llmprune recover``, a separate step.
"""

from __future__ import annotations

from llmprune.methods.drop import DropOptions, DropSpec, check
from llmprune.registry import METHODS, MethodSpec, Supports


def choose(cosines: list[float], states, n: int) -> tuple[list[int], list[float]]:
    from llmprune.math.drop import best_run

    return best_run(states, n)


SPEC = METHODS.add(MethodSpec(
    name="angular", label="Angular",
    paper='Gromov, Tirumala, Shapourian, Glorioso & Roberts 2025, "The Unreasonable Ineffectiveness of the '
          'Deeper Layers", ICLR, arXiv:2403.17887',
    code="none released (the paper's procedure)",
    summary="remove the n consecutive decoder blocks whose input and output are closest in angle",
    options=DropOptions, needs=("block_io",),
    supports=Supports(unstructured=False, nm=False, drop=True, select=False),
    check=check, structured=DropSpec(choose=choose, score_name="angular_distance"), order=61,
))
