"""Every registered model family, end to end on a tiny random model: prune, perplexity, save, reload.

The families are read from ``llmprune.models.FAMILIES``, so a new ``_register`` entry is tested
here without touching this file, and an entry transformers does not know fails.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import make_family_model, make_tokenizer
from llmprune.calibration import hook_count
from llmprune.config import CalibConfig, PruneConfig
from llmprune.evaluation.perplexity import perplexity
from llmprune.io import save_pruned
from llmprune.models import FAMILIES, family_of, get_blocks, prunable_linears
from llmprune.pipeline import prune

MODEL_TYPES = sorted(FAMILIES)
SEQLEN = 32


def _windows(n=4, seqlen=SEQLEN, vocab=512, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


def _zeros(model) -> dict[str, torch.Tensor]:
    return {f"{i}.{name}": (m.weight == 0).clone() for i in range(len(get_blocks(model)))
            for name, m in prunable_linears(model, i).items()}


def test_every_family_is_a_transformers_model_type():
    from transformers import CONFIG_MAPPING

    unknown = [t for t in MODEL_TYPES if t not in CONFIG_MAPPING]
    assert not unknown, f"registered families that transformers does not know: {unknown}"


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_family_layout_covers_every_linear(model_type):
    """The registered Linears are exactly the block's Linear layers: none missed, none invented."""
    model = make_family_model(model_type)
    assert model.config.model_type == model_type
    family = family_of(model)
    block = get_blocks(model)[0]
    linears = {name for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    assert linears == set(family.linears)
    assert len(get_blocks(model)) == model.config.num_hidden_layers


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_family_prune_eval_save_reload(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_family_model(model_type)
    tokenizer = make_tokenizer()
    untouched = {n: p.detach().clone() for n, p in model.named_parameters() if ".layers." not in n}

    config = PruneConfig(method="wanda", pattern="2:4", calib=CalibConfig(nsamples=4, seqlen=SEQLEN, batch_size=2))
    report = prune(model, tokenizer, config, windows=_windows(), progress=False)
    assert hook_count(model) == 0
    assert report.overall_sparsity == pytest.approx(0.5)
    for key, zeros in _zeros(model).items():
        kept = (~zeros).reshape(zeros.shape[0], -1, 4).sum(-1)  # (rows, groups of 4)
        assert (kept == 2).all(), f"{model_type} {key}: not 2:4"
    for name, p in model.named_parameters():  # embeddings, final norm, lm_head: never pruned
        if name in untouched:
            assert torch.equal(p, untouched[name]), name

    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    tokens = tokenizer(text, return_tensors="pt").input_ids
    ppl = perplexity(model, tokens, SEQLEN, max_windows=2, progress=False)
    assert math.isfinite(ppl.ppl) and ppl.ppl > 1

    path = save_pruned(model, tokenizer, tmp_path / "ckpt", metadata={"family": model_type})
    reloaded = AutoModelForCausalLM.from_pretrained(path).float().eval()
    assert type(reloaded) is type(model)
    ids = _windows(n=2, seed=7)
    with torch.inference_mode():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    before, after = _zeros(model), _zeros(reloaded)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), f"{model_type} {key}: zeros changed by save/reload"
