"""Perplexity: the reference protocol (non-overlapping windows, remainder dropped), float32 loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from conftest import make_family_model, make_model
from llmprune.errors import LlmpruneError
from llmprune.evaluation.perplexity import PerplexityResult, evaluate_perplexity, perplexity, split_head

FALLBACK = "perplexity with full logits"  # the warning when the chunked path does not apply


def hand_ppl(model, tokens: torch.Tensor, seqlen: int, windows: int) -> float:
    """Explicit log_softmax + gather, one window at a time."""
    nlls = []
    with torch.no_grad():
        for w in range(windows):
            ids = tokens[w * seqlen:(w + 1) * seqlen]
            logp = torch.log_softmax(model(ids[None]).logits[0].float(), dim=-1)  # (seqlen, vocab)
            nlls.append(-logp[:-1].gather(1, ids[1:, None]).mean())
    return math.exp(torch.stack(nlls).double().mean().item())


def wanda_ppl(model, tokens: torch.Tensor, seqlen: int, bs: int) -> float:
    """locuslab/wanda eval_ppl_wikitext, on a (1, n) stream."""
    testenc = tokens[None]
    nsamples = testenc.numel() // seqlen
    nlls = []
    with torch.no_grad():
        for i in range(0, nsamples, bs):
            j = min(i + bs, nsamples)
            inputs = testenc[:, i * seqlen:j * seqlen].reshape(j - i, seqlen)
            lm_logits = model(inputs).logits
            shift_logits = lm_logits[:, :-1, :].contiguous()
            loss = nn.CrossEntropyLoss()(shift_logits.reshape(-1, shift_logits.size(-1)),
                                         inputs[:, 1:].reshape(-1))
            nlls.append(loss.float() * seqlen * (j - i))
    return torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen)).item()


def stream(n: int, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_matches_hand_computation(tiny_model_any):
    seqlen = 16
    tokens = stream(5 * seqlen + 7)  # 5 windows and a remainder of 7
    result = perplexity(tiny_model_any, tokens, seqlen, progress=False, dataset="toy")
    assert isinstance(result, PerplexityResult)
    assert result.windows == 5 and result.tokens == 5 * seqlen and result.seqlen == seqlen
    assert result.ppl == pytest.approx(hand_ppl(tiny_model_any, tokens, seqlen, 5), rel=1e-5)
    assert result.dataset == "toy" and result.seconds > 0 and result.tokens_per_s > 0


def test_matches_the_wanda_loop(tiny_model):
    tokens = stream(7 * 12 + 3, seed=1)
    for bs in (1, 2):
        assert perplexity(tiny_model, tokens, 12, batch_size=bs, progress=False).ppl == pytest.approx(
            wanda_ppl(tiny_model, tokens, 12, bs), rel=1e-5)


def test_batch_sizes_agree(tiny_model):
    tokens = stream(7 * 20, seed=2)
    one = perplexity(tiny_model, tokens, 20, batch_size=1, progress=False)
    three = perplexity(tiny_model, tokens, 20, batch_size=3, progress=False)  # 3 + 3 + 1
    assert one.windows == three.windows == 7
    assert three.ppl == pytest.approx(one.ppl, rel=1e-5)


def test_max_windows_and_remainder(tiny_model):
    seqlen = 10
    tokens = stream(6 * seqlen + 9, seed=3)
    part = perplexity(tiny_model, tokens, seqlen, max_windows=2, progress=False)
    assert part.windows == 2 and part.tokens == 20
    assert part.ppl == pytest.approx(hand_ppl(tiny_model, tokens, seqlen, 2), rel=1e-5)
    assert perplexity(tiny_model, tokens, seqlen, max_windows=100, progress=False).windows == 6
    # whatever follows the last full window is never read
    changed = tokens.clone()
    changed[6 * seqlen:] = 0
    assert perplexity(tiny_model, changed, seqlen, progress=False).ppl == perplexity(
        tiny_model, tokens, seqlen, progress=False).ppl
    # a (1, n) stream, as tokenizers return it, is the same stream
    assert perplexity(tiny_model, tokens[None], seqlen, max_windows=2, progress=False).ppl == part.ppl


def test_low_precision_model_loss_in_float32():
    model = make_model("llama").to(torch.bfloat16)
    tokens = stream(3 * 16, seed=4)
    result = perplexity(model, tokens, 16, progress=False)
    assert math.isfinite(result.ppl)
    assert result.ppl == pytest.approx(hand_ppl(model, tokens, 16, 3), rel=1e-5)


# ----------------------------------------------------------------------------- chunked logits

def test_chunked_equals_full_logits(tiny_model_any, caplog):
    """The same bits with logits_chunk positions at a time as with all of a batch's logits, for a
    batch of 1 and of 3, a window (37) that no chunk size divides, and chunks that split a window."""
    seqlen = 37
    tokens = stream(7 * seqlen + 5, seed=5)
    for batch_size in (1, 3):  # 3 + 3 + 1: the last batch is short too
        full = perplexity(tiny_model_any, tokens, seqlen, batch_size=batch_size, logits_chunk=None,
                          progress=False)
        for chunk in (16, 20, 32, 64, 1024):
            chunked = perplexity(tiny_model_any, tokens, seqlen, batch_size=batch_size, logits_chunk=chunk,
                                 progress=False)
            assert chunked.ppl == full.ppl, (batch_size, chunk)
        assert full.ppl == pytest.approx(hand_ppl(tiny_model_any, tokens, seqlen, 7), rel=1e-6)
    assert FALLBACK not in caplog.text  # these families take the chunked path


def test_chunked_low_precision_equals_full():
    model = make_model("qwen2").to(torch.bfloat16)
    tokens = stream(4 * 40, seed=6)
    full = perplexity(model, tokens, 40, batch_size=2, logits_chunk=None, progress=False)
    assert perplexity(model, tokens, 40, batch_size=2, logits_chunk=24, progress=False).ppl == full.ppl
    assert full.ppl == pytest.approx(hand_ppl(model, tokens, 40, 4), rel=1e-5)


@pytest.mark.parametrize("model_type, overrides, field", [
    ("gemma2", dict(final_logit_softcapping=0.5), "softcap"),  # small: the cap changes every logit
    ("cohere", dict(logit_scale=3.0), "multiply"),
    ("granite", dict(logits_scaling=4.0), "divide"),
])
def test_families_that_rescale_their_logits(model_type, overrides, field, caplog):
    model = make_family_model(model_type, **overrides)
    split = split_head(model)
    assert split is not None and getattr(split, field) == next(iter(overrides.values()))
    tokens = stream(3 * 24, vocab=500, seed=7)
    full = perplexity(model, tokens, 24, batch_size=3, logits_chunk=None, progress=False)
    assert perplexity(model, tokens, 24, batch_size=3, logits_chunk=18, progress=False).ppl == full.ppl
    assert full.ppl == pytest.approx(hand_ppl(model, tokens, 24, 3), rel=1e-5)
    assert FALLBACK not in caplog.text  # handled by the split, not by the fallback


class DoubledLogits(torch.nn.Module):
    """A causal LM that does something of its own to its logits (here: doubles them)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    @property
    def base_model(self):
        return self.inner.model

    def forward(self, input_ids, **kwargs):
        out = self.inner(input_ids=input_ids, **kwargs)
        out.logits = out.logits * 2
        return out


