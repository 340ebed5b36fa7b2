"""The checks before the weights load: what the inputs alone decide, then what the model's config
file decides. ``llmprune prune``, ``eval`` and ``recover`` and the Python :func:`llmprune.prune_model`
call these same functions, so the command line and the library refuse the same inputs, in the same
words, before any slow work.

1. :func:`check_inputs` needs no model at all: data files (or the hub), zero-shot tasks, output
   paths, dtype and device. It fails in a second instead of after a model load.
2. :func:`check_shapes_early` builds the model from its config alone, on fake tensors (a 70B
   model costs nothing), in a separate Python process: sequence lengths, the layers a config
   selects, N:M divisibility, structured plans, calibration and evaluation memory.

Messages name the command-line flags (``--json``, ``--save``, ``--eval``); the Python arguments of
:func:`llmprune.prune_model` carry the same names without the dashes.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmprune.errors import LlmpruneError
from llmprune.evaluation import check_eval_memory
from llmprune.io import check_apart, check_input_file, check_output_file, check_save_dir

if TYPE_CHECKING:  # annotations only: this module loads without torch
    from llmprune.config import EvalConfig, ExportConfig, PruneConfig

def check_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The data dir to read datasets from: ``data_dir``, else ``$LLMPRUNE_DATA_DIR``, else None
    (the hub). One that is named but missing is a user error."""
    from llmprune.data import resolve_data_dir

    path = resolve_data_dir(data_dir)
    if path is not None and not path.is_dir():
        raise LlmpruneError(f"data dir {path} does not exist: pass --data-dir with the folder holding the "
                            "datasets")
    return path


def model_path(name: str | os.PathLike) -> Path | None:
    """The local file or folder a model reference reads (None for a hub id)."""
    from llmprune.models import check_model_source

    source, kwargs = check_model_source(str(name))
    if "gguf_file" in kwargs:
        return Path(source) / kwargs["gguf_file"]
    return Path(source) if Path(source).exists() else None


def check_export(export: ExportConfig, quantize: str | None) -> None:
    """A checkpoint format that needs a package or a quantization the run does not have."""
    if export.save_format == "compressed-tensors":
        from llmprune.export.compressed_tensors import check_available

        check_available()
        if quantize != "int8":
            raise LlmpruneError("--save-format compressed-tensors writes int8 weights: add --quantize int8")


def check_gguf_export(model: str | os.PathLike, gguf_type: str) -> None:
    """What ``llmprune export`` refuses before the weights load: a GGUF type whose writer is not
    installed (q4_k needs llama-cpp-python), a family the LLaMA layout does not describe, and an
    o_proj or down_proj width in the config that the type's quantization blocks cannot hold
    (the modules are checked again before writing: per-block widths the config cannot tell)."""
    from llmprune.export.gguf import check_exportable, check_gguf_type, check_widths, config_widths
    from llmprune.models import model_config

    check_gguf_type(gguf_type)
    config = model_config(str(model))
    check_exportable(config)
    check_widths(config_widths(config), gguf_type)


def check_inputs(eval_config: EvalConfig, data_dir: str | os.PathLike | None = None, *,
                 model: str | os.PathLike | None = None, dtype: Any = "float32", device: Any = None,
                 device_map: Any = None, json_path: str | os.PathLike | None = None,
                 save: str | os.PathLike | None = None, overwrite: bool = False, calib: str | None = None,
                 data_flag: str = "--eval", paths: tuple = (), calib_seqlen: int | None = None) -> None:
    """Everything that needs no model: the data (local files, or the hub's cache), zero-shot tasks,
    output paths (``json_path``, the checkpoint folder ``save``), the dtype and the device. Runs
    before the (slow) model load, so a bad input fails in a second.

    ``model``: the model reference (None for a model already in memory), an input no output may
    collide with. ``calib``: the calibration dataset, when the run calibrates (``calib_seqlen``:
    its window, which the generation prompts' check needs). ``data_flag`` names
    the evaluation datasets in messages. ``paths``: more outputs and inputs, ``(flag, path, role)``
    as :func:`llmprune.io.check_apart` takes them.
    """
    from llmprune.data import check_available
    from llmprune.models import check_device, resolve_dtype

    source = model_path(model) if model is not None else None
    resolve_dtype(dtype)
    if not device_map:
        check_device(device)
    data = [(data_flag, name) for name in eval_config.datasets]
    data += [("--calib", calib)] if calib is not None else []
    for flag, name in data:
        check_input_file(name, flag)
    check_apart([("--json", json_path, "file"), ("--save", save, "folder"), *paths,
                 ("--model", source, "input")]
                + [(flag, name, "input") for flag, name in data if Path(name).expanduser().is_file()])
    if json_path:
        check_output_file(json_path, "--json")
    if save:
        check_save_dir(save, overwrite)
    for name in eval_config.datasets:
        check_available(name, data_dir, split="eval")
    if calib is not None:
        check_available(calib, data_dir, split="calibration")
    if eval_config.zeroshot:
        from llmprune.evaluation.zeroshot import build_tasks

        build_tasks(eval_config.zeroshot, data_dir)  # names, files and rows
    if eval_config.generate:
        from llmprune.evaluation.generation import check_prompt_source

        check_prompt_source(data_dir, calib=calib, calib_seqlen=calib_seqlen)


