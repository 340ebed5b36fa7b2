"""The compressed checkpoint: each pruned Linear as a packed bitmask plus its nonzero values.

A dense checkpoint of a 50%-sparse model is as large as the dense model. Here every prunable
Linear weight of the decoder blocks is stored as

    <name>::bitmask  uint8 (ceil(out*in / 8),)  bit k of byte b: element 8b+k of the row-major
                                                 weight is nonzero (little-endian bit order)
    <name>::values   the nonzero elements in row-major order: floats in the stored dtype, or
                     int8 with
    <name>::scale    float32 (out,)               per-output-channel scales (quantize.py)

unless the bitmask does not pay for itself (a dense layer), when ``values`` is the whole
matrix. Everything else (embeddings, norms, lm_head) is stored as it is. One safetensors file,
``llmprune-compressed.safetensors``, whose metadata carries the format name, its version and a
JSON table of the encoded layers; ``config.json`` and the tokenizer sit beside it, as in an HF
checkpoint. The weights file has another name than ``model.safetensors`` on purpose: plain
``from_pretrained`` refuses the folder instead of loading random weights. ``load_model(DIR)``
recognises it and restores the weights exactly (the dtype they were saved in).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch import nn

from llmprune.errors import LlmpruneError
from llmprune.math.quantize import dequantize_int8, quantize_int8
from llmprune.models.layout import get_blocks, prunable_linears
from llmprune.nonuniform import model_class as per_block_class

FORMAT = "llmprune.compressed"
VERSION = "1"
WEIGHTS_FILE = "llmprune-compressed.safetensors"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ---------------------------------------------------------------- bitmask (pure)

_BITS = 2 ** torch.arange(8, dtype=torch.int32)  # weight of bit k in a byte


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor, flattened row-major, as uint8 bytes (ceil(n / 8),), little-endian bits."""
    flat = mask.reshape(-1).to(torch.int32)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.reshape(-1, 8) * _BITS.to(flat.device)).sum(dim=1).to(torch.uint8)


def unpack_bitmask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The bool tensor (numel,) that :func:`pack_bitmask` packed."""
    bits = (packed.to(torch.int32)[:, None] & _BITS.to(packed.device)) != 0  # (bytes, 8)
    return bits.reshape(-1)[:numel]


# ---------------------------------------------------------------- encode / decode one weight

def encode_weight(weight: torch.Tensor, quantize: str | None, dtype: torch.dtype) -> tuple[dict, dict]:
    """``(tensors, entry)`` for one weight (out, in): the tensors under their suffixes and the
    metadata entry. ``dtype`` is the stored float dtype (quantize=None)."""
    if quantize is not None:
        q, scale = quantize_int8(weight)
        values, itemsize, tensors = q, 1, {"scale": scale}
    else:
        values, itemsize = weight.detach().to(dtype), torch.tensor([], dtype=dtype).element_size()
        tensors = {}
    mask = values != 0
    nnz = int(mask.sum().item())
    sparse = math.ceil(values.numel() / 8) + nnz * itemsize < values.numel() * itemsize
    if sparse:
        tensors.update(bitmask=pack_bitmask(mask), values=values[mask].contiguous())  # row-major nonzeros
    else:
        tensors["values"] = values.contiguous()
    entry = {"shape": list(weight.shape), "encoding": "bitmask" if sparse else "dense", "quant": quantize}
    return {k: v.cpu() for k, v in tensors.items()}, entry


def decode_weight(tensors: dict, entry: dict, dtype: torch.dtype) -> torch.Tensor:
    """The weight :func:`encode_weight` stored, in ``dtype`` (the dtype the weights were saved from)."""
    shape = tuple(entry["shape"])
    values = tensors["values"]
    if entry["encoding"] == "bitmask":
        mask = unpack_bitmask(tensors["bitmask"], math.prod(shape))
        full = torch.zeros(math.prod(shape), dtype=values.dtype)
        full[mask] = values
        values = full.reshape(shape)
    if entry["quant"] == "int8":
        return dequantize_int8(values.reshape(shape), tensors["scale"], dtype)
    return values.reshape(shape).to(dtype)


# ---------------------------------------------------------------- the checkpoint

def encoded_names(model: nn.Module) -> list[str]:
    """Parameter names of every block's prunable ``nn.Linear`` weight."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    names = []
    for i in range(len(get_blocks(model))):
        for layer in prunable_linears(model, i).values():
            if isinstance(layer, nn.Linear) and id(layer.weight) in by_id:
                names.append(by_id[id(layer.weight)])
    return names


