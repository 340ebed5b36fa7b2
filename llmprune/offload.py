"""Out-of-core pruning: the decoder blocks wait off the compute device, one block comes in at a time.

Pruning goes block by block (pipeline.py), so only the block being calibrated, pruned and
propagated needs its weights on the compute device. A :class:`BlockStore` keeps the others:

* ``cpu``: in CPU memory. Materialising a block moves it to the compute device (a GPU);
  releasing it moves it back. Peak accelerator memory: one block and the activations (with
  ``activations="cpu"``, one batch of them).
* ``disk``: in safetensors files. A block's parameters are meta tensors (shape and dtype, no
  storage) except while it is materialised: they are read by name with ``safe_open`` (memory
  mapped) from the model's own checkpoint or, once the block is pruned, from its file in a
  private folder inside ``offload_dir``, written when the block is released. Peak RAM: one
  block, the calibration activations, and the parts outside the blocks (embeddings, final norm,
  lm_head), which stay in memory.

:func:`load_for_offload` builds such a model without ever holding all its blocks: the skeleton
is made with empty (meta) parameters and only the parts outside the blocks are read. That needs
a local safetensors checkpoint whose tensor names are the model's; any other source (a GGUF
file, a hub id, ``.bin`` weights, names transformers converts on load) is loaded in full once
and its blocks are then written out, so its peak RAM is the whole model, once, at load.

:func:`save_offloaded` writes the pruned checkpoint one block per shard from those files, so the
state dict as a whole never exists; the tensors and their names are the ones ``save_pretrained``
writes for the same model in memory, and plain ``AutoModelForCausalLM.from_pretrained`` loads it.

Every move is counted (``loads``, ``writes``, ``peak_live``, ``events``), which is how the tests
show that at most one block is materialised at a time.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch import nn

from llmprune.blocks import block_device, first_param_device
from llmprune.config import PruneConfig
from llmprune.errors import LlmpruneError
from llmprune.export.compressed import compressed_metadata
from llmprune.io import (
    atomic_target,
    check_output_dir,
    io_errors,
    process_alive,
    save_pruned,
    write_json_atomic,
)
from llmprune.models import (
    check_device,
    check_model_source,
    get_blocks,
    layout,
    load_error,
    load_model,
    resolve_dtype,
    resolve_seqlen,
    source_name,
)
from llmprune.registry import FORMATS, FormatSpec

OFFLOAD_TAG = ".llmprune-offload-"  # the private folder's prefix inside --offload-dir
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


# ---------------------------------------------------------------- checks before the model loads

def check_offload_dir(path: str | os.PathLike) -> Path:
    """An existing writable folder, or one that can be made; never a symlink (we write only
    through real paths, as ``--save`` does)."""
    return check_output_dir(path, "--offload-dir", "--offload disk keeps the blocks there, as large as the "
                            "model's weights", refuse_links=True)


def check_offload(config: PruneConfig, device_map=None, save_format: str = "dense") -> None:
    """What offloading cannot be combined with, and the offload folder; before the model loads."""
    if config.offload is None:
        return
    if device_map:
        raise LlmpruneError(f"--offload {config.offload} places the blocks itself: drop --device-map (an "
                            "accelerate device map) or --offload")
    if config.offload == "disk":
        if save_format != "dense":
            raise LlmpruneError("--offload disk saves dense safetensors one block at a time; --save-format "
                                f"{save_format} needs the whole model in memory: save dense, then run "
                                "`llmprune compress` where the model fits")
        check_offload_dir(config.offload_dir)


# ---------------------------------------------------------------- helpers

def _path_of(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def _own_tensors(block: nn.Module):
    """``(module, attribute, name inside the block)`` of every parameter of ``block``."""
    for prefix, module in block.named_modules():
        for attr, param in module._parameters.items():
            if param is not None:
                yield module, attr, f"{prefix}.{attr}" if prefix else attr


def _to_meta(block: nn.Module) -> None:
    """Drop the block's parameter storage (shape, dtype and requires_grad stay); buffers (rotary
    tables, small) stay real, in CPU memory."""
    for module, attr, _ in list(_own_tensors(block)):
        param = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(torch.empty_like(param, device="meta"),
                                                requires_grad=param.requires_grad)
    for module in block.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device.type != "cpu":
                module._buffers[name] = buf.to("cpu")


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> int:
    """Write ``tensors`` to ``path`` atomically; the bytes of tensor data written."""
    from safetensors.torch import save_file

    with atomic_target(path) as tmp, io_errors():  # a full disk is an OSError, not a SafetensorError
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _checkpoint_tensors(folder: Path) -> dict[str, Path] | None:
    """``{tensor name: file}`` of a local safetensors checkpoint (sharded or not), else None."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return {str(k): folder / str(v) for k, v in weight_map.items()}
    single = folder / SAFETENSORS_SINGLE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    return None


