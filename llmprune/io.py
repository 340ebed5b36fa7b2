"""Files: atomic JSON results, versions, and saving a pruned checkpoint.

Everything is written to a temporary name in the destination's folder and renamed into place,
so an interrupted run leaves either the old file (or nothing) or the complete new one.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

from llmprune.errors import LlmpruneError

RESULT_SCHEMA = "llmprune.result/1"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=_jsonable)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    try:
        import torch

        if isinstance(obj, torch.Tensor):
            return obj.tolist()
        if isinstance(obj, torch.dtype):
            return str(obj)
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers."""
    from importlib import metadata

    out = {}
    for package in ("llmprune", "torch", "transformers", "lm_eval", "datasets"):
        try:
            out[package] = metadata.version(package.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def machine() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def result_record(
    *,
    name: str,
    model: str,
    config=None,
    eval_config=None,
    perplexity: dict | None = None,
    zeroshot: dict | None = None,
    prune_report=None,
    recipe: str | None = None,
    dense: dict | None = None,
) -> dict:
    """One run's result in the shared schema (``llmprune.result/1``), ready for JSON.

    ``config`` is None for the dense model. ``group``/``metric`` are the effective ones (the
    method's defaults filled in), so tables never have to know the defaults.
    """
    from llmprune.config import to_dict

    if config is None:
        method, sparsity, pattern, group, metric, nsamples, seed = "dense", 0.0, "unstructured", None, None, None, None
        config_dict = None
    else:
        from llmprune.methods import get_method, needs_for

        spec = get_method(config.method)
        method, sparsity, pattern = config.method, config.sparsity, str(config.pattern)
        group = config.group or spec.default_group
        metric = config.metric or spec.default_metric
        if config.pattern.structured:
            group = None  # N:M groups are fixed by the pattern
        uses_data = bool(needs_for(config))
        nsamples = config.calib.nsamples if uses_data else None
        seed = config.calib.seed if uses_data else None
        config_dict = config.to_dict()
    report = prune_report.to_dict() if hasattr(prune_report, "to_dict") else prune_report
    record = {
        "schema": RESULT_SCHEMA,
        "name": name,
        "model": model,
        "method": method,
        "sparsity": float(sparsity),
        "pattern": pattern,
        "group": group,
        "metric": metric,
        "nsamples": nsamples,
        "seed": seed,
        "config": config_dict,
        "eval": to_dict(eval_config) if eval_config is not None else None,
        "perplexity": {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in (perplexity or {}).items()},
        "zeroshot": zeroshot.to_dict() if hasattr(zeroshot, "to_dict") else zeroshot,
        "prune": report,
        "prune_seconds": report["seconds"] if report else None,
        "versions": versions(),
        "machine": machine(),
        "recipe": recipe,
    }
    if dense is not None:
        record["dense"] = dense
    return record


def check_save_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse, before any work is done, to save into an existing non-empty directory."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise LlmpruneError(f"{path} already exists and is not empty: choose a new directory or pass --overwrite")
    return path


def save_pruned(model, tokenizer, path: str | os.PathLike, metadata: dict, overwrite: bool = False) -> Path:
    """Save an HF checkpoint (safetensors, config, tokenizer) plus ``llmprune.json``.

    Written into a temporary sibling directory and renamed into place at the end.
    """
    path = check_save_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    config = model.config
    # a GGUF-loaded model carries quantization_config {quant_method: gguf}; the weights we
    # save are plain dequantized tensors, so the saved config must not claim otherwise
    quant = getattr(config, "quantization_config", None)
    is_gguf = isinstance(quant, dict) and quant.get("quant_method") == "gguf" or \
        getattr(quant, "quant_method", None) == "gguf"
    hf_quantizer = getattr(model, "hf_quantizer", None)
    try:
        if is_gguf:
            del config.quantization_config
            if hf_quantizer is not None:
                model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "llmprune.json", metadata)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if is_gguf:
            config.quantization_config = quant
            if hf_quantizer is not None:
                model.hf_quantizer = hf_quantizer
    return path
