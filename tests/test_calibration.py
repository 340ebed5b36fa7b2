"""Calibration hooks: statistics against direct sums, batch-size independence, no leftover hooks."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model
from llmprune.blocks import block_output, capture_block_inputs, hook_count
from llmprune.models import block_stages, get_blocks, prunable_linears
from llmprune.stats import StatsCollector


def _windows(n=5, seqlen=16, vocab=512, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


def _stats(model, windows, batch_size):
    blocks = get_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], windows, batch_size)
    layers = prunable_linears(model, 0)
    collector = StatsCollector(layers, block_stages(model, 0, layers), ("norms", "hessian"))
    with collector:
        for s in range(0, windows.shape[0], batch_size):
            collector.run(blocks[0], inputs.hidden[s:s + batch_size], **inputs.kwargs)
    return {group: stats for group, stats in collector.pop_stats()}


@pytest.mark.parametrize("batch_size", [1, 2])
def test_dsnot_moments_equal_direct_per_window_sums_and_variances(batch_size):
    """DSnoT's moments: per-window token sums and population variances (over the window's
    tokens), summed over the windows, against a float64 computation window by window."""
    model = make_model("llama")
    windows = _windows(n=5)
    blocks = get_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], windows, batch_size)
    layers = prunable_linears(model, 0)
    groups = block_stages(model, 0, layers)
    collector = StatsCollector(layers, groups, ("norms", "moments"))
    with collector:
        for s in range(0, windows.shape[0], batch_size):
            collector.run(blocks[0], inputs.hidden[s:s + batch_size], **inputs.kwargs)
    qkv = dict(collector.pop_stats())[("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
    x = blocks[0].input_layernorm(model.model.embed_tokens(windows)).double()  # (windows, tokens, 64)
    x = x + 3.0  # an offset mean: a one-pass E[x^2] - E[x]^2 would lose digits here
    collector = StatsCollector(layers, groups, ("moments",))
    with collector:  # the same collector on the shifted input, fed straight to the hooked layer
        for s in range(0, windows.shape[0], batch_size):
            layers["self_attn.q_proj"](x[s:s + batch_size].float())
    shifted = dict(collector.pop_stats())[("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
    assert qkv.windows == shifted.windows == 5
    direct_var = sum(((w - w.mean(0)) ** 2).mean(0) for w in x)  # population variance per window
    torch.testing.assert_close(shifted.x_sum.double(), x.sum(dim=(0, 1)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(shifted.var_sum.double(), direct_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(qkv.var_sum.double(), direct_var, rtol=1e-5, atol=1e-6)  # shift-free


def test_block_inputs_equal_embeddings():
    model = make_model("llama")
    windows = _windows()
    inputs = capture_block_inputs(model, get_blocks(model)[0], windows, batch_size=2)
    torch.testing.assert_close(inputs.hidden, model.model.embed_tokens(windows))
    assert hook_count(model) == 0


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_captured_kwargs_reproduce_the_model(family):
    """Running the blocks by hand on captured inputs gives the model's own hidden states."""
    model = make_model(family)
    windows = _windows(n=3)
    inputs = capture_block_inputs(model, get_blocks(model)[0], windows, batch_size=2)
    hidden = inputs.hidden
    for block in get_blocks(model):
        hidden = block_output(block(hidden, **inputs.kwargs))
    expected = model(windows, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(model.model.norm(hidden), expected, rtol=1e-4, atol=1e-5)


def test_stats_equal_direct_sums_over_every_token():
    model = make_model("llama")
    windows = _windows(n=5)
    block = get_blocks(model)[0]
    stats = _stats(model, windows, batch_size=2)

    # q/k/v read input_layernorm(embeddings): build that input directly
    x = block.input_layernorm(model.model.embed_tokens(windows)).reshape(-1, 64).double()
    qkv = stats[("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
    assert qkv.tokens == 5 * 16
    torch.testing.assert_close(qkv.sq_norm.double(), (x ** 2).sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(qkv.hessian.double(), 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)

    # down_proj's input, recorded by a plain hook during an ordinary model forward
    seen = []
    handle = block.mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    with torch.no_grad():
        model(windows)
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    down = stats[("mlp.down_proj",)]
    torch.testing.assert_close(down.sq_norm.double(), (x ** 2).sum(0), rtol=1e-4, atol=1e-6)


def test_stats_do_not_depend_on_batch_size():
    model = make_model("mistral")
    windows = _windows(n=7)
    reference = _stats(model, windows, batch_size=1)
    for batch_size in (3, 7):
        other = _stats(model, windows, batch_size)
        for group, stats in reference.items():
            torch.testing.assert_close(other[group].sq_norm, stats.sq_norm, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(other[group].hessian, stats.hessian, rtol=1e-5, atol=1e-5)


def test_no_hook_left_after_an_exception_mid_block():
    model = make_model("llama")
    windows = _windows(n=2)
    block = get_blocks(model)[0]
    inputs = capture_block_inputs(model, block, windows, batch_size=2)
    before = hook_count(model)

    def boom(*_args, **_kwargs):
        raise RuntimeError("mid-block failure")

    layers = prunable_linears(model, 0)
    original = block.mlp.forward
    block.mlp.forward = boom
    try:
        with pytest.raises(RuntimeError, match="mid-block"):
            with StatsCollector(layers, block_stages(model, 0, layers), ("norms",)) as collector:
                assert hook_count(model) > before
                collector.run(block, inputs.hidden, **inputs.kwargs)
    finally:
        block.mlp.forward = original
    assert hook_count(model) == before == 0