def _private_prefix() -> str:
    # the host is in the name: on scratch space shared by a cluster's nodes, a process id means
    # something only on the machine that made the folder
    return f"{OFFLOAD_TAG}{socket.gethostname()}+"


def _remove_stale(folder: Path) -> None:
    """Private folders made on this machine by a process that is gone (a killed run) are deleted."""
    prefix = _private_prefix()
    for stale in folder.glob(f"{glob.escape(prefix)}*"):
        pid = stale.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)) and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------- placements

class Resident:
    """No offloading: every block stays where it lives; with a ``compute`` device, a block is
    moved there for its turn and back afterwards (the in-memory pipeline's placement)."""

    mode = None

    def __init__(self, blocks: nn.ModuleList, compute: torch.device | None = None):
        self.blocks = blocks
        self.compute = compute

    def reset_counters(self) -> None:  # nothing moves between stores: nothing to count
        pass

    @contextlib.contextmanager
    def use(self, index: int, write: bool = True):
        block = self.blocks[index]
        home = block_device(block)
        moved = self.compute is not None and home != self.compute and home.type != "meta"
        if moved:
            block.to(self.compute)
        try:
            yield block
        finally:
            if moved:
                block.to(home)

    def summary(self) -> dict | None:
        return None


class BlockStore:
    """Where the decoder blocks wait between their turns on the compute device (see the module
    docstring): ``materialise(i)`` brings block ``i`` in, ``release(i)`` writes it back (disk:
    to its file; cpu: to CPU memory) and lets it go; :meth:`use` is both around a body.

    Made by :meth:`spill` (a model in memory) or :func:`load_for_offload` (a model whose blocks
    were never read). ``compute``: where a materialised block computes.
    """

    def __init__(self, model: nn.Module, mode: str, compute: torch.device,
                 folder: str | os.PathLike | None = None):
        if mode not in ("cpu", "disk"):
            raise ValueError(f"unknown offload mode {mode!r}")
        self.model, self.mode, self.compute = model, mode, torch.device(compute)
        self.blocks = get_blocks(model)
        self.path = _path_of(model, self.blocks)  # e.g. "model.layers"
        self.home = torch.device("cpu")
        self.source = "memory"
        # disk: per block, {name inside the block: (file, tensor name)} where its values are now
        self.files: list[dict[str, tuple[Path, str]]] = [{} for _ in self.blocks]
        self.folder: Path | None = None
        self.origin: list[torch.device] | None = None  # where each block lived before spill()
        self._index = {id(b): i for i, b in enumerate(self.blocks)}
        self._cleanup = None
        if mode == "disk":
            if folder is None:
                raise LlmpruneError("--offload disk keeps the blocks in files: give --offload-dir DIR, a "
                                    "writable folder with room for the model's weights")
            parent = check_offload_dir(folder)
            parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(parent)
            self.folder = Path(tempfile.mkdtemp(prefix=f"{_private_prefix()}{os.getpid()}.", dir=parent))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        self.live: set[int] = set()
        self.reset_counters()

    # ------------------------------------------------------------ counters

    def reset_counters(self) -> None:
        self.loads = self.writes = self.bytes_read = self.bytes_written = 0
        self.peak_live = len(self.live)
        self.seconds = 0.0
        self.events: list[tuple[str, int]] = []

    def summary(self) -> dict:
        """What the store did since the counters were reset (JSON-ready, for the prune report)."""
        return {"mode": self.mode, "compute": str(self.compute), "source": self.source, "loads": self.loads,
                "writes": self.writes, "peak_blocks": self.peak_live, "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written, "seconds": round(self.seconds, 3)}

    def block_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for b in self.blocks for p in b.parameters())

    # ------------------------------------------------------------ moves

    def materialise(self, index: int, device: torch.device | None = None) -> nn.Module:
        """Block ``index`` with its weights on ``device`` (default: the compute device)."""
        if index in self.live:
            raise RuntimeError(f"block {index} is already materialised")
        start = time.perf_counter()
        block = self.blocks[index]
        if self.mode == "disk":
            self._read_into(index, block)
        block.to(device or self.compute)
        self.live.add(index)
        self.loads += 1
        self.peak_live = max(self.peak_live, len(self.live))
        self.events.append(("load", index))
        self.seconds += time.perf_counter() - start
        return block

    def release(self, index: int, write: bool = True) -> None:
        """Block ``index`` back to its store; ``write``: its weights changed, keep the new ones."""
        if index not in self.live:
            raise RuntimeError(f"block {index} is not materialised")
        start = time.perf_counter()
        block = self.blocks[index]
        if self.mode == "cpu":
            block.to(self.home)
        else:
            if write:
                self._write(index, block)
            _to_meta(block)
        self.writes += int(write)
        self.live.discard(index)
        self.events.append(("release", index))
        self.seconds += time.perf_counter() - start

    @contextlib.contextmanager
    def use(self, index: int, write: bool = True):
        """Block ``index`` materialised for the body; written back unless the body raised."""
        block = self.materialise(index)
        ok = False
        try:
            yield block
            ok = True
        finally:
            self.release(index, write=write and ok)

    def _read_into(self, index: int, block: nn.Module) -> None:
        from safetensors import safe_open

        where = self.files[index]
        by_file: dict[Path, list] = {}
        for module, attr, name in _own_tensors(block):
            if name not in where:
                raise RuntimeError(f"no stored values for {self.path}.{index}.{name}")
            file, key = where[name]
            by_file.setdefault(file, []).append((module, attr, key))
        for file, items in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for module, attr, key in items:
                    old = module._parameters[attr]
                    tensor = f.get_tensor(key)
                    # a checkpoint stored in another dtype: cast as from_pretrained does
                    if tensor.dtype != old.dtype:
                        tensor = tensor.to(old.dtype)
                    if tuple(tensor.shape) != tuple(old.shape):
                        raise RuntimeError(f"{key} in {file} has shape {tuple(tensor.shape)}, the model "
                                           f"{tuple(old.shape)}")
                    module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
                    self.bytes_read += tensor.numel() * tensor.element_size()

    def _write(self, index: int, block: nn.Module) -> None:
        prefix = f"{self.path}.{index}."
        tensors = {prefix + k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
        file = self.folder / f"block-{index:05d}.safetensors"
        self.bytes_written += _save_safetensors(tensors, file)
        self.files[index] = {k[len(prefix):]: (file, k) for k in tensors}

    # ------------------------------------------------------------ whole-model phases

    @contextlib.contextmanager
    def streaming(self, device: torch.device | None = None):
        """Every block materialised by a hook just before its forward and released (unchanged)
        right after it: a whole-model forward in one block's memory (the discovery probe)."""
        handles = []

        def before(module, _args):
            i = self._index[id(module)]
            if i not in self.live:
                self.materialise(i, device)

        def after(module, _args, _out):
            i = self._index[id(module)]
            if i in self.live:
                self.release(i, write=False)

        try:
            for block in self.blocks:
                handles.append(block.register_forward_pre_hook(before))
                handles.append(block.register_forward_hook(after))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for i in sorted(self.live):  # a forward stopped inside a block (the probe's last one)
                self.release(i, write=False)

    def _outside(self) -> list[nn.Module]:
        inside = {id(m) for b in self.blocks for m in b.modules()}
        return [m for m in self.model.modules() if id(m) not in inside]

    def _move_outside(self, device: torch.device) -> None:
        for module in self._outside():
            for param in module._parameters.values():
                if param is not None and param.device != device:
                    param.data = param.data.to(device)
            for name, buf in module._buffers.items():
                if buf is not None and buf.device != device:
                    module._buffers[name] = buf.to(device)

    @contextlib.contextmanager
    def whole(self, device: torch.device | None = None):
        """The whole model on ``device`` (default: the compute device) for the body, e.g. an
        evaluation, then every block back in the store, unchanged. It must fit."""
        target = device or self.compute
        outside = first_param_device(self.model.get_input_embeddings())
        try:
            for i in range(len(self.blocks)):
                self.materialise(i, target)
            self._move_outside(target)
            yield self.model
        finally:
            for i in sorted(self.live):
                self.release(i, write=False)
            self._move_outside(outside)

    def read_block(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s state dict on the CPU under the model's names (one block in memory)."""
        if self.mode == "cpu" or index in self.live:
            prefix = f"{self.path}.{index}."
            return {prefix + k: v.detach().to("cpu") for k, v in self.blocks[index].state_dict().items()}
        block = self.materialise(index, self.home)
        try:
            prefix = f"{self.path}.{index}."
            return {prefix + k: v.detach() for k, v in block.state_dict().items()}
        finally:
            self.release(index, write=False)

    def restore(self, devices: list[torch.device] | None = None) -> None:
        """Put every block back in memory (on ``devices``, per block; default the CPU) for good:
        the end of a store that :meth:`spill` made for one call."""
        for i, block in enumerate(self.blocks):
            device = devices[i] if devices else self.home
            if self.mode == "disk":
                self._read_into(i, block)
            block.to(device)

    def close(self) -> None:
        """Delete the private folder (the pruned blocks in it; a saved checkpoint has its own files).
        Blocks still waiting on disk are gone with it: save or :meth:`restore` first."""
        if self._cleanup is not None:
            self._cleanup()

    # ------------------------------------------------------------ constructors

    @classmethod
    def spill(cls, model: nn.Module, mode: str, compute: torch.device | None = None,
              folder: str | os.PathLike | None = None) -> "BlockStore":
        """A store for a model in memory: cpu moves its blocks to the CPU, disk writes each block
        to the offload folder and frees it. ``compute`` defaults to where block 0 lived."""
        layout(model)  # discovery needs a forward through real blocks: before they leave
        origin = block_device(get_blocks(model)[0])
        store = cls(model, mode, compute if compute is not None else origin, folder)
        store.origin = [block_device(b) for b in store.blocks]
        if mode == "disk":
            store.check_room()
            store.source = "spilled from memory"
        for i, block in enumerate(store.blocks):
            if mode == "disk":
                store._write(i, block)
                _to_meta(block)
            else:
                block.to(store.home)
        store.reset_counters()
        return store

    def check_room(self) -> None:
        """The offload folder's file system must hold every block once more."""
        need, free = self.block_bytes(), shutil.disk_usage(self.folder).free
        if need > free:
            raise LlmpruneError(f"--offload-dir {self.folder.parent} has {free / 2**30:.1f} GiB free, but "
                                f"the blocks need {need / 2**30:.1f} GiB: give a folder on a larger disk")


@contextlib.contextmanager
def placement(model: nn.Module, config: PruneConfig, compute: torch.device | None,
              store: BlockStore | None = None):
    """Where the blocks of one ``prune`` call wait: the caller's ``store`` (left as it is at the
    end), a store made for this call when ``config.offload`` is set (the blocks are put back
    where they were at the end, so the caller gets the model as in-memory pruning leaves it),
    or none (:class:`Resident`)."""
    if store is not None:
        yield store
        return
    if config.offload is None:
        yield Resident(get_blocks(model), compute)
        return
    store = BlockStore.spill(model, config.offload, compute, config.offload_dir)
    try:
        yield store
    finally:
        store.restore(store.origin)
        store.close()


# ---------------------------------------------------------------- loading without the blocks

def load_for_offload(name_or_path: str, mode: str, dtype="auto", device=None,
                     folder=None, seqlen: int | None = None):
    """``(model, tokenizer, store)`` with the blocks in a :class:`BlockStore`.

    cpu: the model loads into CPU memory as usual; blocks compute on ``device``. disk: from a
    local safetensors checkpoint with the model's own tensor names, only the parts outside the
    blocks are read (the blocks are read one at a time later); any other source loads in full
    once, then its blocks are written to ``folder`` and freed.
    """
    compute = check_device(device)
    if mode == "cpu":
        model, tokenizer = load_model(name_or_path, dtype=dtype, device="cpu", seqlen=seqlen)
        return model, tokenizer, BlockStore.spill(model, "cpu", compute)
    source, kwargs = check_model_source(name_or_path)
    built = None
    if not kwargs and Path(source).is_dir():
        built = _skeleton(Path(source), dtype, compute, folder)
    if built is None:  # GGUF, hub id, .bin, renamed tensors: load in full once
        model, tokenizer = load_model(name_or_path, dtype=dtype, device="cpu", seqlen=seqlen)
        return model, tokenizer, BlockStore.spill(model, "disk", compute, folder)
    model, tokenizer, store = built
    get_blocks(model)
    model.seqlen = resolve_seqlen(model, seqlen)
    model.llmprune_source = source_name(name_or_path)  # as load_model remembers it
    with store.streaming(torch.device("cpu")):  # discovery's probe forward, one block in memory at a time
        layout(model)
    store.reset_counters()
    return model, tokenizer, store


def _skeleton(source: Path, dtype, compute: torch.device, folder):
    """The model with meta parameters, its non-block weights read from ``source``; None when the
    checkpoint's tensors are not the model's by name and shape (then it is loaded in full)."""
    if compressed_metadata(str(source)) is not None:
        return None
    files = _checkpoint_tensors(source)
    if not files:
        return None
    shapes = _checkpoint_shapes(files)
    model, tokenizer = _empty_model(source, dtype, shapes)
    params = dict(model.named_parameters())  # tied weights once
    for name, param in params.items():
        if name not in shapes or shapes[name][0] != tuple(param.shape):
            return None  # transformers renames or converts this checkpoint on load
    store = BlockStore(model, "disk", compute, folder)
    store.source = f"checkpoint {source}"
    store.check_room()
    _read_outside_blocks(model, params, files, store)
    model.eval()
    return model, tokenizer, store


def _checkpoint_shapes(files: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, safetensors dtype)}`` of every tensor of the checkpoint, from the file headers."""
    from safetensors import safe_open

    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in set(files.values()):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                shapes[key] = (tuple(piece.get_shape()), piece.get_dtype())
    return shapes


def _empty_model(source: Path, dtype, shapes: dict):
    """``(model, tokenizer)`` of the checkpoint folder ``source``, the model's parameters on meta."""
    import transformers
    from accelerate import init_empty_weights
    from packaging.version import Version
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(source)
        torch_dtype = resolve_dtype(dtype)
        if torch_dtype == "auto":
            torch_dtype = _checkpoint_dtype(config, shapes)
        dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
            model = AutoModelForCausalLM.from_config(config, **{dtype_key: torch_dtype})
        model.tie_weights()  # as from_pretrained does: a tied lm_head is the embeddings' parameter
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - as load_model: this model cannot be read
        raise load_error(str(source), exc) from None
    if (source / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(source)
    model.config._name_or_path = str(source)
    return model, tokenizer


def _read_outside_blocks(model: nn.Module, params: dict, files: dict, store: BlockStore) -> None:
    """Read the parameters and persistent buffers outside the decoder blocks from the checkpoint's
    ``files``; a block's tensors are only noted in ``store.files``, to be read in its turn."""
    from safetensors import safe_open

    blocks = get_blocks(model)
    prefix = store.path + "."
    aliases: dict[int, list[tuple[nn.Module, str]]] = {}  # one tensor under several names (tied lm_head)
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                aliases.setdefault(id(param), []).append((module, attr))
    outside: list[tuple[str, torch.Tensor]] = []
    for name, param in params.items():
        index, _, inner = name[len(prefix):].partition(".") if name.startswith(prefix) else ("", "", "")
        if index.isdigit() and int(index) < len(blocks) and inner:  # a block's: read in its turn
            store.files[int(index)][inner] = (files[name], name)
        else:
            outside.append((name, param))
    for name, param in outside:
        with safe_open(str(files[name]), framework="pt", device="cpu") as f:
            tensor = f.get_tensor(name).to(param.dtype)
        new = nn.Parameter(tensor, requires_grad=param.requires_grad)
        for module, attr in aliases[id(param)]:
            module._parameters[attr] = new
    persistent = set(model.state_dict()) - set(dict(model.named_parameters(remove_duplicate=False)))
    for name in persistent & set(files):  # a buffer the checkpoint holds (most hold none)
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        with safe_open(str(files[name]), framework="pt", device="cpu") as f:
            module._buffers[attr] = f.get_tensor(name).to(module._buffers[attr].dtype)


def _checkpoint_dtype(config, shapes: dict) -> torch.dtype:
    """``dtype="auto"``: the config's dtype, else the checkpoint's first floating dtype, as
    from_pretrained."""
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(named, torch.dtype):
        return named
    if isinstance(named, str) and isinstance(getattr(torch, named, None), torch.dtype):
        return getattr(torch, named)
    table = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    return next((table[d] for _, d in shapes.values() if d in table), torch.float32)


# ---------------------------------------------------------------- saving one block at a time

def _kept_names(model: nn.Module) -> list[str]:
    """The state-dict names ``save_pretrained`` writes: a tied weight once (lm_head dropped when
    it is the embeddings), in state-dict order."""
    state = model.state_dict()
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        return list(remove_tied_weights_from_state_dict(state, model))
    except ImportError:  # older transformers: keep the first name of each parameter
        owners = dict(model.named_parameters(remove_duplicate=False))
        first: dict[int, str] = {}
        for name in state:
            if name in owners:
                first.setdefault(id(owners[name]), name)
        return [name for name in state if name not in owners or first[id(owners[name])] == name]


def _revert(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's names for ``tensors`` (transformers 5 converts some on load, e.g. experts)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return tensors
    return revert_weight_conversion(model, tensors)


def _write_config(model: nn.Module, folder: Path) -> None:
    """config.json and generation_config.json, as ``save_pretrained`` writes them."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    setattr(model.config, key, str(model.dtype).split(".")[1])
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def write_blockwise(model: nn.Module, store: BlockStore, folder: Path) -> dict:
    """Config and weights into ``folder``: one shard per block, read from the store one block at a
    time, and one for the rest; a block file of the store whose names need no conversion is linked
    (or copied), not rewritten. Returns ``{"shards", "linked", "bytes"}``."""
    folder = Path(folder)
    _write_config(model, folder)
    kept = _kept_names(model)
    n = len(store.blocks)
    per_block: list[list[str]] = [[] for _ in range(n)]
    rest: list[str] = []
    for name in kept:
        head, _, tail = (name[len(store.path) + 1:].partition(".") if name.startswith(store.path + ".")
                         else ("", "", ""))
        if head.isdigit() and int(head) < n and tail:
            per_block[int(head)].append(name)
        else:
            rest.append(name)
    total = n + 1
    weight_map: dict[str, str] = {}
    size, linked = 0, 0
    meta = model.state_dict()
    for i, names in enumerate(per_block):
        shard = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        if _link_block(store, i, names, meta, folder / shard, model):
            linked += 1
            tensors_names = names
        else:
            tensors = store.read_block(i)
            tensors = _revert(model, {k: tensors[k].contiguous() for k in names})
            _save_safetensors(tensors, folder / shard)
            tensors_names = list(tensors)
        weight_map.update({k: shard for k in tensors_names})
        size += sum(meta[k].numel() * meta[k].element_size() for k in names)
        store.events.append(("saved", i))
    shard = f"model-{total:05d}-of-{total:05d}.safetensors"
    tensors = _revert(model, {k: meta[k].detach().to("cpu").contiguous() for k in rest})
    size += _save_safetensors(tensors, folder / shard)
    weight_map.update({k: shard for k in tensors})
    write_json_atomic(folder / SAFETENSORS_INDEX, {"metadata": {"total_size": size},
                                                  "weight_map": dict(sorted(weight_map.items()))})
    return {"shards": total, "linked": linked, "bytes": size}


def _link_block(store: BlockStore, index: int, names: list[str], meta: dict, target: Path, model) -> bool:
    """Link (or copy) the store's own file of block ``index`` as the shard when it holds exactly
    ``names`` and the checkpoint's names are the model's; False when it must be rewritten."""
    if store.mode != "disk" or index in store.live:
        return False
    files = {file for file, _ in store.files[index].values()}
    if len(files) != 1 or store.folder not in next(iter(files)).parents:
        return False  # still the source checkpoint's tensors (never released with a write)
    file = next(iter(files))
    if sorted(k for _, k in store.files[index].values()) != sorted(names):
        return False
    try:
        reverted = _revert(model, {k: meta[k] for k in names})
    except Exception:  # noqa: BLE001 - a conversion that needs real tensors: rewrite the block
        return False
    if sorted(reverted) != sorted(names):
        return False
    try:
        os.link(file, target)
    except OSError:  # another file system, or no hard links: a plain copy
        shutil.copyfile(file, target)
    return True


def save_offloaded(model: nn.Module, store: BlockStore, tokenizer, path, metadata: dict,
                   overwrite: bool = False) -> Path:
    """``save_pruned`` (same folder rules: checked, written beside, swapped in) with the weights
    written one block at a time from the store (:func:`write_blockwise`)."""
    return save_pruned(model, tokenizer, path, metadata, overwrite,
                       write_weights=lambda m, folder: write_blockwise(m, store, folder))


def _save_shards(model: nn.Module, tokenizer, path, record: dict, overwrite: bool,
                 store: BlockStore | None = None, **_) -> str:
    where = save_offloaded(model, store, tokenizer, path, record, overwrite)
    return f"saved the pruned model to {where} (written one block at a time)"


# the offloaded model's checkpoint, one shard per block: an ordinary sharded HF checkpoint, loaded as dense
FORMATS.add(FormatSpec("shards", "the offloaded model written one block per shard (a sharded HF checkpoint)",
                       save=_save_shards, load=None))

__all__ = ["BlockStore", "Resident", "check_offload", "check_offload_dir", "load_for_offload", "placement",
           "save_offloaded", "write_blockwise"]
