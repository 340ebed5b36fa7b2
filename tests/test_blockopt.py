"""Block-local re-training of the kept weights (llmprune/math/solvers/blockopt.py): free-lunch
reconstruction and Wanda++'s regional optimisation, against the literal official procedures
(benchmarks/official_blockopt.py) and a closed-form masked least-squares solution."""

from __future__ import annotations

import copy
import random
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from llmprune.errors import LlmpruneError
from llmprune.math.solvers.blockopt import lr_factor, optimise_kept, reconstruct_halves, regional_rounds

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import official_blockopt as official  # noqa: E402

NAMES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def tiny_block(seed=0, seq=16):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
                      num_hidden_layers=1, vocab_size=64)
    cfg._attn_implementation = "eager"
    block = LlamaDecoderLayer(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in block.parameters():  # random norms too, so that the norm weights matter
            p.add_(0.1 * torch.randn_like(p))
    pos = torch.arange(seq)[None]
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, seq, 32), pos)
    kwargs = {"position_embeddings": (cos, sin), "position_ids": pos, "attention_mask": None}
    return block, kwargs


def magnitude_masks(block, frac=0.5):
    """Per-row lowest |W| pruned (True = pruned): any mask will do for re-training."""
    masks = {}
    for name in NAMES:
        w = block.get_submodule(name).weight.detach().abs()
        k = int(w.shape[1] * frac)
        masks[name] = torch.zeros_like(w, dtype=torch.bool).scatter_(1, w.argsort(dim=1)[:, :k], True)
    return masks


def first(out):
    return out[0] if isinstance(out, tuple) else out


def test_block_loss_goes_down_and_zeros_stay():
    block, kw = tiny_block()
    x = torch.randn(6, 16, 32)
    with torch.no_grad():
        y = first(block(x, **kw))
    masks = magnitude_masks(block)
    pairs = [(block.get_submodule(n).weight, masks[n]) for n in NAMES]
    with torch.no_grad():  # the engine's context: the solver enables grad itself
        info = optimise_kept(lambda h: block(h, **kw), pairs, x, y, steps=60, lr=1e-3, optimizer="adamw",
                             batch_size=2)
    assert info["final_loss"] < 0.5 * info["initial_loss"]
    for n in NAMES:
        w = block.get_submodule(n).weight
        assert bool((w[masks[n]] == 0).all()) and int((w == 0).sum()) == int(masks[n].sum())
        assert w.grad is None


def test_rmsprop_block_and_regional_rounds():
    block, kw = tiny_block(1)
    x = torch.randn(8, 16, 32)
    with torch.no_grad():
        y = first(block(x, **kw))
    masks = magnitude_masks(block)

    def select():
        pairs = [(block.get_submodule(n).weight, masks[n]) for n in NAMES]
        with torch.no_grad():
            for p, m in pairs:
                p[m] = 0
        return pairs

    info = regional_rounds(select, lambda h: block(h, **kw), x, y, rounds=3, samples=8, lr=3e-4)
    first_round, last_round = info["rounds"][0], info["rounds"][-1]
    assert last_round["final_loss"] < 0.7 * first_round["initial_loss"]
    assert info["final_pruned"] == sum(int(m.sum()) for m in masks.values())


def test_free_lunch_matches_official():
    block, kw = tiny_block(2)
    ref, start = copy.deepcopy(block), copy.deepcopy(block)
    x = torch.randn(8, 16, 32)
    masks = magnitude_masks(block)
    # dense targets: H after the attention half, Y after the block (official: before pruning)
    with torch.no_grad():
        mid = x + block.self_attn(block.input_layernorm(x), **kw)[0]
        y = first(block(x, **kw))
    attn = [(block.get_submodule(n).weight, masks[n]) for n in NAMES[:4]]
    attn += [(block.input_layernorm.weight, None)]
    mlp = [(block.get_submodule(n).weight, masks[n]) for n in NAMES[4:]]
    mlp += [(block.post_attention_layernorm.weight, None)]
    steps, lr = 12, 1e-3  # 3 epochs of 4 batches of 2 windows
    with torch.no_grad():
        info = reconstruct_halves(lambda h: x_attn(block, h, kw), attn, lambda h: block.mlp(
            block.post_attention_layernorm(h)) + h, mlp, x, mid, y, steps=steps, lr=lr, optimizer="adamw",
            batch_size=2, schedule="linear", warmup=0.1, loss="mse", order="cycle")
    official.free_lunch_block(ref, masks, list(x.split(2)), kw, initial_lr=lr, n_iterations=steps)
    for n in NAMES + ["input_layernorm", "post_attention_layernorm"]:
        ours, theirs = block.get_submodule(n).weight, ref.get_submodule(n).weight
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), n
        kept = ~masks[n] if n in masks else torch.ones_like(ours, dtype=torch.bool)
        moved = (ours - start.get_submodule(n).weight)[kept].abs().max()
        assert moved > 1e-3, n  # parity of two runs that both trained, not of two untouched copies
    assert info["attention"]["final_loss"] < info["attention"]["initial_loss"]
    assert info["mlp"]["final_loss"] < info["mlp"]["initial_loss"]


