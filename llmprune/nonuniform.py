"""Models whose decoder blocks have different widths (structured pruning with ``--width-allocation
global|owl``): their description in the model config, the checkpoint plain transformers loads, and
llmprune's own loading of it.

Why a modeling file in the checkpoint: transformers 5 (5.24 checked) has no config field that gives
a LLaMA-style model one MLP width and one head count per block: ``LlamaConfig`` has one
``intermediate_size`` and one ``num_attention_heads`` / ``num_key_value_heads`` (Gemma3n's
list-valued ``intermediate_size`` belongs to that family's own classes; per-layer configs such as
DeciLM's or OpenELM's are remote code too). So the saved config keeps the dense block's counts
(the shape every block was cut from), adds the per-block lists ``intermediate_sizes``,
``layer_heads`` and ``layer_kv_heads``, and its ``auto_map`` names a subclass of the model's own
transformers class, written into the folder from :mod:`llmprune.nonuniform_modeling`, that rebuilds
each block's Linears at that block's widths:

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

Without ``trust_remote_code`` transformers builds its uniform class and refuses the smaller tensors
(a size mismatch): it never loads wrong weights silently. :func:`llmprune.load_model` loads such a
folder with the same class from llmprune's own package, without running code from the folder.
A model with equal blocks saves exactly as before: no modeling file, no new config keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from torch import nn

from llmprune import nonuniform_modeling
from llmprune.errors import LlmpruneError
from llmprune.io import write_json_atomic, write_text_atomic
from llmprune.nonuniform_modeling import LAYOUT_KEY, WIDTH_KEYS, causal_lm_class, text_config

MODELING_FILE = "modeling_llmprune.py"


def transformers_base(cls: type) -> type:
    """The first class in ``cls``'s MRO that transformers exports by name (the saved checkpoint
    names it, so it must be importable as ``transformers.<name>``)."""
    for klass in cls.__mro__:
        exported = getattr(transformers, klass.__name__, None) is klass
        if exported and klass.__module__.startswith("transformers."):
            return klass
    raise LlmpruneError(f"model class {cls.__name__} is not one transformers exports, so a checkpoint with "
                        "per-block widths cannot name it: use --width-allocation uniform")


def block_layout(model: nn.Module, blocks: nn.ModuleList, linears: dict[str, str]) -> dict:
    """The config's ``llmprune_blocks`` entry: the transformers class the checkpoint's class extends,
    the path of the decoder blocks, each Linear role's name inside a block."""
    path = next(name for name, module in model.named_modules() if module is blocks)
    return {"base": transformers_base(type(model)).__name__, "layers": path, "linears": dict(linears)}


def describe_widths(config, layout: dict, intermediate: list[int], heads: list[int], kv_heads: list[int],
                    head_dim: int) -> None:
    """Write the per-block widths into ``config`` (in place); its single counts stay the dense ones."""
    text = text_config(config)
    text.head_dim = head_dim  # explicit: the dense count is what hidden_size // heads gave
    for key, values in zip(WIDTH_KEYS, (intermediate, heads, kv_heads)):
        setattr(text, key, [int(v) for v in values])
    setattr(text, LAYOUT_KEY, dict(layout))


def has_widths(config) -> bool:
    return bool(getattr(text_config(config), LAYOUT_KEY, None))


def layout_class(layout: dict) -> type:
    """The class that builds a model of these per-block widths (``layout``: the config's entry)."""
    base = layout.get("base")
    if not isinstance(getattr(transformers, str(base), None), type):
        raise LlmpruneError(f"the checkpoint's blocks extend {base!r}, which the installed transformers does "
                            "not have: upgrade transformers")
    return causal_lm_class(base)


def model_class(config) -> type | None:
    """:func:`layout_class` for ``config``; None for a config of equal blocks."""
    if config is None or not has_widths(config):
        return None
    return layout_class(getattr(text_config(config), LAYOUT_KEY))


def folder_model_class(source: str, hub_kwargs: dict | None = None) -> type | None:
    """:func:`model_class` for a local checkpoint folder, from its config.json alone (hub ids and
    GGUF files: None, they load as transformers loads them)."""
    path = Path(source) / "config.json"
    if (hub_kwargs or {}).get("gguf_file") or not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable: from_pretrained says what is wrong with it
    text = raw.get("text_config", raw) if isinstance(raw, dict) else None
    layout = text.get(LAYOUT_KEY) if isinstance(text, dict) else None
    return layout_class(layout) if isinstance(layout, dict) else None


def write_loader(model: nn.Module, folder: Path) -> None:
    """Make the checkpoint in ``folder`` (its config.json written) load with plain transformers:
    the modeling file and config.json's ``auto_map``. Nothing for a model with equal blocks."""
    config = getattr(model, "config", None)
    if config is None or not has_widths(config):
        return
    base = getattr(text_config(config), LAYOUT_KEY)["base"]
    name = f"Llmprune{base}"
    source = Path(nonuniform_modeling.__file__).read_text(encoding="utf-8")
    write_text_atomic(folder / MODELING_FILE,
                      f"{source}\n\n# this checkpoint's model class (written by llmprune)\n"
                      f"{name} = causal_lm_class({base!r})\n")
    path = folder / "config.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw["auto_map"] = {**(raw.get("auto_map") or {}),
                       "AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{name}"}
    write_json_atomic(path, raw)
