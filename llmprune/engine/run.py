"""The one block loop, as the algorithm reads:

1. capture block 0's inputs for every calibration window;
2. per block, brought to the compute device for its turn (``llmprune.offload`` places the
   others in CPU memory or on disk with ``config.offload``): the strategy's work on the block,
   *mask* (statistics of the dense weights' inputs, each layer's mask, refine, reconstruct, then
   the pruned block's outputs become the next block's inputs) or *shrink* (channel statistics,
   surgery, the next inputs);
3. ``--quantize`` on the block's pruned layers, after its outputs were taken (the next block sees
   unquantized outputs), then the block goes back to its store.

:func:`prune` is :func:`llmprune.engine.plan.plan` then :func:`run`.
"""

from __future__ import annotations

import copy
import os
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from llmprune.blocks import block_device, kwargs_on
from llmprune.config import PruneConfig
from llmprune.data import check_available
from llmprune.engine.drop import DropStrategy
from llmprune.engine.inputs import PhaseTimer, calibration_inputs, propagate
from llmprune.engine.mask import (
    allocate,
    block_config,
    block_updates,
    calibrate_and_prune,
    prune_layer,
    wants_dense_block,
)
from llmprune.engine.plan import Plan, plan
from llmprune.engine.report import LayerReport, PruneReport
from llmprune.engine.shrink import ShrinkStrategy
from llmprune.math.quantize import quantize_weights
from llmprune.models import get_blocks
from llmprune.offload import BlockStore, placement
from llmprune.progress import progress as progress_bar
from llmprune.results import versions

if TYPE_CHECKING:  # annotations only
    from transformers import PreTrainedTokenizerBase


class MaskStrategy:
    """One block of a mask method (see :mod:`llmprune.engine.mask`)."""

    def __init__(self, the_plan: Plan, model: nn.Module):
        self.plan = the_plan
        self.config = the_plan.config
        self.targets = None
        self.state: dict = {}  # what a block pass carries to the next block (block_updates)

    def prepare(self, blocks, inputs, place) -> None:
        self.targets = allocate(blocks, self.plan.blocks, inputs, self.config, place.compute, place)

    def block(self, i: int, block: nn.Module, inputs, hidden, kwargs, dev, timer, last: bool):
        layers = self.plan.blocks[i].layers
        config = block_config(self.config, self.targets, i)
        reports: list[LayerReport] = []
        if hidden is None:  # no statistics: the method needs no data
            with timer("prune", dev):
                for name, module in layers.items():
                    reports.append(prune_layer(f"layers.{i}.{name}", module, None, config, self.plan.method))
        else:
            dense = copy.deepcopy(block) if wants_dense_block(config, self.plan.method) else None
            reports += calibrate_and_prune(block, i, self.plan.blocks[i], hidden, kwargs, config,
                                           self.plan.method, self.plan.block_needs, timer, device=dev)
            if dense is not None:
                block_updates(dense, block, i, self.plan.blocks[i], hidden, kwargs, config, self.plan.method,
                              reports, timer, dev, self.state)
                del dense
            if not last:
                with timer("propagate", dev):
                    inputs.hidden = propagate(block, hidden, kwargs, self.config.calib.batch_size, device=dev)
        return reports, {f"layers.{i}.{name}": layer.weight.data for name, layer in layers.items()}

    def finish(self, blocks) -> dict:
        return {"allocation": self.targets.to_dict()}


STRATEGIES = {"mask": MaskStrategy, "shrink": ShrinkStrategy, "drop": DropStrategy}


@torch.no_grad()
def run(the_plan: Plan, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
        data_dir: str | os.PathLike | None = None, progress: bool = True,
        device: str | torch.device | None = None, windows: torch.Tensor | None = None,
        model_name: str | None = None, store: BlockStore | None = None) -> PruneReport:
    """Execute ``the_plan`` (from :func:`llmprune.plan`) on ``model`` in place and return what was
    done; the arguments are :func:`prune`'s. ``plan`` then ``run`` is :func:`prune`, split so that
    a caller can check everything (and do other work, such as a dense evaluation) between the two.

    Example::

        >>> import llmprune
        >>> model, tok = llmprune.load_model("smollm2-135m")
        >>> config = llmprune.PruneConfig(method="wanda", sparsity=0.5)
        >>> the_plan = llmprune.plan(model, config)  # every check, no calibration yet
        >>> report = llmprune.run(the_plan, model, tok, data_dir="../shared/data")
    """
    config = the_plan.config
    with placement(model, config, torch.device(device) if device is not None else None, store) as place:
        return _blocks(the_plan, model, tokenizer, data_dir, progress, windows, model_name, place)


