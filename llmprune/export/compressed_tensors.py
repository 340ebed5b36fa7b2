"""INT8 weight-only checkpoints in the compressed-tensors format (vLLM / llm-compressor's).

With the optional ``compressed-tensors`` package installed, ``--save-format compressed-tensors``
writes every block Linear as int8 values plus one scale per output channel (scheme: 8-bit int,
symmetric, per channel, format ``int-quantized``), the scales and values the same as llmprune's
own INT8 (quantize.py), and the ``quantization_config`` in config.json with which transformers
loads it back (its compressed-tensors quantizer). That format has no sparse storage any more
(its sparse formats were removed), so zeros cost a byte each: use ``--save-format compressed``
for sparse models.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

from torch import nn

from llmprune.errors import LlmpruneError
from llmprune.export.compressed import DTYPES, encoded_names
from llmprune.math.quantize import quantize_int8


def check_available() -> None:
    """``--save-format compressed-tensors`` needs the package: a user error otherwise."""
    if importlib.util.find_spec("compressed_tensors") is None:
        raise LlmpruneError("--save-format compressed-tensors needs the compressed-tensors package: "
                            "pip install 'llmprune[compressed-tensors]', or use --save-format compressed")


def write_compressed_tensors(model: nn.Module, folder: str | Path, quantize: str | None = "int8",
                             dtype: str | None = None) -> dict:
    """Write config (with its quantization_config) and int8 weights into ``folder``; the model in
    memory is left as it is (a copy is quantized). Returns the byte counts."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )


    if quantize != "int8":
        raise LlmpruneError("--save-format compressed-tensors writes int8 weights: add --quantize int8")
    check_available()
    names = {name.removesuffix(".weight") for name in encoded_names(model)}
    copy_ = copy.deepcopy(model)
    if dtype is not None:
        copy_.to(DTYPES[dtype])
    others = [name for name, m in copy_.named_modules() if isinstance(m, nn.Linear) and name not in names]
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args,
                                                                             format="int-quantized")},
                                ignore=others, format="int-quantized")
    apply_quantization_config(copy_, config)
    encoded = fp16 = 0
    for name, module in copy_.named_modules():
        if name in names:
            q, scale = quantize_int8(module.weight)  # llmprune's own rounding, so both formats agree
            module.weight_scale.data = scale[:, None].to(module.weight_scale.dtype)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.zero_()
            encoded += q.numel() + module.weight_scale.numel() * module.weight_scale.element_size()
            fp16 += q.numel() * 2
    compressor = ModelCompressor.from_pretrained_model(copy_, quantization_format="int-quantized")
    compressor.compress_model(copy_)
    copy_.save_pretrained(folder)
    compressor.update_config(str(folder))
    size = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    return {"encoded_bytes": encoded, "encoded_fp16_bytes": fp16, "file_bytes": size, "layers": len(names)}
