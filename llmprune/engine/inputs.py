"""The engine's inputs and passes: block 0's calibration inputs, batches of windows, the pass of a
(pruned) block that gives the next block its inputs, the memory check, and the phase timer."""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from llmprune.blocks import available_bytes, block_device, block_output, capture_block_inputs
from llmprune.config import PruneConfig
from llmprune.data import calibration_windows, describe_source
from llmprune.errors import LlmpruneError
from llmprune.methods import needs_for
from llmprune.models import get_blocks, resolve_seqlen


def check_calibration_memory(model: nn.Module, config: PruneConfig, device=None) -> None:
    """Refuse calibration sizes whose activations cannot fit, naming the limit.

    The pipeline keeps every window's hidden states twice (a block's inputs and the outputs it
    writes) and one batch's intermediate activations; that must fit in the memory free now. With
    ``activations == "cpu"`` the hidden states must fit in CPU memory and one batch on the device.
    """
    if not needs_for(config):
        return
    calib = config.calib
    seqlen = resolve_seqlen(model, calib.seqlen)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    inner = int(getattr(text, "intermediate_size", 0) or 4 * hidden)
    itemsize = next(model.parameters()).element_size()
    per_window = 2 * seqlen * hidden * itemsize
    batch = min(calib.batch_size, calib.nsamples) * seqlen * (6 * hidden + 3 * inner) * 4
    need = calib.nsamples * per_window + batch
    dev = torch.device(device) if device is not None else block_device(get_blocks(model)[0])
    if config.activations == "cpu" and dev.type != "cpu":  # the windows wait in RAM, one batch on the device
        free = available_bytes(torch.device("cpu"))
        if free is not None and calib.nsamples * per_window > free:
            raise LlmpruneError(
                f"calibration with nsamples {calib.nsamples} x seqlen {seqlen} needs about "
                f"{calib.nsamples * per_window / 2**30:.1f} GiB of CPU memory for the activations "
                f"(--activations cpu), but {free / 2**30:.1f} GiB are free: use --nsamples "
                f"{int(free // per_window)} or fewer, or a shorter --seqlen")
        need = batch + min(calib.batch_size, calib.nsamples) * per_window
    free = available_bytes(dev)
    if free is not None and need > free:
        fits = max(int((free - batch) // per_window), 0)
        raise LlmpruneError(
            f"calibration with nsamples {calib.nsamples} x seqlen {seqlen} needs about {need / 2**30:.1f} "
            f"GiB of activations on {dev.type}, but {free / 2**30:.1f} GiB are free: use --nsamples {fits} "
            "or fewer, a shorter --seqlen, or a smaller --calib-batch-size"
        )


def batches(hidden: torch.Tensor, batch_size: int):
    for start in range(0, hidden.shape[0], batch_size):
        yield slice(start, min(start + batch_size, hidden.shape[0]))


class PhaseTimer:
    """Wall seconds per phase, one entry per block; synchronises CUDA so a phase gets its own time.
    A phase that only some configs have (``block_reconstruct``) appears when first timed."""

    def __init__(self, phases: tuple[str, ...] = ("stats", "prune", "propagate")):
        self.seconds: dict[str, list[float]] = {phase: [] for phase in phases}
        self.blocks = 0

    def new_block(self) -> None:
        self.blocks += 1
        for values in self.seconds.values():
            values.append(0.0)

    @contextlib.contextmanager
    def __call__(self, phase: str, device: torch.device | None = None):
        sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda *_: None)
        self.seconds.setdefault(phase, [0.0] * self.blocks)
        sync(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            sync(device)
            self.seconds[phase][-1] += time.perf_counter() - start


def propagate(block: nn.Module, hidden: torch.Tensor, kwargs: dict, batch_size: int,
              device: torch.device | None = None) -> torch.Tensor:
    """The pruned block's outputs for every window (hooks off): the next block's inputs, where
    ``hidden`` is. ``device``: where the block computes, when that is elsewhere."""
    dev = device if device is not None else hidden.device
    out = torch.empty_like(hidden)
    for batch in batches(hidden, batch_size):
        out[batch] = block_output(block(hidden[batch].to(dev), **kwargs)).to(out.device)
    return out


def calibration_inputs(model, tokenizer, config: PruneConfig, data_dir, windows, store_device):
    """Block 0's inputs for the calibration windows, and a JSON-ready description of the data."""
    calib = config.calib
    if windows is None:
        seqlen = resolve_seqlen(model, calib.seqlen)
        windows = calibration_windows(calib.dataset, tokenizer, calib.nsamples, seqlen, calib.seed, data_dir)
        source = describe_source(calib.dataset, data_dir, split="calibration")
    else:
        resolve_seqlen(model, windows.shape[1])  # refuse windows longer than the model's positions
        source = "windows given by the caller"
    nsamples, seqlen = windows.shape
    description = {"dataset": calib.dataset, "source": source, "nsamples": int(nsamples),
                   "seqlen": int(seqlen), "seed": calib.seed, "batch_size": calib.batch_size,
                   "tokens": int(nsamples * seqlen)}
    blocks = get_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], windows, calib.batch_size,
                                  store_device=store_device or block_device(blocks[0]))
    return inputs, description
