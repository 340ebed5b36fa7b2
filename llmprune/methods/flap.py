"""flap: remove the input channels with the smallest Var(x_j) * ||W_:j||^2; their mean output becomes a bias.

An, Zhao, Yu, Tang & Wang 2024, "Fluctuation-based Adaptive Structured Pruning for Large Language
Models", AAAI; official code CASIA-IVA-Lab/FLAP. The WIFV metric S_j = Var(x_j) * sum_i W_ij^2;
a head's score is the sum of S_j^2 over its dimensions (as its code does for attention). The
removed channels' mean contribution W[:, removed] @ mean(x)[removed] becomes a bias of
down_proj / o_proj. Its statistics come from the dense model, as in the official code. By default
the same fraction in every block (its "UL-UM" structure).

``--width-allocation global`` is its adaptive structure search ("AL-AM", ``prune_flap`` in
``lib/prune.py``): all blocks' statistics first (one dense pass), the scores standardised per
layer and module ((S - mean) / std; attention: S^2 standardised, then the mean over a head's
dimensions), one ranking of every head and channel of every block, each weighted by the parameters
it removes, cut where the kept parameters come closest to the target; bias compensation as above.
Where this port differs from the official code:

* whole KV groups, not single heads (grouped-query attention: a KV head goes with its
  heads // kv_heads query heads); a group's score is the mean over all its dimensions;
* weights: each unit's exact parameter count read from the model (an MLP channel 3 x hidden, a KV
  group head_dim x (2 q + 2) x hidden, plus their biases); the official code weighs a head
  512/3 channels (LLaMA-7B's 4 x 128 x hidden over 3 x hidden) and hard-codes head_dim 128;
* target: ``--sparsity`` x all blocks' parameters (norms included, as the uniform plan), where the
  official ratio counts the attention and MLP Linears only;
* the cut keeps exactly the prefix closest to the target; the official ``metric > threshold``
  keeps one unit fewer (the threshold unit itself goes, with every unit tying it); score ties
  keep the official order (attention before MLP, blocks in order, lower index first);
* every block keeps its best KV group and its best channel (the official code can empty a module),
  and each block's channel count is rounded to ``channel_multiple`` after the cut (1: exact);
* a layer whose scores are all equal standardises to zeros (the official code divides by zero);
* the fluctuation Var(x_j) is the population variance over all calibration tokens, merged exactly
  (the official running update drops the first window's own spread and divides by windows, not
  tokens; that scale cancels in the standardised ranking); the inputs' mean for the bias is not
  rounded to half precision.

``--width-allocation owl`` (ours, no official code): each block's removal fraction from OWL's
outlier ratios (``llmprune.engine.shrink``), then FLAP's per-block selection and compensation.
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
