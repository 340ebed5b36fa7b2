"""Whole-block statistics. block_io, of the depth methods: what a whole block does to the residual
stream. block_inputs: no statistic, the calibration inputs themselves, for the steps that re-run
a block (SparseLLM's MLP coupling, the block reconstructions).

Per block, the mean cosine between its input and output hidden states over every calibration
token, and the last token's state at every block boundary (``llmprune.engine.drop`` computes both
in its dense pass; ``llmprune.math.drop`` holds the arithmetic).
"""

from __future__ import annotations

from llmprune.registry import COLLECTORS, CollectorSpec

COLLECTORS.add(CollectorSpec("block_io", "per block: mean cos(input, output) over all tokens and the "
                                         "last-token states at the block boundaries (depth methods)",
                             "block_io", memory=lambda n, *_: 0))
COLLECTORS.add(CollectorSpec("block_inputs", "the block's calibration inputs themselves: a block pass "
                                            "(SparseLLM, block reconstructions) re-runs the dense and the "
                                            "pruned block on them", "block_inputs", memory=lambda n, *_: 0))
