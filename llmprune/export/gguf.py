"""GGUF export in llama.cpp's LLaMA layout, for llama.cpp-style runtimes on CPUs and devices.

What llama.cpp's ``convert_hf_to_gguf.py`` does for a LLaMA checkpoint, written with the ``gguf``
package (gguf-py):

* tensor names from gguf-py's name map (``model.layers.3.self_attn.q_proj.weight`` ->
  ``blk.3.attn_q.weight``); lm_head is left out when it is tied to the embeddings;
* q_proj and k_proj rows permuted from transformers' rotary layout (rotate-half) back to the
  interleaved pairs llama.cpp's rope expects: per head, ``(2, head_dim/2)`` -> ``(head_dim/2, 2)``
  (``LlamaModel.permute``; k_proj with the KV head count), biases likewise, each block with its
  own head counts;
* the hyper-parameters from the modules, not the config, where pruning changes them:
  ``block_count`` is the number of decoder blocks (a depth-pruned model has fewer), and per block
  ``feed_forward_length`` = gate_proj's outputs, ``head_count`` / ``head_count_kv`` = q_proj's /
  k_proj's outputs over the head dimension. Equal in every block (a dense model, FLAP's and
  Wanda-sp's uniform structure): scalars, architecture ``llama``. Different per block: arrays of
  ``block_count`` values under architecture ``deci``, because llama.cpp's ``llama`` graph sizes
  every block from block 0's counts (its loader refuses the other blocks' shapes), while its
  ``deci`` graph (NVIDIA's Nemotron-NAS models: per-block heads and FFN widths) reads them per
  block, with the same tensor names and rotary layout. transformers' GGUF reader knows no
  ``deci``: such a file is for llama.cpp. An explicit head dimension is written as
  ``rope.dimension_count`` / ``attention.key_length`` / ``value_length``;
* tokenizer metadata copied from the source GGUF when the model came from one (the bundled
  SmolLM2, or a checkpoint llmprune saved from it), otherwise built from the HF tokenizer with
  gguf-py's vocab readers (byte-level BPE, or LLaMA's SentencePiece-style BPE);
* the weight matrices in one of :data:`TYPES`: f16; q8_0, q5_0 and q4_0 quantized by gguf-py
  (llama.cpp's reference rounding, blocks of 32 weights, symmetric: a zero weight stays exactly
  zero, which q4_1/q5_1's offset would not keep); q4_k (llama.cpp's Q4_K_M) by llama.cpp's own
  quantizer from the llama-cpp-python package, run on an f16 file written first, since gguf-py
  has no k-quant writer. With q4_0 and q5_0 the output matrix (lm_head, or the tied embedding)
  is Q8_0: llama.cpp's quantizer keeps it at 6 bits or more. 1-D tensors (norms, biases) are
  f32; biases that are all zero (FLAP's bias switch gives q/k/v and gate/up zero biases) are
  left out.

Row widths. A row whose length is no multiple of the type's block falls back to f16, as the
converter does; that stays for the rows of length hidden_size (embeddings, q/k/v/gate/up), which
no pruning changes. The widths pruning sets, the inputs of o_proj (heads x head_dim) and down_proj
(MLP channels), must be multiples of 32 in a quantized file (:func:`check_widths`, before any
writing; before the weights load from the config where it tells): otherwise a "quantized" export
would silently hold those matrices in f16. 32 for q4_k too: llama.cpp itself stores the rows its
256-weight blocks cannot hold in Q5_0 (32), as it does for the dense SmolLM2's 576-wide rows.

The file is written under a temporary name beside the target and renamed at the end (q4_k's f16
intermediate is a second temporary file there, removed in every case).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.util
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmprune.errors import LlmpruneError
from llmprune.io import atomic_target, io_errors
from llmprune.models.layout import get_blocks
from llmprune.nonuniform_modeling import WIDTH_KEYS, text_config

# model types whose checkpoints llama.cpp converts to its "llama" architecture
GGUF_FAMILIES = {"llama": "llama", "mistral": "llama"}
# llama.cpp's architecture for blocks of different head counts and FFN widths (see the docstring)
PER_BLOCK_ARCH = "deci"
# the smallest quantization block of llama.cpp's types, and the last step of its k-quant fallback
ROW_MULTIPLE = 32
LLAMA_CPP_FIX = 'pip install "llmprune[llamacpp]" (llama-cpp-python, a source build)'


@dataclass(frozen=True)
class GGUFType:
    """How one ``--type`` is written (names of gguf-py's enums)."""

    matrices: str  # GGMLQuantizationType of the weight matrices
    file_type: str  # LlamaFileType recorded as general.file_type
    output: str  # GGMLQuantizationType of the output matrix (lm_head, or the tied embedding)
    llama_cpp: str | None = None  # llama_cpp's LLAMA_FTYPE_* when llama.cpp's quantizer writes the type

    @property
    def quantized(self) -> bool:
        return self.matrices != "F16"


# the names are ExportConfig's GGUF_TYPES (a test keeps the two equal)
TYPES = {
    "f16": GGUFType("F16", "MOSTLY_F16", "F16"),
    "q8_0": GGUFType("Q8_0", "MOSTLY_Q8_0", "Q8_0"),
    "q5_0": GGUFType("Q5_0", "MOSTLY_Q5_0", "Q8_0"),
    "q4_0": GGUFType("Q4_0", "MOSTLY_Q4_0", "Q8_0"),
    "q4_k": GGUFType("Q4_K", "MOSTLY_Q4_K_M", "Q6_K", llama_cpp="LLAMA_FTYPE_MOSTLY_Q4_K_M"),
}


def check_gguf_type(gguf_type: str) -> GGUFType:
    """The spec of ``gguf_type``; a type whose writer is not installed is a user error (found
    without importing it, before any model loads)."""
    spec = TYPES.get(gguf_type)
    if spec is None:
        raise LlmpruneError(f"unknown GGUF type {gguf_type!r}: choose one of {', '.join(TYPES)}")
    if spec.llama_cpp is not None and importlib.util.find_spec("llama_cpp") is None:
        raise LlmpruneError(f"--type {gguf_type} is written by llama.cpp's own quantizer, and the "
                            f"llama-cpp-python package is not installed: {LLAMA_CPP_FIX} "
                            "(or export --type q4_0 or q8_0, which need no extra package)")
    return spec


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


def head_dim_of(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def check_widths(widths, gguf_type: str) -> None:
    """Refuse a width pruning set that the quantization blocks of ``gguf_type`` cannot hold.
    ``widths``: ``(layer, input width, "heads" or "mlp")`` of the o_proj and down_proj Linears."""
    if not TYPES[gguf_type].quantized:
        return
    for layer, width, kind in widths:
        if isinstance(width, int) and width % ROW_MULTIPLE:
            fix = (f"prune with --channel-multiple {ROW_MULTIPLE}" if kind == "mlp" else
                   f"keep a head count whose width (heads x head_dim) is a multiple of {ROW_MULTIPLE}")
            raise LlmpruneError(f"{layer} has input width {width}, no multiple of {ROW_MULTIPLE}: "
                                f"{gguf_type} quantizes rows in blocks of {ROW_MULTIPLE} weights and would "
                                "leave it f16; "
                                f"{fix}, or export --type f16")


def config_widths(config) -> list[tuple[str, int, str]]:
    """The o_proj and down_proj input widths the config gives the blocks, for the check before the
    weights load: per block where it lists them (a model with per-block widths keeps its dense
    counts and adds ``WIDTH_KEYS``), else one width for every block. The modules are checked
    again before writing."""
    text = text_config(config)
    inter_key, heads_key, _ = WIDTH_KEYS
    heads = getattr(text, heads_key, None) or [getattr(text, "num_attention_heads", None)]
    inter = getattr(text, inter_key, None) or [getattr(text, "intermediate_size", None)]
    head_dim = head_dim_of(text)

    def name(i: int, layer: str, listed: list) -> str:
        return f"model.layers.{i if len(listed) > 1 else '*'}.{layer}"

    return ([(name(i, "self_attn.o_proj", heads), n * head_dim, "heads")
             for i, n in enumerate(heads) if isinstance(n, int)]
            + [(name(i, "mlp.down_proj", inter), n, "mlp")
               for i, n in enumerate(inter) if isinstance(n, int)])


def block_shapes(model: nn.Module) -> list[dict]:
    """Per decoder block, from its modules: the GGUF head and FFN counts, and the input widths of
    o_proj and down_proj (``widths``, as :func:`check_widths` takes them)."""
    head_dim = head_dim_of(model.config)
    names = {id(module): name for name, module in model.named_modules()}
    shapes = []
    for i, block in enumerate(get_blocks(model)):
        attn, mlp = block.self_attn, block.mlp
        q, k = attn.q_proj.out_features, attn.k_proj.out_features
        if q % head_dim or k % head_dim:
            raise LlmpruneError(f"block {i}: q_proj ({q} outputs) or k_proj ({k}) is no whole number of "
                                f"heads of head_dim {head_dim}: the config's head_dim does not describe it")
        shapes.append({"feed_forward_length": mlp.gate_proj.out_features, "head_count": q // head_dim,
                       "head_count_kv": k // head_dim,
                       "widths": ((names[id(attn.o_proj)], attn.o_proj.in_features, "heads"),
                                  (names[id(mlp.down_proj)], mlp.down_proj.in_features, "mlp"))})
    return shapes


PER_BLOCK_KEYS = ("feed_forward_length", "head_count", "head_count_kv")


def _hparams(config, shapes: list[dict]) -> dict:
    """The GGUF hyper-parameters: per-block counts from ``shapes`` (a scalar when every block has
    the same, else one value per block), the rest from the config."""
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    hp = {"context_length": int(config.max_position_embeddings),
          "embedding_length": int(config.hidden_size), "block_count": len(shapes),
          "head_dim": head_dim_of(config),
          "rope_theta": float(theta or getattr(config, "rope_theta", 10000.0)),
          "rms_norm_eps": float(config.rms_norm_eps), "vocab_size": int(config.vocab_size)}
    for key in PER_BLOCK_KEYS:
        values = [int(shape[key]) for shape in shapes]
        hp[key] = values[0] if len(set(values)) == 1 else values
    return hp


def per_block(hp: dict, key: str) -> list[int]:
    """One value per block of a hyper-parameter written as a scalar or an array."""
    value = hp[key]
    return list(value) if isinstance(value, list) else [value] * hp["block_count"]


# GGUFWriter method -> hyper-parameter (llama.cpp's {arch}.* keys); the head dimension is written
# three ways, as the converter does when head_dim is explicit. add_feed_forward_length and
# add_head_count(_kv) write an array when given a list.
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


def _source_arch(reader) -> str | None:
    """The architecture the source GGUF names (None without a source)."""
    field = reader.fields.get("general.architecture") if reader is not None else None
    return str(field.contents()) if field is not None else None


def _source_fields(key: str, archs: tuple[str | None, ...]) -> bool:
    """Fields of the source GGUF that still describe the exported model: the tokenizer and the
    general.* descriptions; never the file's own type or the (re-computed) hyper-parameters, under
    the export's architecture or the source's (they differ when the export is ``deci``)."""
    if key.startswith(("GGUF.", *(f"{arch}." for arch in archs if arch))):
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


def _matrix(array: np.ndarray, qtype: str):
    """(data, raw type) of a 2-D weight in GGML type ``qtype``, or f16 when its rows do not split
    into that type's blocks (the converter's fallback)."""
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if kind != gguf.GGMLQuantizationType.F16 and array.shape[-1] % block == 0:
        return gguf.quants.quantize(array, kind), kind
    return array.astype(np.float16), gguf.GGMLQuantizationType.F16


_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.")


def _tensors(model: nn.Module, spec: GGUFType, hp: dict, arch: str):
    """Yield (gguf name, data, raw dtype) for every tensor of the checkpoint."""
    import gguf

    model_arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(model_arch, hp["block_count"])
    heads, heads_kv = per_block(hp, "head_count"), per_block(hp, "head_count_kv")
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    output = "token_embd.weight" if tied else "output.weight"
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise LlmpruneError(f"GGUF export: the model's tensor {name} has no place in "
                                "llama.cpp's LLaMA layout")
        if name.endswith(".bias") and not bool(tensor.any()):
            continue  # a zero bias adds nothing (and llama.cpp expects q/k/v biases of the full width)
        block = _BLOCK_NAME.match(target)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute_qk(tensor, heads[int(block.group(1))])
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute_qk(tensor, heads_kv[int(block.group(1))])
        array = tensor.detach().float().cpu().numpy()
        if tensor.dim() == 2:
            data, raw = _matrix(array, spec.output if target == output else spec.matrices)
        else:
            data, raw = array, gguf.GGMLQuantizationType.F32
        yield target, data, raw


def _write(model: nn.Module, tokenizer, path: Path, arch: str, hp: dict, spec: GGUFType, reader) -> None:
    """Write the GGUF file at ``path`` with gguf-py (metadata, then the tensors)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    try:
        source_arch = _source_arch(reader)
        copied = (_copy_fields(writer, reader, lambda k: _source_fields(k, (arch, source_arch)))
                  if reader is not None else [])
        if not any(k.startswith("tokenizer.") for k in copied):
            _tokenizer_from_hf(writer, tokenizer, hp["vocab_size"])
        _add_hparams(writer, hp)
        writer.add_file_type(int(gguf.LlamaFileType[spec.file_type]))
        if spec.quantized:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, data, raw in _tensors(model, spec, hp, arch):
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        # closing a half-written file fails too: keep the first error
        with contextlib.suppress(Exception):
            writer.close()
        raise
    writer.close()


@contextlib.contextmanager
def _scratch_file(out: Path):
    """A temporary file name beside ``out`` (same disk as the result), removed in every case."""
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".f16.tmp", dir=out.parent)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


@contextlib.contextmanager
def _stderr_to_file():
    """File descriptor 2 sent to a temporary file for the duration: llama.cpp's log (a line per
    tensor, a warning per fallback) goes there, read back only to explain a failure."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield log
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _llama_cpp_quantize(source: Path, target: Path, spec: GGUFType) -> None:
    """``source`` (f16 GGUF) -> ``target`` in ``spec``'s type, by llama.cpp's own quantizer: its
    tensor rules (Q6_K output, the attention V and FFN down of some blocks at 6 bits for Q4_K_M,
    Q5_0 or f16 for rows a 256-block cannot hold) and its file_type / quantization_version."""
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:  # OSError: the package is there but its library does not load
        raise LlmpruneError(f"llama-cpp-python cannot be loaded ({type(exc).__name__}: {exc}): "
                            f"{LLAMA_CPP_FIX} again") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, spec.llama_cpp)
    with _stderr_to_file() as log:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(),
                                                ctypes.byref(params))
        log.seek(0)
        lines = log.read().decode("utf-8", errors="replace").strip().splitlines()
    if status != 0:  # llama.cpp's last log line says why (most often the disk)
        why = lines[-1] if lines else f"status {status}"
        raise OSError(errno.EIO, f"llama.cpp's quantizer failed: {why}")


