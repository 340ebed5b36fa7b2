"""The sequential pipeline on tiny LLaMA / Mistral / Qwen2 models."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from conftest import make_model, make_tokenizer
from llmprune import methods
from llmprune.blocks import hook_count
from llmprune.config import CalibConfig, PruneConfig
from llmprune.engine import prune
from llmprune.errors import LlmpruneError
from llmprune.io import save_pruned
from llmprune.models import get_blocks, prunable_linears


def _windows(n=6, seqlen=32, vocab=512, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


def _config(method="wanda", **kw):
    calib = CalibConfig(nsamples=6, seqlen=32, batch_size=kw.pop("batch_size", 4))
    return PruneConfig(method=method, calib=calib, **kw)


def _masks(model):
    return {f"{i}.{n}": (m.weight == 0).clone() for i in range(len(get_blocks(model)))
            for n, m in prunable_linears(model, i).items()}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "1:4"])
def test_every_layer_gets_the_requested_sparsity(tiny_model_any, method, pattern):
    model = tiny_model_any
    config = _config(method, pattern=pattern, sparsity=None if pattern != "unstructured" else 0.6)
    report = prune(model, None, config, windows=_windows(), progress=False)
    assert hook_count(model) == 0
    for i in range(len(get_blocks(model))):
        for name, module in prunable_linears(model, i).items():
            w = module.weight.detach()
            if pattern == "unstructured":
                group = w.numel() if method in ("magnitude", "sparsegpt") else w.shape[1]
                # exact counts: floor(s * group) per row (wanda) / per layer (magnitude) /
                # per 128-column block (sparsegpt, blocks of 64 or 128 here)
                zeros = (w == 0).sum().item()
                if method == "wanda":
                    assert ((w == 0).sum(1) == int(0.6 * w.shape[1])).all()
                elif method == "magnitude":
                    assert zeros == int(0.6 * group)
                else:
                    cols = w.shape[1]
                    expected = sum(int(0.6 * w.shape[0] * min(128, cols - c)) for c in range(0, cols, 128))
                    assert zeros == expected
            else:
                n, m = map(int, pattern.split(":"))
                kept = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
                assert (kept == n).all(), f"{name}: every {m} inputs must keep exactly {n}"
    expected_total = 0.6 if pattern == "unstructured" else 1 - int(pattern[0]) / int(pattern[2])
    assert report.overall_sparsity == pytest.approx(expected_total, abs=0.01)
    assert len(report.block_seconds) == len(get_blocks(model))
    phases = report.phase_seconds
    assert set(phases) == {"stats", "prune", "propagate"}
    assert all(len(v) == len(report.block_seconds) for v in phases.values())
    for i, block_total in enumerate(report.block_seconds):
        parts = [phases[k][i] for k in phases]
        assert all(p >= 0 for p in parts) and sum(parts) <= block_total + 1e-6
    assert phases["prune"][0] > 0 and phases["propagate"][-1] == 0  # the last block feeds nothing
    assert (phases["stats"][0] > 0) == (method != "magnitude")


def test_pruned_outputs_feed_the_next_block(monkeypatch):
    """Block 1 is calibrated on the outputs of the *pruned* block 0, not the dense one."""
    model = make_model("llama")
    dense = copy.deepcopy(model)
    windows = _windows()
    seen: dict[str, torch.Tensor] = {}
    wanda = methods.METHODS.get("wanda")

    def recording(weight, stats, config):
        seen.setdefault(f"{len(seen)}", stats.sq_norm.clone())
        return wanda.select(weight, stats, config)

    monkeypatch.setitem(methods.METHODS._specs, "wanda", dataclasses.replace(wanda, select=recording))
    prune(model, None, _config("wanda"), windows=windows, progress=False)
    # calls: block 0 q,k,v,o,gate,up,down (7), then block 1 q first -> index 7
    block1_q = seen["7"]

    def q_input_sq_norm(m):
        with torch.no_grad():
            hidden = m(windows, output_hidden_states=True).hidden_states[1]  # input of block 1
            x = get_blocks(m)[1].input_layernorm(hidden)
        return x.reshape(-1, x.shape[-1]).pow(2).sum(0)

    one_pass = q_input_sq_norm(dense)
    sequential = q_input_sq_norm(model)  # block 0 pruned: exactly what the pipeline fed block 1
    torch.testing.assert_close(block1_q, sequential, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(block1_q, one_pass, rtol=1e-3)
    torch.testing.assert_close(seen["0"], dense.model.layers[0].input_layernorm(
        dense.model.embed_tokens(windows)).reshape(-1, 64).pow(2).sum(0), rtol=1e-4, atol=1e-5)


def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda():
    """On the same block-0 inputs, SparseGPT's layer output error is the smallest."""
    base = make_model("llama", seed=5)
    windows = _windows(n=8)
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: inputs.setdefault(n, []).append(a[0].detach()))
               for n, m in prunable_linears(base, 0).items()]
    with torch.no_grad():
        base(windows)
    for h in handles:
        h.remove()
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(base)
        prune(model, None, _config(method, sparsity=0.5), windows=windows, progress=False)
        total = 0.0
        for name, module in prunable_linears(model, 0).items():
            x = torch.cat(inputs[name]).reshape(-1, module.in_features)
            w0 = prunable_linears(base, 0)[name].weight
            total += ((x @ (w0 - module.weight).T) ** 2).sum().item()
        errors[method] = total
    assert errors["sparsegpt"] < min(errors["wanda"], errors["magnitude"]), errors


