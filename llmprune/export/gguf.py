"""GGUF export in llama.cpp's LLaMA layout, for llama.cpp-style runtimes on CPUs and devices.

What llama.cpp's ``convert_hf_to_gguf.py`` does for a LLaMA checkpoint, written with the ``gguf``
package (gguf-py):

* tensor names from gguf-py's name map (``model.layers.3.self_attn.q_proj.weight`` ->
  ``blk.3.attn_q.weight``); lm_head is left out when it is tied to the embeddings;
* q_proj and k_proj rows permuted from transformers' rotary layout (rotate-half) back to the
  interleaved pairs llama.cpp's rope expects: per head, ``(2, head_dim/2)`` -> ``(head_dim/2, 2)``
  (``LlamaModel.permute``; k_proj with the KV head count), biases likewise;
* the hyper-parameters from the model's *current* config (a structured-pruned model exports
  with its smaller ``feed_forward_length``, head counts and an explicit head dimension as
  ``rope.dimension_count`` / ``attention.key_length`` / ``value_length``);
* tokenizer metadata copied from the source GGUF when the model came from one (the bundled
  SmolLM2, or a checkpoint llmprune saved from it), otherwise built from the HF tokenizer with
  gguf-py's vocab readers (byte-level BPE, or LLaMA's SentencePiece-style BPE);
* matrices in f16 or q8_0 (llama.cpp's 32-weight blocks; a row length that is no multiple of 32
  falls back to f16, as the converter does), 1-D tensors (norms, biases) in f32. Biases that are
  all zero (FLAP's bias switch gives q/k/v and gate/up zero biases) are left out.

The file is written under a temporary name beside the target and renamed at the end.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmprune.errors import LlmpruneError
from llmprune.io import atomic_target, io_errors

# model types whose checkpoints llama.cpp converts to its "llama" architecture
GGUF_FAMILIES = {"llama": "llama", "mistral": "llama"}
_BLOCK_SIZE = 32  # q8_0 quantizes rows in blocks of 32 weights


def check_exportable(config) -> str:
    """The GGUF architecture of a model with this config; a family GGUF's LLaMA layout does not
    describe is a user error."""
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_FAMILIES:
        raise LlmpruneError("GGUF export writes llama.cpp's LLaMA layout, which does not describe model "
                            f"type {model_type!r}: export a {' or '.join(sorted(GGUF_FAMILIES))} model")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in (None, "default"):
        raise LlmpruneError(f"rope scaling {rope_type!r} is not exported (only plain rotary embeddings): "
                            "this model cannot be written as GGUF by llmprune")
    return GGUF_FAMILIES[model_type]


def permute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q_proj / k_proj (weight or bias), per head from rotate-half to interleaved pairs."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_qk` (what a reader does)."""
    shape = weight.shape
    return weight.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _hparams(config) -> dict:
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    return {"context_length": int(config.max_position_embeddings),
            "embedding_length": int(config.hidden_size), "block_count": int(config.num_hidden_layers),
            "feed_forward_length": int(config.intermediate_size), "head_count": heads,
            "head_count_kv": int(getattr(config, "num_key_value_heads", None) or heads), "head_dim": head_dim,
            "rope_theta": float(theta or getattr(config, "rope_theta", 10000.0)),
            "rms_norm_eps": float(config.rms_norm_eps), "vocab_size": int(config.vocab_size)}


# GGUFWriter method -> hyper-parameter (llama.cpp's {arch}.* keys); the head dimension is written
# three ways, as the converter does when head_dim is explicit
_HPARAM_KEYS = (("add_context_length", "context_length"), ("add_embedding_length", "embedding_length"),
                ("add_block_count", "block_count"), ("add_feed_forward_length", "feed_forward_length"),
                ("add_head_count", "head_count"), ("add_head_count_kv", "head_count_kv"),
                ("add_rope_freq_base", "rope_theta"), ("add_layer_norm_rms_eps", "rms_norm_eps"),
                ("add_vocab_size", "vocab_size"), ("add_rope_dimension_count", "head_dim"),
                ("add_key_length", "head_dim"), ("add_value_length", "head_dim"))


def _add_hparams(writer, hp: dict) -> None:
    for method, key in _HPARAM_KEYS:
        getattr(writer, method)(hp[key])


def _copy_fields(writer, reader, keep) -> list[str]:
    """Copy the source GGUF's fields whose key ``keep(key)`` accepts; returns the keys copied."""
    import gguf

    copied = []
    for key, field in reader.fields.items():
        if not keep(key) or not field.types:
            continue
        value = field.contents()
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub)
        copied.append(key)
    return copied