def _tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file at ``path`` holds."""
    import gguf

    types: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return types


def _source_reader(source_gguf, hp: dict):
    """A reader of the source GGUF (None without one); one with more tokens than the model has
    embeddings is not its source."""
    import gguf

    if source_gguf is None:
        return None
    reader = gguf.GGUFReader(str(source_gguf))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.data) > hp["vocab_size"]:
        raise LlmpruneError(f"{source_gguf} has {len(tokens.data)} tokens but the model {hp['vocab_size']} "
                            "embeddings: it is not the model's source")
    return reader


def export_gguf(model: nn.Module, tokenizer, out: str | os.PathLike, gguf_type: str = "f16",
                source_gguf: str | os.PathLike | None = None) -> dict:
    """Write ``model`` as a GGUF file at ``out`` (atomically) in ``gguf_type`` (one of
    :data:`TYPES`). ``source_gguf``: the GGUF file the model came from, whose tokenizer and
    general.* metadata are copied. Everything refusable is refused before the file is begun.
    Returns a summary: path, bytes, type, tensor_types (count per GGML type), hparams, tokenizer."""
    spec = check_gguf_type(gguf_type)
    arch = check_exportable(model.config)
    shapes = block_shapes(model)
    check_widths([width for shape in shapes for width in shape["widths"]], gguf_type)
    hp = _hparams(model.config, shapes)
    if any(isinstance(hp[key], list) for key in PER_BLOCK_KEYS):
        arch = PER_BLOCK_ARCH
    reader = _source_reader(source_gguf, hp)
    out = Path(out)
    with atomic_target(out, signals=True) as tmp, io_errors():
        if spec.llama_cpp is None:
            _write(model, tokenizer, tmp, arch, hp, spec, reader)
        else:
            with _scratch_file(out) as f16:
                _write(model, tokenizer, f16, arch, hp, TYPES["f16"], reader)
                _llama_cpp_quantize(f16, tmp, spec)
        types = _tensor_types(tmp)
    return {"path": str(out), "bytes": out.stat().st_size, "type": gguf_type, "architecture": arch,
            "tensor_types": types, "hparams": hp,
            "tokenizer": ("copied from " + str(source_gguf) if reader is not None
                          else "built from the HF tokenizer")}