def test_fallback_to_full_logits(caplog):
    """Where head(body) is not the model's logits, the probe sees it and the full path runs."""
    model = DoubledLogits(make_model("mistral"))
    assert split_head(model) is not None  # found, but it would give other numbers
    tokens = stream(5 * 30, seed=8)
    with caplog.at_level("WARNING"):
        result = perplexity(model, tokens, 30, batch_size=2, logits_chunk=16, progress=False)
    assert FALLBACK in caplog.text and "DoubledLogits" in caplog.text and "differs" in caplog.text
    assert result.ppl == perplexity(model, tokens, 30, batch_size=2, logits_chunk=None, progress=False).ppl
    assert result.ppl == pytest.approx(hand_ppl(model, tokens, 30, 5), rel=1e-6)
    # without an output head to call, the same
    headless = DoubledLogits(make_model("llama"))
    headless.get_output_embeddings = lambda: None
    assert split_head(headless) is None
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert perplexity(headless, tokens, 30, logits_chunk=16, progress=False).ppl == pytest.approx(
            hand_ppl(headless, tokens, 30, 5), rel=1e-6)
    assert "no output head" in caplog.text


def test_eval_memory_check_counts_chunks(monkeypatch):
    """A batch whose full logits cannot fit is refused only where the chunked path does not apply;
    one whose activations cannot fit is refused either way."""
    from types import SimpleNamespace

    import llmprune.blocks
    from llmprune.evaluation import check_eval_memory

    # the tiny llama: activations 32 x (6 * 64 + 3 * 128) x 4 B = 96 KiB and full logits
    # 2 x 32 x 512 x 4 B = 128 KiB per window; 64 windows: 6 MiB of activations, 8 MiB of logits
    monkeypatch.setattr(llmprune.blocks, "available_bytes", lambda device: 8 * 2**20)  # 8 MiB free
    evaluation = SimpleNamespace(datasets=("ptb",), seqlen=32, batch_size=64)
    check_eval_memory(make_model("llama"), evaluation)
    headless = make_model("llama")
    headless.get_output_embeddings = lambda: None
    with pytest.raises(LlmpruneError, match="--batch-size .* or less"):
        check_eval_memory(headless, evaluation)
    with pytest.raises(LlmpruneError, match="for the activations, .*--batch-size 85 or less"):
        check_eval_memory(make_model("llama"), SimpleNamespace(datasets=("ptb",), seqlen=32, batch_size=128))


