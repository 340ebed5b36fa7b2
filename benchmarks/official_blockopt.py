"""Literal re-implementations of the two block-local re-training procedures, for parity checks.

1. Free lunch (ZIB-IOL/Free-Lunch-in-LLM-Compression @ 601ea9ea8b4b199bda248ba662d3f80cc4f4a2ef):
   ``PruneMethod.reconstruct_weights`` (prune_methods.py:341-491) on the LLaMA attention / MLP
   wrappers (utilities.py:1012-1053 AttnWrapperLlama, 1326-1358 MLPWrapperLlama), in the order
   ``PruneMethod.prune`` (prune_methods.py:122-318) runs them with block_size=-1 and the
   default propagate_sparse_activations_reconstruct=False, use_dense_targets=False.
2. Wanda++ regional optimisation as the reproduction the paper links (TTTTTTris/wandaplus @
   71e01bb9b94649470362d0ee28a439897b410b92, lib/wandaplus_wrapper.py:147-286): RMSprop, summed
   squared error, no gradient clearing between the windows of a round.

Written from reading the code, not copied; CUDA autocast/GradScaler dropped (CPU float32), the
peft/validation/logging branches dropped. Used by tests/test_blockopt.py and reference scripts.
"""

from __future__ import annotations

import copy
import random

import torch
import torch.nn as nn
import torch.nn.utils.prune as prune
from transformers.optimization import get_linear_schedule_with_warmup


class AttnHalf(nn.Module):
    """utilities.py:1012-1053: residual + self_attn(input_layernorm(x)); exposes the attention and
    its norm as submodules so that .parameters() finds them (the block itself is hidden)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.module = (block,)
        self.self_attn = block.self_attn
        self.input_layernorm = block.input_layernorm

    def forward(self, hidden_states, **kwargs):
        residual = hidden_states
        hidden_states = self.module[0].input_layernorm(hidden_states)
        hidden_states, _ = self.module[0].self_attn(hidden_states=hidden_states, **kwargs)
        return residual + hidden_states


class MLPHalf(nn.Module):
    """utilities.py:1326-1358: residual + mlp(post_attention_layernorm(h))."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.module = (block,)
        self.mlp = block.mlp
        self.post_attention_layernorm = block.post_attention_layernorm

    def forward(self, hidden_states, **kwargs):
        residual = hidden_states
        hidden_states = self.module[0].post_attention_layernorm(hidden_states)
        return (residual + self.module[0].mlp(hidden_states),)


@torch.no_grad()
def get_outputs(layer, inps, outs, kwargs):
    """utilities.py:186-211 (outs changed in place, one batch per list entry)."""
    for j, inp in enumerate(inps):
        out = layer(inp, **kwargs)
        if isinstance(out, tuple):
            out = out[0]
        outs[j] = out.cpu()
    return outs


def reconstruct_weights(layer, inps, outs, kwargs, initial_lr=1e-5, n_iterations=64):
    """prune_methods.py:341-491 with optim=None (AdamW), loss_fn='mse', accumulation 1."""
    lr = float(initial_lr)                                                     # :372
    n_warmup_iterations = int(0.1 * n_iterations)                              # :379
    train_config = [{"params": [p for n, p in layer.named_parameters() if p.requires_grad],
                     "lr": lr, "weight_decay": 0.}]                            # :380-385
    optimizer = torch.optim.AdamW(train_config)                                # :392-393
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=n_warmup_iterations,
                                                num_training_steps=n_iterations)  # :394
    criterion = nn.MSELoss(reduction="mean")                                   # :398
    layer.train()
    len_tensor_dataloader = len(inps)
    for step in range(1, n_iterations + 1):                                    # :421
        if step == 1 or (step - 1) % len_tensor_dataloader == 0:               # :423-424
            train_iterator = iter(zip(inps, outs))
        inputs, targets = next(train_iterator)
        outputs = layer(inputs, **kwargs)
        if isinstance(outputs, tuple):
            outputs = outputs[0]
        loss = criterion(outputs, targets)                                     # :462
        loss.backward()                                                        # :464
        optimizer.step()                                                       # :467
        scheduler.step()                                                       # :472
        optimizer.zero_grad()
        layer.zero_grad()
    layer.eval()


def _prune_subset(linears, masks):
    for name, module in linears.items():                                       # :252
        prune.custom_from_mask(module, name="weight", mask=~masks[name])


def _remove(linears):
    for module in linears.values():                                            # peft_methods.py:63-65
        if prune.is_pruned(module):
            prune.remove(module, name="weight")


def free_lunch_block(block, masks, inps, kwargs, initial_lr=1e-5, n_iterations=64):
    """One decoder block, attention then MLP (prune_methods.py:122-318, block_size=-1).
    masks: {"self_attn.q_proj": bool (True = pruned), ...}; inps: list of (batch, seq, hidden)
    dense inputs. Returns the dense outputs of the block (the next block's inputs, since the
    default propagates dense activations)."""
    for p in block.parameters():
        p.requires_grad_(True)                                                 # BlockOnlyFullFT
    outs = [inp.clone() for inp in inps]
    for half in (AttnHalf(block), MLPHalf(block)):
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)
                   and any(m is s for s in half.modules())}
        get_outputs(half, inps, outs, kwargs)                                  # :159-160 dense targets
        _prune_subset(linears, masks)                                          # :174-252
        with torch.enable_grad():
            reconstruct_weights(half, inps, outs, kwargs, initial_lr, n_iterations)  # :271-274
        _remove(linears)                                                       # :283-287
        inps, outs = outs, inps                                                # :307 (no re-propagation)
    return inps


def regional_optimizer(block, inps, kwargs, select_masks, lr_ro=3e-7, num_ro_iters=5,
                       nums_ro_samples=32):
    """wandaplus_wrapper.py:147-286 + the final prune of pruning() (:288-383).
    select_masks(block, inps) zeroes the pruned weights (their RGS prune, wanda_*_pp)."""
    tmp_module = copy.deepcopy(block)                                          # :166 dense copy
    RO_weights = [block.self_attn.q_proj.weight, block.self_attn.k_proj.weight,
                  block.self_attn.v_proj.weight, block.self_attn.o_proj.weight,
                  block.mlp.up_proj.weight, block.mlp.gate_proj.weight, block.mlp.down_proj.weight]
    optimizer_ro = torch.optim.RMSprop(RO_weights, lr=lr_ro)                   # :177
    loss_fn = torch.nn.MSELoss(reduction="sum")                                # :217
    losses = []
    with torch.enable_grad():
        for _ in range(num_ro_iters):                                          # :219
            optimizer_ro.zero_grad()                                           # :220 once per round
            random_indices = random.sample(range(len(inps)), nums_ro_samples)  # :221
            small_inps = [inps[i] for i in random_indices]
            with torch.no_grad():
                target = [_first(tmp_module(x, **kwargs)) for x in small_inps]  # :226
            select_masks(block, small_inps)                                    # :229-263
            for idx, the_input in enumerate(small_inps):                       # :264
                out = _first(block(the_input, **kwargs))
                mse_loss = loss_fn(out, target[idx].detach())                  # :271
                mse_loss.backward()                                            # :272 grads accumulate
                optimizer_ro.step()                                            # :273
            losses.append(mse_loss.item())
    for w in RO_weights:
        w.grad = None
    select_masks(block, inps)                                                  # pruning() :344-378
    return losses


def _first(out):
    return out[0] if isinstance(out, tuple) else out