def x_attn(block, h, kw):
    return h + block.self_attn(block.input_layernorm(h), **kw)[0]


def test_official_regional_optimizer_runs_and_ours_agrees_in_direction():
    block, kw = tiny_block(3)
    ref = copy.deepcopy(block)
    x = torch.randn(8, 16, 32)
    masks = magnitude_masks(block)
    with torch.no_grad():
        y = first(block(x, **kw))

    def select_official(b, _inps):
        with torch.no_grad():
            for n in NAMES:
                b.get_submodule(n).weight[masks[n]] = 0

    def loss_of(b):
        with torch.no_grad():
            return float(((first(b(x, **kw)) - y) ** 2).sum())

    pruned = copy.deepcopy(ref)
    select_official(pruned, None)
    random.seed(0)
    official.regional_optimizer(ref, list(x.split(1)), kw, select_official, lr_ro=1e-4, num_ro_iters=2,
                                nums_ro_samples=8)

    def select():
        select_official(block, None)
        return [(block.get_submodule(n).weight, masks[n]) for n in NAMES]

    regional_rounds(select, lambda h: block(h, **kw), x, y, rounds=2, samples=8, lr=1e-4)
    base = loss_of(pruned)
    assert loss_of(ref) < base and loss_of(block) < base
    for n in NAMES:
        assert bool((block.get_submodule(n).weight[masks[n]] == 0).all())


def test_linear_approaches_masked_least_squares():
    torch.manual_seed(0)
    out_f, in_f, tokens = 8, 24, 256
    w0 = torch.randn(out_f, in_f)
    x = torch.randn(tokens, in_f) @ torch.randn(in_f, in_f) * 0.3 + torch.randn(in_f)  # correlated inputs
    mask = torch.rand(out_f, in_f) < 0.5
    y = x @ w0.T
    lin = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w0)
    info = optimise_kept(lin, [(lin.weight, mask)], x[None], y[None], steps=600, lr=1e-1,
                         optimizer="adamw", schedule="linear", warmup=0.0)
    exact = torch.zeros_like(w0)
    for r in range(out_f):
        keep = ~mask[r]
        exact[r, keep] = torch.linalg.lstsq(x[:, keep], y[:, r:r + 1]).solution[:, 0]
    exact_loss = float(((x @ exact.T - y) ** 2).mean())
    assert info["final_loss"] <= exact_loss * 1.01 + 1e-6
    assert float((lin.weight.detach() - exact).norm() / exact.norm()) < 1e-3
    assert bool((lin.weight[mask] == 0).all())


def test_divergence_and_bad_arguments():
    lin = nn.Linear(4, 3, bias=False)
    x = torch.randn(2, 5, 4)
    with pytest.raises(LlmpruneError, match="non-finite loss at step .*--lunch-lr"):
        optimise_kept(lin, [(lin.weight, None)], x, x[..., :3] * 1e3, steps=50, lr=1e30, optimizer="sgd")
    with pytest.raises(LlmpruneError, match="unknown block-reconstruction optimizer"):
        optimise_kept(lin, [(lin.weight, None)], x, x[..., :3], steps=1, lr=1e-3, optimizer="lion")


def test_linear_schedule_is_transformers():
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=6, num_training_steps=64)
    for k in range(64):
        assert abs(opt.param_groups[0]["lr"] - lr_factor("linear", k, 64, 0.1)) < 1e-12
        opt.step()
        sched.step()
