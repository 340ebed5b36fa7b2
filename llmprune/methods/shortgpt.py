"""shortgpt: remove the n blocks with the lowest Block Influence BI_i = 1 - mean_t cos(x_i,t, x_i+1,t).

Men, Xu, Zhang, Wang, Lin, Lu, Han & Chen 2024, "ShortGPT: Layers in Large Language Models are
More Redundant Than You Expect", arXiv:2403.03853; official code icip-cas/ShortGPT. A block that
barely turns the hidden state of any token does little: BI is one minus the cosine between the
block's input and output, over every calibration token, from one pass of the dense model; the n
lowest go at once. As in the official code the state after the last block is the final-norm
output (transformers' ``hidden_states[-1]``). Where we differ: the official code sums BI over
256-token strides of PG19 documents; we average over llmprune's calibration windows (the same
ranking for equal token counts per block) in float64.
"""

from __future__ import annotations

from llmprune.methods.drop import DropOptions, DropSpec, check
from llmprune.registry import METHODS, MethodSpec, Supports


def choose(cosines: list[float], states, n: int) -> tuple[list[int], list[float]]:
    from llmprune.math.drop import lowest

    influence = [1.0 - c for c in cosines]
    return lowest(influence, n), influence


SPEC = METHODS.add(MethodSpec(
    name="shortgpt", label="ShortGPT",
    paper='Men, Xu, Zhang, Wang, Lin, Lu, Han & Chen 2024, "ShortGPT: Layers in Large Language Models are '
          'More Redundant Than You Expect", arXiv:2403.03853',
    code="icip-cas/ShortGPT",
    summary="remove the decoder blocks with the lowest Block Influence (1 - cos(input, output))",
    options=DropOptions, needs=("block_io",),
    supports=Supports(unstructured=False, nm=False, drop=True, select=False),
    check=check, structured=DropSpec(choose=choose, score_name="block_influence"), order=60,
))
