"""ro (a block reconstruction): Wanda++'s regional optimisation, a few RMSprop steps on the kept
weights of each block toward the dense block's output.

Yang et al. 2025, "Wanda++: Pruning Large Language Models via Regional Gradients", arXiv:2503.04992
(its second half; the first is the score of ``--method wanda++``). No official code; the paper
points to the community reproduction TTTTTTris/wandaplus, whose defaults we take. Per block, with
X the pruned model's inputs to it and Y = block_dense(X):

    for each of 5 rounds:  32 RMSprop steps (lr 3e-7), each on one random calibration window,
                           on the summed squared error || block(X_w; M * W) - Y_w ||^2

only the pruned Linears' kept weights moving. Where we differ from the reproduction: it
re-selects the mask at the start of every round and after the last, lets the pruned weights move
between selections, and never clears the gradient between steps (each step follows the sum of
all gradients so far). We keep the method's mask fixed, the pruned weights at zero and clear the
gradient every step, as the paper describes the update; with the pruned weights held at zero a
re-selection by the same score keeps the same mask, so the rounds differ only in their window
order. The windows of a round are drawn without replacement, several passes when the round asks
for more than there are. The optimisation itself: ``llmprune.math.solvers.blockopt``.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmprune.checks import check_positive, check_positive_number
from llmprune.registry import BLOCK_STEPS, StepSpec, option


@dataclass(frozen=True)
class ROOptions:
    ro_rounds: int = option(5, "Wanda++ regional optimisation rounds per block")
    ro_samples: int = option(32, "RO steps per round, one calibration window each")
    ro_lr: float = option(3e-7, "RO RMSprop learning rate")

    def __post_init__(self) -> None:
        check_positive(self.ro_rounds, "ro_rounds")
        check_positive(self.ro_samples, "ro_samples")
        check_positive_number(self.ro_lr, "ro_lr", 1.0, "the reproduction's 3e-7")


def run(dense, block, layers, hidden, kwargs, config, state: dict) -> dict:
    """RO on ``block`` toward ``dense`` from the pruned stream ``hidden``; returns the losses."""
    import torch

    from llmprune.blocks import block_device, block_output
    from llmprune.math.solvers.blockopt import mean_loss, optimise_kept

    dev = block_device(block)
    with torch.no_grad():
        y = torch.cat([block_output(dense(hidden[i:i + 1].to(dev), **kwargs)).to(hidden.device)
                       for i in range(hidden.shape[0])])

    def forward(x):
        return block_output(block(x, **kwargs))

    pairs = [(layer.weight, layer.weight == 0) for layer in layers.values()]
    before = mean_loss(forward, hidden, y, "mse", 1, dev)
    for r in range(config.ro_rounds):
        optimise_kept(forward, pairs, hidden, y, steps=config.ro_samples, lr=config.ro_lr,
                      optimizer="rmsprop", batch_size=1, loss="mse_sum", order="random",
                      seed=config.calib.seed * 1000 + r, lr_flag="--ro-lr", evaluate=False)
    return {"name": "ro", "rounds": config.ro_rounds, "steps": config.ro_rounds * config.ro_samples,
            "initial_loss": before, "final_loss": mean_loss(forward, hidden, y, "mse", 1, dev)}


SPEC = BLOCK_STEPS.add(StepSpec(
    name="ro", label="regional optimisation", suffix="+RO", order=20,
    paper='Yang et al. 2025, "Wanda++: Pruning Large Language Models via Regional Gradients", ICLR '
          'Workshop on Sparsity in LLMs (arXiv:2503.04992; its regional optimisation)',
    code="none (the paper's reproduction TTTTTTris/wandaplus)",
    summary="a few RMSprop steps on each block's kept weights toward the dense block's output",
    options=ROOptions, needs=("block_inputs",), run=run,
))