def write_compressed(model: nn.Module, folder: str | Path, quantize: str | None = None,
                     dtype: str | None = None) -> dict:
    """Write the config and the compressed weights into ``folder`` (an empty temporary folder:
    ``llmprune.io.save_pruned`` owns the folder rules). Returns the byte counts."""
    from safetensors.torch import save_file

    folder = Path(folder)
    encoded = set(encoded_names(model))
    model_dtype = next(model.parameters()).dtype
    store = DTYPES[dtype] if dtype is not None else model_dtype
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    seen: set[int] = set()
    counts = {"encoded_bytes": 0, "encoded_fp16_bytes": 0, "encoded_params": 0, "other_bytes": 0}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen and tensor.numel():  # tied weights (lm_head = embeddings): stored once
            continue
        seen.add(tensor.data_ptr())
        if name in encoded:
            parts, entry = encode_weight(tensor, quantize, store)
            layers[name] = entry
            for suffix, t in parts.items():
                tensors[f"{name}::{suffix}"] = t
            counts["encoded_bytes"] += sum(t.numel() * t.element_size() for t in parts.values())
            counts["encoded_fp16_bytes"] += tensor.numel() * 2
            counts["encoded_params"] += tensor.numel()
        else:
            value = tensor.detach().to(store) if tensor.is_floating_point() else tensor.detach()
            tensors[name] = value.cpu().contiguous()
            counts["other_bytes"] += value.numel() * value.element_size()
    metadata = {"format": FORMAT, "version": VERSION, "dtype": str(store).replace("torch.", ""),
                "layers": json.dumps(layers)}
    _config_with_dtype(model, store).save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(folder)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata=metadata)
    counts["file_bytes"] = (folder / WEIGHTS_FILE).stat().st_size
    counts["layers"] = len(layers)
    return counts


def _config_with_dtype(model: nn.Module, dtype: torch.dtype):
    config = copy.deepcopy(model.config)
    config.dtype = dtype  # the dtype "auto" loads the weights in
    return config


def compressed_metadata(path: str | Path) -> dict | None:
    """The checked metadata of a compressed checkpoint folder; None if ``path`` is not one.
    A weights file without the format tag, or with another version, is a user error."""
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - a damaged header
        raise LlmpruneError(f"{weights} is not a readable safetensors file: {exc}") from None
    if meta.get("format") != FORMAT or "version" not in meta:
        raise LlmpruneError(f"{weights} has no llmprune compressed-format version tag: it was not written by "
                            "llmprune (or is damaged); re-create it with `llmprune compress`")
    if meta["version"] != VERSION:
        raise LlmpruneError(f"{weights} is compressed-format version {meta['version']!r}, but this llmprune "
                            f"reads version {VERSION}: use the llmprune that wrote it, or re-create it with "
                            "`llmprune compress`")
    try:
        meta["layers"] = json.loads(meta.get("layers", "{}"))
    except ValueError:
        raise LlmpruneError(f"{weights}: its layer table is not valid JSON (the file is damaged)") from None
    return meta


def load_compressed(path: str | Path, device_map=None, **dtype_kwarg) -> nn.Module:
    """The model of a compressed checkpoint folder, its weights restored exactly. ``dtype_kwarg``:
    the one dtype keyword ``from_pretrained`` takes (``dtype=`` or ``torch_dtype=``); "auto" loads
    the dtype the weights were saved from."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    meta = compressed_metadata(path)
    if meta is None:
        raise LlmpruneError(f"{path} is not an llmprune compressed checkpoint (no {WEIGHTS_FILE})")
    saved = DTYPES[meta["dtype"]]
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(Path(path) / WEIGHTS_FILE), framework="pt") as f:
        keys = list(f.keys())
        for key in keys:
            if "::" not in key:
                state[key] = f.get_tensor(key)
        for name, entry in meta["layers"].items():
            parts = {k.rpartition("::")[2]: f.get_tensor(k) for k in keys if k.startswith(name + "::")}
            state[name] = decode_weight(parts, entry, saved)
    dtype_kwarg = {k: (saved if v in (None, "auto") else v) for k, v in dtype_kwarg.items()}
    config = AutoConfig.from_pretrained(path)
    # the Auto class wants a path; the state is ours
    model_class = per_block_class(config) or AutoModelForCausalLM._model_mapping[type(config)]
    return model_class.from_pretrained(None, config=config, state_dict=state,
                                       device_map=device_map, **dtype_kwarg)