def test_true_sequential_uses_pruned_earlier_stages(monkeypatch):
    model = make_model("qwen2")
    twin = copy.deepcopy(model)
    windows = _windows()
    prune(model, None, _config("wanda", true_sequential=True), windows=windows, progress=False)
    prune(twin, None, _config("wanda"), windows=windows, progress=False)
    masks, twin_masks = _masks(model), _masks(twin)
    # q/k/v see the same inputs either way; o_proj's input differs once q/k/v are pruned
    assert torch.equal(masks["0.self_attn.q_proj"], twin_masks["0.self_attn.q_proj"])
    assert not torch.equal(masks["0.self_attn.o_proj"], twin_masks["0.self_attn.o_proj"])
    assert hook_count(model) == 0


def test_same_seed_same_masks_bit_identical():
    base = make_model("mistral")
    results = []
    for _ in range(2):
        model = copy.deepcopy(base)
        prune(model, None, _config("sparsegpt", pattern="2:4"), windows=_windows(), progress=False)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


def test_batch_size_does_not_change_masks():
    base = make_model("llama")
    masks = []
    for batch_size in (1, 6):
        model = copy.deepcopy(base)
        prune(model, None, _config("wanda", batch_size=batch_size), windows=_windows(), progress=False)
        masks.append(_masks(model))
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_include_exclude_select_layers():
    model = make_model("llama")
    config = _config("magnitude", include=("layers.*.mlp.*",), exclude=("*.down_proj",))
    report = prune(model, None, config, progress=False)
    assert sorted({r.name.split(".", 2)[2] for r in report.layers}) == ["mlp.gate_proj", "mlp.up_proj"]
    assert (model.model.layers[0].self_attn.q_proj.weight != 0).all()
    with pytest.raises(LlmpruneError, match="no prunable layer"):
        prune(model, None, _config("magnitude", include=("nothing",)), progress=False)


def test_nm_with_indivisible_in_features_names_the_layer():
    model = make_model("llama", hidden_size=60, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(LlmpruneError, match=r"layers\.0\.self_attn\.q_proj.*not a multiple of M=8"):
        prune(model, None, _config("wanda", pattern="4:8"), windows=_windows(), progress=False)
    assert (model.model.layers[0].self_attn.q_proj.weight != 0).all()  # nothing touched


def test_non_finite_activations_name_block_and_layer():
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[3] = float("nan")
    with pytest.raises(LlmpruneError, match=r"non-finite activations entering layers\.1\.mlp\.gate_proj"):
        prune(model, None, _config("wanda"), windows=_windows(), progress=False)
    assert hook_count(model) == 0


def test_save_and_reload_roundtrip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_model("llama")
    tokenizer = make_tokenizer()
    report = prune(model, tokenizer, _config("wanda", pattern="2:4"), windows=_windows(), progress=False)
    out = save_pruned(model, tokenizer, tmp_path / "pruned", {"prune": report.to_dict()})
    assert (out / "model.safetensors").is_file() and (out / "llmprune.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _windows(n=2)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    for name, mask in _masks(model).items():
        i, rest = name.split(".", 1)
        assert torch.equal(reloaded.model.layers[int(i)].get_submodule(rest).weight == 0, mask)
    with pytest.raises(LlmpruneError, match="--overwrite"):
        save_pruned(model, tokenizer, out, {})