def _blocks(the_plan: Plan, model: nn.Module, tokenizer, data_dir, progress: bool, windows, model_name,
            place) -> PruneReport:
    config = the_plan.config
    blocks = get_blocks(model)
    place.reset_counters()  # the report counts this call's moves only
    start = time.perf_counter()
    inputs, calibration = None, None
    if the_plan.needs:
        # where the calibration activations wait: the CPU with --activations cpu, else the compute device
        waiting = torch.device("cpu") if config.activations == "cpu" else place.compute
        inputs, calibration = calibration_inputs(model, tokenizer, config, data_dir, windows, waiting)
    strategy = STRATEGIES[the_plan.strategy](the_plan, model)
    strategy.prepare(blocks, inputs, place)
    reports: list[LayerReport] = []
    block_seconds: list[float] = []
    quantized: list[dict] = []
    timer = PhaseTimer()
    what = config.structure if the_plan.strategy == "shrink" else config.pattern
    label = getattr(strategy, "label", None) or f"{config.method} {what} {config.sparsity:.0%}"
    with progress_bar(len(blocks), label, "block", not progress) as bar:
        for i in range(len(blocks)):
            t_block = time.perf_counter()
            timer.new_block()
            with place.use(i) as block:
                dev = block_device(block)
                hidden = kwargs = None
                if inputs is not None and the_plan.block_needs:
                    hidden = inputs.hidden if config.activations == "cpu" else inputs.hidden.to(dev)
                    kwargs = kwargs_on(inputs.kwargs, dev)
                new, layers = strategy.block(i, block, inputs, hidden, kwargs,
                                             dev, timer, i + 1 == len(blocks))
                reports += new
                del hidden
                if config.quantize is not None:  # the block's pruned layers, before it goes back to its store
                    quantized.append(quantize_weights(layers, config.quantize))
            block_seconds.append(time.perf_counter() - t_block)
            bar.update(1)
    extra = strategy.finish(blocks)
    reports += extra.pop("layers", [])
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return PruneReport(config=config.to_dict(), model=str(name), layers=reports, block_seconds=block_seconds,
                       seconds=time.perf_counter() - start, calibration=calibration, versions=versions(),
                       phase_seconds=timer.seconds, quantization=merge_quantization(quantized, config),
                       offload=place.summary(), **extra)


def merge_quantization(parts: list[dict], config: PruneConfig) -> dict | None:
    """The per-block quantization summaries as one (the summary of quantizing all layers at once)."""
    if config.quantize is None:
        return None
    return {"type": config.quantize, "layers": sum(p["layers"] for p in parts),
            "max_abs_error": max((p["max_abs_error"] for p in parts), default=0.0),
            "zeros_before": sum(p["zeros_before"] for p in parts), "zeros_after": sum(p["zeros_after"]
                                                                                      for p in parts)}


def prune(model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: PruneConfig,
          data_dir: str | os.PathLike | None = None, progress: bool = True,
          device: str | torch.device | None = None, windows: torch.Tensor | None = None,
          model_name: str | None = None, store: BlockStore | None = None) -> PruneReport:
    """Prune ``model`` in place as ``config`` says and return what was done (a :class:`PruneReport`).

    Before anything slow, the same preflight as the CLI runs (:func:`llmprune.plan`: the layers
    selected, N:M divisibility, a structured plan, the calibration memory), and the calibration
    data is looked up (``config.calib.dataset`` in ``data_dir``, else ``$LLMPRUNE_DATA_DIR``, else
    the hub): a missing file fails in a second. ``windows`` (nsamples, seqlen) token ids replace
    the calibration data set. ``device``: where each block computes; by default the device the
    block already lives on. ``progress``: a bar per block (plain lines when stderr is not a
    terminal). ``model_name`` names the model in the report. ``store``: an
    :class:`llmprune.offload.BlockStore` holding the blocks (a model from
    :func:`llmprune.offload.load_for_offload`); they stay in it, pruned. Without one,
    ``config.offload`` makes a store for this call and puts the blocks back at the end.

    To evaluate and save in the same call, with every check done before the model loads, use
    :func:`llmprune.prune_model`.

    Example::

        >>> import llmprune
        >>> model, tok = llmprune.load_model("smollm2-135m", dtype="float32")
        >>> config = llmprune.PruneConfig(method="wanda", sparsity=0.5,
        ...                               calib=llmprune.CalibConfig(dataset="c4", nsamples=16, seqlen=512))
        >>> report = llmprune.prune(model, tok, config, data_dir="../shared/data")
        >>> round(report.overall_sparsity, 2)
        0.5
    """
    the_plan = plan(model, config, device)
    if the_plan.needs and windows is None:
        check_available(config.calib.dataset, data_dir, split="calibration")
    return run(the_plan, model, tokenizer, data_dir, progress, device, windows, model_name, store)
