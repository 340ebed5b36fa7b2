"""llama.cpp in the loop: a GGUF's perplexity in llama.cpp on llmprune's windows equals an independent
transformers forward on the same ids; tokens/s; the CLI's checks before any slow work.

The tests that run llama.cpp are skipped, with the reason printed (``-ra``), where llama-cpp-python is
not installed (it builds from source: CI may not have it); the others run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_model, make_tokenizer, write_local_setup
from llmprune.cli import main
from llmprune.errors import LlmpruneError
from llmprune.evaluation import llamacpp
from llmprune.evaluation.perplexity import perplexity as torch_perplexity
from llmprune.export.gguf import export_gguf

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (pip install \"llmprune[llamacpp]\", a source build)")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny random LLaMA (float32 original) and its f16 GGUF export with the HF-built tokenizer."""
    model = make_model("llama")
    out = tmp_path_factory.mktemp("tiny") / "tiny-f16.gguf"
    export_gguf(model, make_tokenizer(), out, "f16")
    return model, out


def _reference_nll(model, ids: torch.Tensor) -> float:
    """Mean next-token CE of one window from a transformers forward, float64. ids (L,)."""
    with torch.no_grad():
        logits = model(ids[None]).logits[0].double()  # (L, vocab)
    return F.cross_entropy(logits[:-1], ids[1:]).item()


def _read_back(path):
    """The GGUF read by transformers: the same f16 weights llama.cpp runs, in float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


# ---------------------------------------------------------------- everywhere (no llama.cpp needed)


def test_missing_llama_cpp_is_one_line_naming_the_extra(monkeypatch, tmp_path, capsys, tiny_gguf):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    with pytest.raises(LlmpruneError, match=r'pip install "llmprune\[llamacpp\]".*cmake'):
        llamacpp.check_available()
    assert main(["llamacpp", str(tiny_gguf[1]), "--seqlen", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "llama-cpp-python, which is not installed" in err


def test_bad_inputs_fail_before_the_tokenizer_loads(monkeypatch, tmp_path, capsys, tiny_gguf):
    monkeypatch.setattr(llamacpp, "check_available", lambda: None)  # these checks come before llama.cpp
    monkeypatch.setattr(llamacpp, "load_tokenizer", lambda *a: pytest.fail("loaded the tokenizer"))
    (tmp_path / "not.gguf").write_text("hello")
    (tmp_path / "cut.gguf").write_bytes(tiny_gguf[1].read_bytes()[:1000])  # a download cut short
    cases = [([str(tmp_path / "missing.gguf")], "does not exist"),
             ([str(tmp_path / "not.gguf")], "not a GGUF file"),
             ([str(tmp_path / "cut.gguf")], "damaged or incomplete GGUF file"),
             ([str(tiny_gguf[1]), "--seqlen", "300"], "longer than the 256-token context"),
             ([str(tiny_gguf[1]), "--seqlen", "32", "--speed", "--prompt-tokens", "250"],
              "--prompt-tokens + --gen-tokens 314 is longer"),
             ([str(tiny_gguf[1]), "--threads", "0"], "--threads must be a positive integer"),
             ([str(tiny_gguf[1]), "--seqlen", "32", "--max-windows", "0"], "--max-windows must be"),
             ([str(tiny_gguf[1]), "--seqlen", "32", "--data-dir", str(tmp_path / "no")], "data dir"),
             ([str(tiny_gguf[1]), "--json", str(tmp_path)], "is a folder")]
    for argv, needle in cases:
        assert main(["llamacpp", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (argv, err)


def test_windows_are_llmprune_s_cut():
    """numel // seqlen windows, the remainder dropped, the first max_windows: as perplexity()."""
    stream = torch.arange(100)
    assert llamacpp.token_windows(stream, 32).tolist() == stream[:96].view(3, 32).tolist()
    assert llamacpp.token_windows(stream[None], 32, max_windows=2).shape == (2, 32)
    assert llamacpp.token_windows(stream.numpy(), 50, max_windows=9).shape == (2, 50)
    with pytest.raises(LlmpruneError, match="fewer than one window"):
        llamacpp.token_windows(stream, 101)


