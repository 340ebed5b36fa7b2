"""Wanda++'s regional gradient score: the block-local gradient against finite differences, the score
against a hand computation, and alpha = 0 giving Wanda's masks exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_model
from llmprune.blocks import block_output, capture_block_inputs, hook_count
from llmprune.config import CalibConfig, PruneConfig
from llmprune.engine import prune
from llmprune.errors import LlmpruneError
from llmprune.methods import get_method, needs_for
from llmprune.stats import LayerStats, regional_gradients


def _block_and_inputs(windows: int = 3, seqlen: int = 8):
    torch.manual_seed(0)
    model = make_model(layers=1).double()
    ids = torch.randint(0, 512, (windows, seqlen))
    block = model.model.layers[0]
    inputs = capture_block_inputs(model, block, ids, batch_size=1)
    return model, block, inputs


class _Residual(torch.nn.Module):
    """A float64 block without float32 casts (LLaMA's RMSNorm computes in float32, too coarse for
    finite differences): x + down(relu(up(x)))."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(6, 10, dtype=torch.float64)
        self.down = torch.nn.Linear(10, 6, dtype=torch.float64)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def test_regional_gradient_is_the_rms_of_finite_differences_of_the_block_output_norm():
    torch.manual_seed(0)
    block, hidden = _Residual(), torch.randn(3, 5, 6, dtype=torch.float64)
    layers = {"up": block.up, "down": block.down}
    grads = regional_gradients(block, hidden, {}, layers)
    eps = 1e-6
    for name, layer in layers.items():
        for r in range(layer.weight.shape[0]):
            for c in range(layer.weight.shape[1]):
                per_window = []
                for n in range(hidden.shape[0]):
                    values = []
                    for sign in (1, -1):
                        with torch.no_grad():
                            layer.weight[r, c] += sign * eps
                            values.append(block(hidden[n:n + 1]).norm().item())
                            layer.weight[r, c] -= sign * eps
                    per_window.append((values[0] - values[1]) / (2 * eps))
                rms = (sum(g * g for g in per_window) / len(per_window)) ** 0.5
                assert grads[name][r, c].item() == pytest.approx(rms, rel=1e-5, abs=1e-9), (name, r, c)


def test_regional_gradient_of_a_llama_block_matches_a_plain_backward_loop():
    model, block, inputs = _block_and_inputs()
    layers = {"self_attn.q_proj": block.self_attn.q_proj, "mlp.down_proj": block.mlp.down_proj}
    grads = regional_gradients(block, inputs.hidden, inputs.kwargs, layers)
    twin = copy.deepcopy(block).requires_grad_(True)
    squares = {name: 0.0 for name in layers}
    for n in range(inputs.hidden.shape[0]):  # the textbook way: backward(), read .grad, zero it
        twin.zero_grad()
        with torch.enable_grad():
            block_output(twin(inputs.hidden[n:n + 1], **inputs.kwargs)).norm().backward()
        for name in layers:
            squares[name] = squares[name] + twin.get_submodule(name).weight.grad.double() ** 2
    for name in layers:
        expected = (squares[name] / inputs.hidden.shape[0]).sqrt()
        assert torch.allclose(grads[name].double(), expected, rtol=1e-5, atol=1e-10)


def test_regional_gradient_leaves_no_grad_state_and_no_hooks():
    model, block, inputs = _block_and_inputs()
    flags = [p.requires_grad for p in block.parameters()]
    regional_gradients(block, inputs.hidden, inputs.kwargs, {"mlp.up_proj": block.mlp.up_proj})
    assert [p.requires_grad for p in block.parameters()] == flags
    assert all(p.grad is None for p in block.parameters()) and hook_count(model) == 0


def test_score_is_alpha_g_plus_norm_times_abs_w_per_row():
    torch.manual_seed(1)
    w, grad, sq = torch.randn(6, 16), torch.rand(6, 16), torch.rand(16) * 4
    stats = LayerStats(tokens=4, sq_norm=sq, extra={"regional_grad": grad})
    config = PruneConfig(method="wanda++", sparsity=0.25, wandapp_alpha=3.0)
    sel = get_method("wanda++").select(w, stats, config)
    expected = (3.0 * grad + (sq / 4).sqrt()) * w.abs()
    for row in range(6):  # the 4 lowest of each row (16 * 0.25), found by sorting by hand
        lowest = sorted(range(16), key=lambda j: expected[row, j].item())[:4]
        assert sorted(torch.nonzero(sel.mask[row]).flatten().tolist()) == sorted(lowest)


def test_needs_norms_and_the_regional_gradient():
    assert needs_for(PruneConfig(method="wanda++")) == {"norms", "regional_grad"}


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_alpha_zero_gives_wandas_masks_and_alpha_changes_them(pattern):
    windows = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(2))
    calib = CalibConfig(nsamples=4, seqlen=32)
    base = make_model(layers=2)
    results = {}
    for name, kw in (("wanda", {}), ("zero", {"wandapp_alpha": 0.0}), ("pp", {})):
        model = copy.deepcopy(base)
        method = "wanda" if name == "wanda" else "wanda++"
        prune(model, None, PruneConfig(method=method, pattern=pattern, calib=calib, **kw), windows=windows,
              progress=False)
        results[name] = [p.detach().clone() for p in model.parameters()]
        assert hook_count(model) == 0
    assert all(torch.equal(a, b) for a, b in zip(results["wanda"], results["zero"]))
    assert not all(torch.equal(a, b) for a, b in zip(results["wanda"], results["pp"]))


def test_a_negative_alpha_is_refused_when_the_config_is_made():
    with pytest.raises(LlmpruneError, match="wandapp_alpha"):
        PruneConfig(method="wanda++", wandapp_alpha=-1.0)