def _source_fields(key: str, arch: str) -> bool:
    """Fields of the source GGUF that still describe the exported model: the tokenizer and the
    general.* descriptions; never the file's own type or the (re-computed) hyper-parameters."""
    if key.startswith(("GGUF.", f"{arch}.")):
        return False
    return key not in ("general.architecture", "general.file_type", "general.quantization_version",
                       "general.alignment")


def _tokenizer_from_hf(writer, tokenizer, vocab_size: int) -> None:
    """Tokenizer metadata built from an HF tokenizer (saved to a temporary folder for gguf-py)."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        vocab = None
        for reader in (BpeVocab, LlamaHfVocab):
            try:
                vocab = reader(Path(folder))
                break
            except (FileNotFoundError, TypeError, KeyError, ValueError):
                continue
        if vocab is None:
            raise LlmpruneError("cannot build GGUF tokenizer metadata from a "
                                f"{type(tokenizer).__name__}: llmprune writes byte-level BPE and LLaMA "
                                "BPE tokenizers; export from a GGUF source")
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        for i in range(len(tokens), vocab_size):  # the embedding may have rows no token names
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        if vocab.tokenizer_model == "gpt2":
            writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        SpecialVocab(Path(folder), load_merges=vocab.tokenizer_model == "gpt2",
                     n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _matrix(tensor: torch.Tensor, gguf_type: str):
    """(data, raw_dtype) of a 2-D weight in ``gguf_type`` (f16, or q8_0 when its rows split into blocks)."""
    import gguf

    array = tensor.detach().float().cpu().numpy()
    if gguf_type == "q8_0" and array.shape[-1] % _BLOCK_SIZE == 0:
        q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
        return q, gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), gguf.GGMLQuantizationType.F16


def _tensors(model: nn.Module, gguf_type: str, hp: dict):
    """Yield (gguf name, data, raw dtype) for every tensor of the checkpoint."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["block_count"])
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise LlmpruneError(f"GGUF export: the model's tensor {name} has no place in "
                                "llama.cpp's LLaMA layout")
        if name.endswith(".bias") and not bool(tensor.any()):
            continue  # a zero bias adds nothing (and llama.cpp expects q/k/v biases of the full width)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute_qk(tensor, hp["head_count"])
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute_qk(tensor, hp["head_count_kv"])
        if tensor.dim() == 2:
            data, raw = _matrix(tensor, gguf_type)
        else:
            data, raw = tensor.detach().float().cpu().numpy(), gguf.GGMLQuantizationType.F32
        yield target, data, raw


def export_gguf(model: nn.Module, tokenizer, out: str | os.PathLike, gguf_type: str = "f16",
                source_gguf: str | os.PathLike | None = None) -> dict:
    """Write ``model`` as a GGUF file at ``out`` (atomically). ``source_gguf``: the GGUF file the
    model came from, whose tokenizer and general.* metadata are copied. Returns a summary."""
    import gguf

    arch = check_exportable(model.config)
    hp = _hparams(model.config)
    reader = gguf.GGUFReader(str(source_gguf)) if source_gguf is not None else None
    if reader is not None:
        vocab = (len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields
                 else None)
        if vocab is not None and vocab > hp["vocab_size"]:
            raise LlmpruneError(f"{source_gguf} has {vocab} tokens but the model {hp['vocab_size']} "
                                "embeddings: it is not the model's source")
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    types: dict[str, int] = {}
    with atomic_target(out, signals=True) as tmp, io_errors():
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            copied = (_copy_fields(writer, reader, lambda k: _source_fields(k, arch))
                      if reader is not None else [])
            if not any(k.startswith("tokenizer.") for k in copied):
                _tokenizer_from_hf(writer, tokenizer, hp["vocab_size"])
            _add_hparams(writer, hp)
            writer.add_file_type(int(file_type))
            if gguf_type == "q8_0":
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for name, data, raw in _tensors(model, gguf_type, hp):
                writer.add_tensor(name, data, raw_dtype=raw)
                types[raw.name] = types.get(raw.name, 0) + 1
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        except BaseException:
            # closing a half-written file fails too: keep the first error
            with contextlib.suppress(Exception):
                writer.close()
            raise
        writer.close()
    return {"path": str(out), "bytes": Path(out).stat().st_size, "type": gguf_type, "tensor_types": types,
            "hparams": hp, "tokenizer": ("copied from " + str(source_gguf) if reader is not None
                                         else "built from the HF tokenizer")}