def check_shapes_early(model: str | os.PathLike, eval_config: EvalConfig, config: PruneConfig | None = None,
                       *, dtype: Any = "float32", device: Any = None, device_map: Any = None,
                       seqlens: tuple[int | None, ...] = ()) -> None:
    """What the model's config file decides, before its weights load (minutes for a large model
    on a busy machine): sequence lengths against the maximum positions, then the preflight
    :func:`llmprune.plan` (the layers include and exclude select, N:M divisibility, a structured
    plan, the calibration memory) and the evaluation memory.

    On a model of fake tensors built from the config, in a fresh Python process: torch's
    fake-tensor mode has corrupted its process's memory after use (a segmentation fault in a later
    tokenizer call), so it never runs in the caller's. A fresh interpreter, not a multiprocessing
    child, so that a user's script without an ``if __name__ == "__main__"`` guard is not run again
    in it. Where the child cannot build or probe the model (or dies), the same checks run right
    after the load (:func:`llmprune.plan` runs first there).
    """
    if not worth_checking_early(model):
        return
    payload = pickle.dumps((str(model), eval_config, config, dtype, device, bool(device_map), tuple(seqlens)))
    package_root = str(Path(__file__).resolve().parents[1])  # this llmprune, wherever the caller found it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH"))
                                                        if p)}
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD], input=payload, capture_output=True, env=env,
                              check=False)
    except OSError:  # no interpreter to start: the checks run after the load
        return
    refusal = _verdict(done)
    if refusal is not None:
        raise LlmpruneError(refusal)


_CHILD = "import llmprune.preflight as p; p.shape_checks_child()"
EARLY_CHECK_ENV = "LLMPRUNE_EARLY_CHECK_BYTES"
EARLY_CHECK_BYTES = 256 * 2**20


def worth_checking_early(model: str | os.PathLike) -> bool:
    """Whether the early shape check pays: it costs a fresh interpreter (5 to 10 s of imports on a
    busy CPU), while a local model smaller than ``$LLMPRUNE_EARLY_CHECK_BYTES`` (default 256 MiB,
    the bundled SmolLM2 included) loads in less, and the same checks run right after its load.
    A hub id (download and load) and larger local models are always checked first."""
    text = os.environ.get(EARLY_CHECK_ENV, "").strip()
    limit = int(text) if text.isdigit() else EARLY_CHECK_BYTES
    try:
        path = model_path(model)
    except LlmpruneError:
        return True  # the load reports it
    if path is None:
        return True
    try:
        size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*")
                                                              if f.is_file())
    except OSError:
        return True
    return size >= limit


def _verdict(done: subprocess.CompletedProcess) -> str | None:
    """The refusal the child printed as its last line (JSON), or None when it passed or failed."""
    if done.returncode != 0:
        return None
    lines = done.stdout.decode("utf-8", errors="replace").strip().splitlines()
    try:
        verdict = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    return verdict.get("refusal") if isinstance(verdict, dict) else None


def shape_checks_child() -> None:
    """In the fresh process of :func:`check_shapes_early`: read the pickled arguments on stdin,
    print ``{"refusal": message or null}`` as the last line of stdout."""
    model, eval_config, config, dtype, device, device_map, seqlens = pickle.loads(sys.stdin.buffer.read())
    try:
        check_shapes_here(model, eval_config, config, dtype=dtype, device=device, device_map=device_map,
                          seqlens=seqlens)
        refusal = None
    except LlmpruneError as exc:
        refusal = str(exc)
    sys.stdout.write("\n" + json.dumps({"refusal": refusal}) + "\n")
    sys.stdout.flush()


def check_shapes_here(model: str, eval_config: EvalConfig, config: PruneConfig | None = None, *,
                      dtype: Any = "float32", device: Any = None, device_map: bool = False,
                      seqlens: tuple[int | None, ...] = ()) -> None:
    """The checks of :func:`check_shapes_early` themselves, on the fake-tensor model (run them only
    in a process of their own)."""
    from llmprune.models import check_device, resolve_seqlen, shape_model

    if config is not None:
        try:
            config.components()
        except LlmpruneError:  # a method registered in the caller's process only (not an entry point)
            config = None
    with shape_model(model, dtype) as fake:
        if fake is None:
            return
        for seqlen in seqlens:
            resolve_seqlen(fake, seqlen)
        fake.seqlen = resolve_seqlen(fake, eval_config.seqlen)  # as load_model sets it
        # with a device map the blocks are spread: no memory to compare with ("meta" has none)
        target = "meta" if device_map else check_device(device)
        try:
            if config is not None:
                from llmprune.engine import plan

                plan(fake, config, target)
            if str(target) == "cpu":  # the fake model's logits are counted where it lives, on the CPU
                check_eval_memory(fake, eval_config)
        except LlmpruneError:
            raise
        except Exception:  # noqa: BLE001 - a check fake tensors cannot run: it runs after the load
            return
