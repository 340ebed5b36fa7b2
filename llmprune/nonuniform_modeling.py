"""Per-block widths for a decoder model that llmprune shrank non-uniformly (``--width-allocation``).

transformers' decoder classes build every block from one ``intermediate_size`` and one head count;
the blocks of this model differ. This file needs only torch and transformers: llmprune copies it
into the checkpoint folder (as ``modeling_llmprune.py``, with one line that names the model class
it extends), and config.json's ``auto_map`` points ``AutoModelForCausalLM`` at that class, so

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

loads the checkpoint without llmprune. The class builds the model as its transformers base class
does, then replaces each block's attention and MLP Linears by ones of that block's widths, read
from the config: ``intermediate_sizes``, ``layer_heads`` and ``layer_kv_heads`` (one entry per
block) and ``llmprune_blocks`` (where the blocks and their Linears are). The attention forward
reads its head count from the tensors (``view(..., -1, head_dim)``), and heads // kv_heads is the
same in every block because whole KV groups were removed, so nothing else changes.
"""

from __future__ import annotations

from functools import lru_cache

import transformers
from torch import nn

LAYOUT_KEY = "llmprune_blocks"  # {"base": class name, "layers": path of the blocks, "linears": role -> name}
WIDTH_KEYS = ("intermediate_sizes", "layer_heads", "layer_kv_heads")


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def block_shapes(config, index: int, hidden: int) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each Linear role of block ``index``."""
    text = text_config(config)
    head_dim = text.head_dim
    inter = text.intermediate_sizes[index]
    q, kv = text.layer_heads[index] * head_dim, text.layer_kv_heads[index] * head_dim
    return {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}


def resize_blocks(model: nn.Module, config) -> None:
    """Give every block's Linears the widths the config lists for it (nothing without the lists)."""
    text = text_config(config)
    layout = getattr(text, LAYOUT_KEY, None)
    if not layout:
        return
    for index, block in enumerate(model.get_submodule(layout["layers"])):
        parents = {}
        for role, (out_features, in_features) in block_shapes(text, index, text.hidden_size).items():
            parent_name, _, attr = layout["linears"][role].rpartition(".")
            parent = block.get_submodule(parent_name)
            old = getattr(parent, attr)
            parents[role] = parent
            if (old.out_features, old.in_features) != (out_features, in_features):
                setattr(parent, attr, nn.Linear(in_features, out_features, bias=old.bias is not None,
                                                device=old.weight.device, dtype=old.weight.dtype))
        heads, kv_heads = text.layer_heads[index], text.layer_kv_heads[index]
        # classes that keep the counts as attributes (older transformers) read them in forward
        for attr, value in (("num_heads", heads), ("num_attention_heads", heads),
                            ("num_key_value_heads", kv_heads), ("num_kv_heads", kv_heads)):
            if isinstance(getattr(parents["o_proj"], attr, None), int):
                setattr(parents["o_proj"], attr, value)
        if isinstance(getattr(parents["down_proj"], "intermediate_size", None), int):
            parents["down_proj"].intermediate_size = text.intermediate_sizes[index]


@lru_cache(maxsize=None)
def causal_lm_class(base_name: str) -> type:
    """transformers' class ``base_name`` (a ``...ForCausalLM``) whose blocks take the per-block widths."""
    base = getattr(transformers, base_name)

    class PerBlockWidths(base):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            resize_blocks(self, config)

    PerBlockWidths.__name__ = PerBlockWidths.__qualname__ = f"Llmprune{base.__name__}"
    return PerBlockWidths
