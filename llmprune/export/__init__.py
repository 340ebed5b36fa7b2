"""Checkpoint formats: one registry (``llmprune.registry.FORMATS``), each format owning its save and
its load, so the CLI, recipes and ``load_model`` ask the registry instead of choosing themselves.

dense               HF safetensors + config + tokenizer (``llmprune.io.save_pruned``); read by transformers
compressed          llmprune's bitmask + nonzero values (+ INT8 with scales): storage and transfer
                    (``export/compressed.py``); read back by :func:`load` into a dense model
compressed-tensors  int8 weight-only in the compressed-tensors layout vLLM / transformers read
                    (``export/compressed_tensors.py``); loaded by transformers itself
gguf                llama.cpp's LLaMA layout (``export/gguf.py``), a single file; read by transformers'
                    GGUF loader (dequantized)
shards              the offloaded model written one block per shard (``llmprune.offload`` registers it);
                    an ordinary sharded HF checkpoint, loaded as dense
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM

from llmprune.errors import LlmpruneError
from llmprune.export.compressed import compressed_metadata, load_compressed, write_compressed
from llmprune.export.compressed_tensors import write_compressed_tensors
from llmprune.export.gguf import export_gguf
from llmprune.io import save_pruned
from llmprune.nonuniform import folder_model_class
from llmprune.registry import FORMATS, FormatSpec


def _load_hf(source: str, device_map=None, hub_kwargs: dict | None = None, **dtype_kwarg):
    # blocks of different widths (llmprune.nonuniform): llmprune's own class, never the folder's code
    model_class = folder_model_class(source, hub_kwargs) or AutoModelForCausalLM
    return model_class.from_pretrained(source, device_map=device_map, low_cpu_mem_usage=True,
                                                **dtype_kwarg, **(hub_kwargs or {}))


def _load_compressed(source: str, device_map=None, hub_kwargs: dict | None = None, **dtype_kwarg):
    return load_compressed(source, device_map=device_map, **dtype_kwarg)


def _save_dense(model, tokenizer, path, record: dict, overwrite: bool, what: str = "--save", **_) -> str:
    return f"saved the pruned model to {save_pruned(model, tokenizer, path, record, overwrite, what=what)}"


def _encoded_saver(name: str, write):
    """A save for a format whose weights ``write(model, folder, quantize=, dtype=)`` encodes, inside
    the dense checkpoint's atomic folder (config and tokenizer as dense)."""

    def save(model, tokenizer, path, record: dict, overwrite: bool, what: str = "--save", quantize=None,
             dtype=None) -> str:
        counts: dict = {}

        def weights(m, folder):
            counts.update(write(m, folder, quantize=quantize, dtype=dtype))

        where = save_pruned(model, tokenizer, path, {**record, "checkpoint_format": name}, overwrite,
                            write_weights=weights, what=what)
        fp16 = counts.get("encoded_fp16_bytes")
        ratio = counts["encoded_bytes"] / fp16 if fp16 else float("nan")
        return (f"saved the {name} checkpoint to {where}: {counts['file_bytes']:,} bytes; the block Linear "
                f"weights take {counts['encoded_bytes']:,} bytes, {ratio:.3f}x their fp16 size")

    return save


def _save_gguf(model, tokenizer, path, record: dict, overwrite: bool, what: str = "OUT",
               gguf_type: str = "f16", source: str | None = None, **_) -> str:
    if not overwrite and Path(path).exists():
        raise LlmpruneError(f"{what} {path} exists: pass --overwrite to replace it")
    info = export_gguf(model, tokenizer, path, gguf_type=gguf_type, source_gguf=source)
    return f"wrote {path} ({gguf_type}): {info}"


FORMATS.add(FormatSpec("compressed",
                       "bitmask + nonzero values (+ int8 values and scales): storage and transfer",
                       save=_encoded_saver("compressed", write_compressed), load=_load_compressed,
                       detect=lambda path, hub_kwargs: (not hub_kwargs
                                                        and compressed_metadata(path) is not None)))
FORMATS.add(FormatSpec("compressed-tensors",
                       "int8 weight-only in the compressed-tensors layout (vLLM, transformers)",
                       save=_encoded_saver("compressed-tensors", write_compressed_tensors), load=_load_hf))
FORMATS.add(FormatSpec("gguf", "llama.cpp's LLaMA layout in one .gguf file", save=_save_gguf, load=_load_hf,
                       detect=lambda path, hub_kwargs: "gguf_file" in (hub_kwargs or {})))
FORMATS.add(FormatSpec("dense", "HF safetensors, config and tokenizer", save=_save_dense, load=_load_hf,
                       detect=lambda path, hub_kwargs: True))
# the order load() tries the detectors in: the specific formats first, dense as the fallback
DETECT_ORDER = ("compressed", "gguf", "dense")


def detect(source: str | Path, hub_kwargs: dict | None = None) -> FormatSpec:
    """The format of a resolved model source (``llmprune.models.check_model_source``'s result)."""
    for name in DETECT_ORDER:
        spec = FORMATS.get(name)
        if spec.detect(source, hub_kwargs):
            return spec
    return FORMATS.get("dense")


def save(model, tokenizer, path, record: dict, overwrite: bool = False,
         save_format: str = "dense", **options) -> str:
    """Write ``model`` to ``path`` in ``save_format``; returns the line to print."""
    return FORMATS.get(save_format).save(model, tokenizer, path, record, overwrite, **options)
