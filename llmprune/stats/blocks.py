"""The block_io statistic of the depth methods: what a whole block does to the residual stream.

Per block, the mean cosine between its input and output hidden states over every calibration
token, and the last token's state at every block boundary (``llmprune.engine.drop`` computes both
in its dense pass; ``llmprune.math.drop`` holds the arithmetic).
"""

from __future__ import annotations

from llmprune.registry import COLLECTORS, CollectorSpec

COLLECTORS.add(CollectorSpec("block_io", "per block: mean cos(input, output) over all tokens and the "
                                         "last-token states at the block boundaries (depth methods)",
                             "block_io", memory=lambda n, *_: 0))