def test_errors(tiny_model):
    with pytest.raises(LlmpruneError, match="fewer than one window"):
        perplexity(tiny_model, stream(15), 16, progress=False)
    with pytest.raises(LlmpruneError, match="seqlen"):
        perplexity(tiny_model, stream(15), 1, progress=False)
    with pytest.raises(LlmpruneError, match="batch size"):
        perplexity(tiny_model, stream(32), 16, batch_size=0, progress=False)
    with pytest.raises(LlmpruneError, match="max_windows"):
        perplexity(tiny_model, stream(32), 16, max_windows=0, progress=False)
    with pytest.raises(LlmpruneError, match="logits_chunk"):
        perplexity(tiny_model, stream(32), 16, logits_chunk=0, progress=False)


def test_progress_bar_and_to_dict(tiny_model, capsys):
    result = perplexity(tiny_model, stream(64), 16, progress=True, dataset="toy")
    assert "ppl toy" in capsys.readouterr().err
    perplexity(tiny_model, stream(64), 16, progress=False)
    assert capsys.readouterr().err == ""
    assert set(result.to_dict()) == {"dataset", "ppl", "windows", "tokens", "seqlen", "seconds",
                                     "tokens_per_s"}


def test_evaluate_perplexity_on_a_local_file(tmp_path, tiny_model, tiny_tokenizer):
    from llmprune.data import eval_tokens

    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 30, encoding="utf-8")
    result = evaluate_perplexity(tiny_model, tiny_tokenizer, str(path), 24, batch_size=2, progress=False)
    tokens = eval_tokens(str(path), tiny_tokenizer, 24)
    assert result.windows == tokens.numel() // 24
    assert result.ppl == pytest.approx(hand_ppl(tiny_model, tokens, 24, result.windows), rel=1e-5)
    assert result.dataset == str(path)


def test_smollm2_ptb(smollm2, data_dir):
    model, tokenizer = smollm2
    result = evaluate_perplexity(model, tokenizer, "ptb", 2048, data_dir=data_dir, max_windows=2,
                                 progress=False)
    assert result.windows == 2 and result.tokens == 4096
    assert math.isfinite(result.ppl) and 1 < result.ppl < 200


def test_smollm2_chunked_equals_full(smollm2, caplog):
    """The real head (49152 x 576, tied): the same bits in chunks, down to every token's loss. 1024
    rows in chunks of at most 1020 are two chunks of 512, not 1020 + 4: below 16 rows the CPU matmul
    rounds differently (a 4-row tail changes those 4 losses in the last bits)."""
    import torch.nn.functional as F

    from llmprune.evaluation.perplexity import _labels, _token_losses

    model, _ = smollm2
    tokens = stream(2 * 512, vocab=49152, seed=9)
    full = perplexity(model, tokens, 512, batch_size=2, logits_chunk=None, progress=False)
    for chunk in (1020, 300):
        chunked = perplexity(model, tokens, 512, batch_size=2, logits_chunk=chunk, progress=False)
        assert chunked.ppl == full.ppl, chunk
    assert FALLBACK not in caplog.text
    ids = tokens.view(2, 512)
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits  # (2, 512, vocab)
        want = F.cross_entropy(logits.reshape(1024, -1), _labels(ids).view(-1), reduction="none").view(2, 512)
        for chunk in (1020, 300, 16):
            assert torch.equal(_token_losses(split_head(model), ids, chunk), want), chunk
