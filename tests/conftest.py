"""Shared fixtures: tiny in-process models and tokenizer, the data dir, the bundled model."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see llmprune/__init__.py
import torch  # noqa: E402

# tests never reach a hub: fail fast instead of retrying connections
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the early shape check on every model, tiny ones too (by default it runs only where loading is slower)
os.environ.setdefault("LLMPRUNE_EARLY_CHECK_BYTES", "0")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the dense caches of --eval-kl/--generate go to a folder of this session, never to the user's ~/.cache
os.environ.setdefault("LLMPRUNE_CACHE_DIR", tempfile.mkdtemp(prefix="llmprune-test-cache-"))

ROOT = Path(__file__).resolve().parents[1]
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine and the early bird catches the worm",
    "pruning removes weights from a network without retraining it",
    "sparse models keep two of every four weights in each row",
] * 20


def make_tokenizer():
    """A byte-level BPE tokenizer (vocab < 512) trained in-process: no hub access."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, show_progress=False,
                            special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    return tok


def make_model(family: str = "llama", layers: int = 2, vocab_size: int = 512, seed: int = 0, **overrides):
    """A tiny random CausalLM of the given family (llama, mistral, qwen2), float32, eval mode."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_cls, model_cls = classes[family]
    kwargs = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=layers, vocab_size=vocab_size, max_position_embeddings=256)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).float().eval()
    model.seqlen = 32
    return model


# mixture of experts, under each family's names: 4 experts, 2 per token, the first block dense
MOE_SIZES = dict(num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=32, shared_expert_intermediate_size=64, n_shared_experts=1,
                 first_k_dense_replace=1, moe_topk=2)


def make_family_model(model_type: str, layers: int = 2, vocab_size: int = 512, seed: int = 0, **overrides):
    """A tiny random CausalLM of any transformers model type (``config.model_type``), float32, eval.

    The same sizes as :func:`make_model`, under whichever of the usual names the family's config
    has (OPT says ``ffn_dim``, GPT-2 ``n_embd``, Gemma needs ``head_dim``), and :data:`MOE_SIZES` for
    mixture-of-experts families; token ids are moved inside the small vocabulary (Phi-3's default
    pad id is 32000).
    """
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    config_cls = CONFIG_MAPPING[model_type]
    defaults = config_cls()
    sizes = dict(hidden_size=64, intermediate_size=128, ffn_dim=128, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, num_hidden_layers=layers, vocab_size=vocab_size,
                 max_position_embeddings=256, n_embd=64, n_head=4, n_layer=layers, n_positions=256)
    sizes.update(MOE_SIZES)
    settable = lambda k: not isinstance(getattr(config_cls, k, None), property)  # noqa: E731 (Falcon's head_dim)
    kwargs = {k: v for k, v in sizes.items() if hasattr(defaults, k) and settable(k)}
    kwargs.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_cls(**kwargs)).float().eval()
    model.seqlen = 32
    return model


def dense_means(model, windows, module_of):
    """Per block, the mean of the input of ``module_of(block)`` over the calibration tokens."""
    sums, handles = {}, []
    for i, block in enumerate(model.model.layers):
        def hook(_m, args, i=i):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            s, n = sums.get(i, (0, 0))
            sums[i] = (s + x.sum(0), n + x.shape[0])
        handles.append(module_of(block).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(windows)
    for h in handles:
        h.remove()
    return {i: (s / n).float() for i, (s, n) in sums.items()}


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(params=["llama", "mistral", "qwen2"])
def tiny_model_any(request):
    return make_model(request.param)


@pytest.fixture
def tiny_model():
    return make_model("llama")


_WORDS = ("the quick brown fox jumps over the lazy dog a stitch in time saves nine "
          "pruning removes weights from a network without retraining it ").split()


def write_local_setup(root: Path, docs: int = 8) -> Path:
    """Into ``root``: a tiny LLaMA saved as an HF directory (``model/``), a c4-style calibration
    jsonl (``calib.jsonl``) and an evaluation text (``eval.txt``): what the CLI needs, on disk."""
    make_model("llama").save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    texts = [" ".join(_WORDS[(i * 7 + j) % len(_WORDS)] for j in range(120 + 10 * i)) for i in range(docs)]
    (root / "calib.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (root / "eval.txt").write_text(" ".join(texts))
    return root


def shared_data_dir() -> Path | None:
    env = os.environ.get("LLMPRUNE_DATA_DIR")
    for candidate in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data"]:
        if candidate.is_dir():
            return candidate
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.fail("no data dir: set LLMPRUNE_DATA_DIR to the shared data folder (../shared/data)")
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real bundled model (loaded once per session)."""
    from llmprune.models import load_model

    model, tokenizer = load_model("smollm2-135m", dtype="float32")
    return model, tokenizer