def test_window_nll_is_the_float64_cross_entropy(monkeypatch):
    """Row i predicts ids[i + 1], the last row predicts nothing; chunked rows sum to the whole."""
    monkeypatch.setattr(llamacpp, "NLL_ROWS", 3)  # several chunks, a short last one
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(10, 7, generator=gen) * 5).float()  # (L, V)
    ids = torch.randint(0, 7, (10,), generator=gen)
    want = F.cross_entropy(logits.double()[:-1], ids[1:]).item()
    assert llamacpp.window_nll(logits.numpy(), ids.numpy()) == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------- with llama.cpp


@needs_llama_cpp
def test_tiny_gguf_nll_in_llama_cpp_equals_transformers(tiny_gguf):
    model, path = tiny_gguf
    windows = torch.randint(0, 386, (3, 32), generator=torch.Generator().manual_seed(1))
    result = llamacpp.perplexity(path, windows.numpy(), threads=1, progress=False)
    back = _read_back(path)
    for w, ids in enumerate(windows):
        # the same f16 weights: only the kernels differ (llama.cpp rounds activations to f16 in its matmuls)
        assert result.window_nll[w] == pytest.approx(_reference_nll(back, ids), abs=1e-4)
        assert result.window_nll[w] == pytest.approx(_reference_nll(model, ids), abs=1e-3)  # float32 original
    assert (result.windows, result.tokens, result.seqlen) == (3, 96, 32)
    assert result.ppl == pytest.approx(math.exp(np.mean(result.window_nll)), rel=1e-12)


@needs_llama_cpp
def test_cli_on_a_local_text_equals_llmprune_s_perplexity(tiny_gguf, tmp_path, capsys):
    """`llmprune llamacpp` with the GGUF's own tokenizer: the perplexity llmprune's torch loop gives
    on the same stream and windows; --speed adds tokens/s and the child's peak RSS to the JSON."""
    root = write_local_setup(tmp_path)
    out = tmp_path / "r.json"
    argv = ["llamacpp", str(tiny_gguf[1]), "--dataset", str(root / "eval.txt"), "--seqlen", "32",
            "--max-windows", "3", "--threads", "1", "--speed", "--prompt-tokens", "16", "--gen-tokens", "4",
            "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "llama.cpp" in printed and "prefill" in printed and "peak RSS" in printed
    record = json.loads(out.read_text())
    got = record["perplexity"][str(root / "eval.txt")]
    from llmprune.data import eval_tokens

    tokens = eval_tokens(str(root / "eval.txt"), llamacpp.load_tokenizer(tiny_gguf[1]), 32)
    want = torch_perplexity(_read_back(tiny_gguf[1]), tokens, 32, max_windows=3, progress=False)
    assert (got["windows"], got["tokens"]) == (want.windows, want.tokens) == (3, 96)
    assert got["ppl"] == pytest.approx(want.ppl, rel=1e-4)
    speed = record["speed"]
    assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0
    assert len(speed["prefill_runs"]) == speed["repeats"] == 3
    # the child's own peak: its interpreter, numpy and llama.cpp, not this process's torch and models
    assert 0 < speed["peak_rss_mib"] < llamacpp.peak_rss_mib()
    assert record["versions"]["llama_cpp_python"]


@needs_llama_cpp
def test_token_ids_outside_the_gguf_vocabulary_are_refused(tiny_gguf):
    with pytest.raises(LlmpruneError, match="tokenize with the GGUF's own tokenizer"):
        llamacpp.perplexity(tiny_gguf[1], np.full((1, 8), 600), threads=1, progress=False)


@needs_llama_cpp
def test_smollm2_window_nll_in_llama_cpp_equals_transformers(smollm2, data_dir, tmp_path):
    """The bundled SmolLM2 exported as f16: one WikiText-2 window of 128 tokens in llama.cpp against
    the float32 model llmprune loads (dequantized Q4_1), which the f16 export rounds."""
    model, tokenizer = smollm2
    path = tmp_path / "smollm2-f16.gguf"
    export_gguf(model, tokenizer, path, "f16")
    from llmprune.data import eval_tokens

    windows = llamacpp.token_windows(eval_tokens("wikitext2", tokenizer, 128, data_dir=data_dir), 128, 1)
    result = llamacpp.perplexity(path, windows, threads=2, dataset="wikitext2", progress=False)
    want = _reference_nll(model, torch.from_numpy(windows[0]))
    assert result.window_nll[0] == pytest.approx(want, abs=1e-3)  # measured 7e-5; ppl within 0.1%
