"""sparsellm: pruning coupled across the MLP through auxiliary variables.

Bai, Wang, Yang, Liu, Wang, Li & Zhao 2024, "SparseLLM: Towards Global Pruning of Pre-trained
Language Models", NeurIPS, arXiv:2402.17946; official code BaiTheBest/SparseLLM (``llama_sparsellm``).
Attention is pruned by SparseGPT. The gated MLP Y = W_d (act(W_g X) * W_u X) is pruned jointly: with
the auxiliaries z = W_u X, s = W_g X and p = act(s) * z, SparseLLM alternates

    W_u, W_g, W_d  <- least squares onto z, s (from X) and onto Y (from p), then SparseGPT on each
    p  <- argmin beta ||W_d p - Y||^2 + gamma ||p - act(s) z||^2          (closed form)
    z  <- argmin alpha ||z - W_u X||^2 + gamma ||p - act(s) z||^2        (closed form)
    s  <- two gradient steps on alpha ||s - W_g X||^2 + gamma ||p - act(s) z||^2

for 4 iterations, alpha = beta = gamma = 5 (the official LLaMA values), X the MLP's inputs in the
*dense* block (all of a block's statistics come from one pass of the dense block, as in the
official code) and Y the dense MLP's output on them. The last iteration's pruned weights are kept.

Where we differ (details in ``llmprune.math.solvers.sparsellm``): float32 instead of float16
storage; the z step is the exact minimiser for any alpha, gamma (the official formula is exact
only for alpha == gamma, its default); exact counts in the SparseGPT sweeps; the official rule
that LLaMA-2-7B's blocks 1, 30 and 31 take one iteration is not applied (it is that model's).
A gated MLP (gate_proj, up_proj, down_proj) is required, and all three must be pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmprune.checks import check_positive, check_positive_number
from llmprune.errors import LlmpruneError
from llmprune.methods.base import Selection
from llmprune.methods.sparsegpt import SolverOptions
from llmprune.methods.sparsegpt import check as sparsegpt_check
from llmprune.methods.sparsegpt import select as sparsegpt_select
from llmprune.registry import METHODS, MethodSpec, Supports, option

MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class SparseLLMOptions(SolverOptions):
    sparsellm_iterations: int = option(4, "SparseLLM alternating iterations per MLP (1: plain SparseGPT)")
    sparsellm_alpha: float = option(5.0, "SparseLLM weight of ||z - W_u X||^2 and ||s - W_g X||^2")
    sparsellm_beta: float = option(5.0, "SparseLLM weight of ||W_d p - Y||^2")
    sparsellm_gamma: float = option(5.0, "SparseLLM weight of ||p - act(s) z||^2")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self.sparsellm_iterations, "sparsellm_iterations")
        for name in ("sparsellm_alpha", "sparsellm_beta", "sparsellm_gamma"):
            check_positive_number(getattr(self, name), name, 1e6, "the official 5.0")


def select(weight, stats, config) -> Selection:
    """Every layer first as SparseGPT; the MLP's are then redone jointly by :func:`block`."""
    return sparsegpt_select(weight, stats, config)


def check_blocks(blocks) -> None:
    for i, plan in enumerate(blocks):
        missing = [name for name in MLP if name not in plan.layers]
        if missing:
            raise LlmpruneError(f"sparsellm couples a gated MLP ({', '.join(MLP)}), and layers.{i} has no "
                                f"{missing[0]} to prune: use a LLaMA-style model, keep the MLP layers "
                                "selected (--include/--exclude, --skip-mlp), or use --method sparsegpt")


def block(dense, pruned, layers, hidden, kwargs, config, state) -> dict:
    """Re-prune ``pruned``'s MLP jointly from the dense block's MLP inputs; returns the losses."""
    import torch

    from llmprune.blocks import block_device
    from llmprune.math.solvers.sparsellm import sparsellm_mlp

    dev = block_device(pruned)
    seen = []
    handle = dense.mlp.register_forward_pre_hook(lambda _m, args: seen.append(
        args[0].reshape(-1, args[0].shape[-1]).float()))
    try:
        with torch.no_grad():
            for i in range(hidden.shape[0]):
                dense(hidden[i:i + 1].to(dev), **kwargs)
    finally:
        handle.remove()
    weights = {name.split(".")[-1].split("_")[0]: dense.get_submodule(name).weight for name in MLP}
    new, _masks, info = sparsellm_mlp(
        weights["gate"], weights["up"], weights["down"], torch.cat(seen), None, config.sparsity,
        config.pattern.n, config.pattern.m, act=dense.mlp.act_fn, iterations=config.sparsellm_iterations,
        alpha=config.sparsellm_alpha, beta=config.sparsellm_beta, gamma=config.sparsellm_gamma,
        percdamp=config.percdamp, blocksize=config.blocksize)
    for name in MLP:
        target = layers[name].weight
        target.data.copy_(new[name.split(".")[-1].split("_")[0]].to(target.dtype))
    return {"name": "sparsellm", **info}


SPEC = METHODS.add(MethodSpec(
    name="sparsellm", label="SparseLLM", order=70,
    paper='Bai, Wang, Yang, Liu, Wang, Li & Zhao 2024, "SparseLLM: Towards Global Pruning of Pre-trained '
          'Language Models", NeurIPS',
    code="BaiTheBest/SparseLLM",
    summary="SparseGPT on attention; the gated MLP pruned jointly through auxiliary variables (4 rounds)",
    options=SparseLLMOptions, needs=("hessian", "block_inputs"), supports=Supports(), select=select,
    check=sparsegpt_check, default_group="layer", block=block, check_blocks=check_blocks,
))
