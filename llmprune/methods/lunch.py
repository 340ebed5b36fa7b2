"""lunch (a block reconstruction): after the masks, retrain each block's kept weights toward the
dense block, the attention half and the MLP half separately.

Wagner, Roux, Zimmer & Pokutta 2025, "A Free Lunch in LLM Compression: Revisiting Retraining after
Pruning", arXiv:2510.14444; official code ZIB-IOL/Free-Lunch-in-LLM-Compression. A pre-norm block
is cut at its residual stream into the attention half H = X + Attn(LN1 X) and the MLP half
Y = H + MLP(LN2 H). Each is trained in turn, attention first, on the mean-squared error to the
dense block's H and Y:

    min over the kept weights of   || half(X; M * W) - half_dense(X) ||^2

with every parameter of the half training (the masked Linears' kept weights and the norms), AdamW
(weight decay 0) under a linear schedule with 10% warm-up, the calibration windows in order in
batches of 2 for one epoch: the official code's defaults. Also as the official default, the
halves learn from the *dense* model's activations (its inputs to the block, and the dense H as
the MLP half's input): ``--lunch-inputs pruned`` trains on the pruned model's instead.

Where we differ: the official code re-parametrises W = W_orig * M (torch prune) and trains under
fp16 autocast; we zero the pruned entries' gradients and re-zero them after each step (with AdamW
at weight decay 0 the same iterates) in float32. A family whose block is not two pre-norm halves
(found numerically, ``llmprune.blocks.BlockHalves``) is trained as one whole block. The official
hyper-parameters came from a sweep the repository does not hold; its defaults are what we use,
and they move the weights little with few windows: ``--lunch-lr`` and ``--lunch-epochs`` are
there to change it. The optimisation itself: ``llmprune.math.solvers.blockopt``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmprune.checks import check_number, check_positive, check_positive_number, choice
from llmprune.registry import BLOCK_STEPS, StepSpec, option

INPUTS = ("dense", "pruned")


@dataclass(frozen=True)
class LunchOptions:
    lunch_lr: float = option(1e-5, "block reconstruction (lunch) AdamW peak learning rate")
    lunch_epochs: int = option(1, "lunch passes over the calibration windows, per half")
    lunch_batch_size: int = option(2, "lunch calibration windows per step")
    lunch_warmup: float = option(0.1, "lunch linear warm-up, as a fraction of the steps")
    lunch_inputs: str = option("dense", "lunch trains on the dense model's activations (dense, official) "
                                        "or the pruned model's (pruned)")

    def __post_init__(self) -> None:
        check_positive_number(self.lunch_lr, "lunch_lr", 1.0, "the official 1e-5")
        check_positive(self.lunch_epochs, "lunch_epochs")
        check_positive(self.lunch_batch_size, "lunch_batch_size")
        check_number(self.lunch_warmup, "lunch_warmup", 0.0, 1.0, hint=": a fraction such as 0.1")
        object.__setattr__(self, "lunch_inputs", choice(self.lunch_inputs, INPUTS, "lunch_inputs"))


def masked_pairs(layers: dict, params) -> list:
    """(parameter, mask) for ``params``: a pruned layer's weight with its zeros as the mask (True =
    stays zero), anything else (norms, biases, layers left dense) trains whole (None)."""
    pruned = {id(layer.weight): layer.weight for layer in layers.values()}
    return [(p, (p == 0) if id(p) in pruned else None) for p in params]


def run(dense, block, layers, hidden, kwargs, config, state: dict) -> dict:
    """Retrain ``block``'s kept weights toward ``dense``; returns the losses before and after."""
    import torch

    from llmprune.blocks import BlockHalves, block_device
    from llmprune.math.solvers.blockopt import optimise_kept, reconstruct_halves

    dev = block_device(block)
    x = hidden if config.lunch_inputs == "pruned" else state.get("dense_hidden", hidden)
    whole, halves = BlockHalves(dense, kwargs), BlockHalves(block, kwargs)
    split = halves.split_exactly(x[:1].to(dev))
    with torch.no_grad():  # the dense targets, a window at a time: Y, and H where the block splits
        y = torch.cat([_output(whole, x[i:i + 1].to(dev)).to(x.device) for i in range(x.shape[0])])
        h = (torch.cat([whole.attention(x[i:i + 1].to(dev)).to(x.device) for i in range(x.shape[0])])
             if split else None)
    if config.lunch_inputs == "dense":
        state["dense_hidden"] = y  # the next block's dense inputs
    steps = config.lunch_epochs * math.ceil(x.shape[0] / config.lunch_batch_size)
    options = dict(steps=steps, lr=config.lunch_lr, optimizer="adamw", batch_size=config.lunch_batch_size,
                   loss="mse", schedule="linear", warmup=config.lunch_warmup, order="cycle",
                   lr_flag="--lunch-lr")
    if split:
        attention = masked_pairs(layers, halves.parameters("attention"))
        mlp = masked_pairs(layers, halves.parameters("mlp"))
        info = reconstruct_halves(halves.attention, attention, halves.mlp_half, mlp, x, h, y, **options)
    else:
        pairs = masked_pairs(layers, list(block.parameters()))
        info = {"whole": optimise_kept(lambda b: _output(halves, b), pairs, x, y, **options)}
    return {"name": "lunch", "halves": split, "inputs": config.lunch_inputs, **info}


def _output(halves, x):
    from llmprune.blocks import block_output

    return block_output(halves.block(x, **halves.kwargs))


SPEC = BLOCK_STEPS.add(StepSpec(
    name="lunch", label="block reconstruction", suffix="+BlockRecon", order=10,
    paper='Wagner, Roux, Zimmer & Pokutta 2025, "A Free Lunch in LLM Compression: Revisiting Retraining '
          'after Pruning", arXiv:2510.14444',
    code="ZIB-IOL/Free-Lunch-in-LLM-Compression",
    summary="retrain each block's kept weights toward the dense block, attention and MLP halves in turn",
    options=LunchOptions, needs=("block_inputs",), run=run,
))
