"""The sequential block pipeline, as the algorithm reads:

1. capture block 0's inputs for every calibration window (:func:`capture_block_inputs`);
2. per block, *calibrate and prune*: the inputs (outputs of the already-pruned blocks before
   it) pass through the block's dense weights with hooks collecting input statistics, then
   each prunable Linear is scored and masked (or, for SparseGPT, reconstructed);
3. per block, *propagate*: the pruned block runs again, hooks off, and its outputs become the
   next block's inputs.

Only the current block needs to be on the compute device. Calibration windows go through a
block in batches. Everything that can be checked from the config and the model's shapes
(method options, include/exclude, N:M divisibility, sequence length, memory) is checked before
the first window is drawn.

With ``true_sequential`` a block is pruned stage by stage (q/k/v, then o, then gate/up, then
down), each stage's statistics collected from inputs that already pass through the pruned
stages before it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.calibration import (StatsCollector, block_device, block_output,
                                  capture_block_inputs, kwargs_on)
from llmprune.config import PruneConfig
from llmprune.errors import LlmpruneError
from llmprune.methods import LayerStats, get_method, needs_for, validate_config
from llmprune.models import block_stages, get_blocks, prunable_linears, resolve_seqlen


@dataclass
class LayerReport:
    name: str  # "layers.{i}.{linear}"
    shape: tuple[int, int]
    zeros: int
    numel: int
    info: dict = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class PruneReport:
    """What a pruning run did, counted from the weights afterwards."""

    config: dict
    model: str
    layers: list[LayerReport]
    block_seconds: list[float]
    seconds: float
    calibration: dict | None
    versions: dict

    @property
    def overall_sparsity(self) -> float:
        numel = sum(layer.numel for layer in self.layers)
        return sum(layer.zeros for layer in self.layers) / numel if numel else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        for layer, src in zip(out["layers"], self.layers):
            layer["shape"] = list(src.shape)
            layer["sparsity"] = src.sparsity
        out["overall_sparsity"] = self.overall_sparsity
        return out

    def table(self, per_layer: bool = False) -> str:
        """A compact text table: sparsity per linear kind (or per layer), then the total."""
        rows: dict[str, list[int]] = {}
        for layer in self.layers:
            key = layer.name if per_layer else layer.name.split(".", 2)[2]
            zeros_numel = rows.setdefault(key, [0, 0])
            zeros_numel[0] += layer.zeros
            zeros_numel[1] += layer.numel
        width = max([len(k) for k in rows] + [10])
        lines = [f"{'layer':<{width}}  {'sparsity':>8}  {'params':>12}"]
        for key, (zeros, numel) in rows.items():
            lines.append(f"{key:<{width}}  {zeros / numel:>8.4f}  {numel:>12,}")
        total = sum(n for _, n in rows.values())
        lines.append(f"{'total':<{width}}  {self.overall_sparsity:>8.4f}  {total:>12,}")
        blocks = len(self.block_seconds)
        per_block = sum(self.block_seconds) / blocks if blocks else 0.0
        lines.append(f"pruned in {self.seconds:.1f} s ({blocks} blocks, {per_block:.2f} s per block)")
        return "\n".join(lines)


def _versions() -> dict:
    from llmprune.results import versions

    return versions()


@dataclass
class BlockPlan:
    """The layers of one block that will be pruned, and their stages (shared-input groups in
    the order their inputs become available)."""

    layers: dict[str, nn.Linear]
    stages: list[tuple[str, ...]]


def plan_layers(model: nn.Module, config: PruneConfig) -> list[BlockPlan]:
    """Every block's selected layers, validated before any weight is touched: include/exclude
    must match something, and an N:M pattern's M must divide every selected layer's inputs."""
    plans = []
    for i in range(len(get_blocks(model))):
        layers = prunable_linears(model, i, config.include, config.exclude)
        plans.append(BlockPlan(layers, block_stages(model, layers)))
    if not any(plan.layers for plan in plans):
        raise LlmpruneError(
            f"no prunable layer matches include={list(config.include)} exclude={list(config.exclude)}: "
            "patterns match names like 'layers.3.mlp.down_proj'"
        )
    if config.pattern.structured:
        m = config.pattern.m
        for i, plan in enumerate(plans):
            for name, module in plan.layers.items():
                if module.in_features % m:
                    raise LlmpruneError(
                        f"layers.{i}.{name} has in_features {module.in_features}, not a multiple of M={m}: "
                        f"pick an M that divides it or exclude the layer"
                    )
    return plans


def check_calibration_memory(model: nn.Module, config: PruneConfig, device=None) -> None:
    """Refuse calibration sizes whose activations cannot fit, naming the limit.

    The pipeline keeps every window's hidden states twice (a block's inputs and the outputs it
    writes) and one batch's intermediate activations; that must fit in the memory free now.
    """
    if not needs_for(config):
        return
    from llmprune.calibration import available_bytes

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
    free = available_bytes(dev)
    if free is not None and need > free:
        fits = max(int((free - batch) // per_window), 0)
        raise LlmpruneError(
            f"calibration with nsamples {calib.nsamples} x seqlen {seqlen} needs about {need / 2**30:.1f} GiB of "
            f"activations on {dev.type}, but {free / 2**30:.1f} GiB are free: use --nsamples {fits} or fewer, "
            "a shorter --seqlen, or a smaller --calib-batch-size"
        )


def _prune_layer(name: str, module: nn.Linear, stats: LayerStats | None, config: PruneConfig, method) -> LayerReport:
    weight = module.weight.data
    new_weight, info = method.prune(weight.float(), stats, config)
    weight.copy_(new_weight.to(weight.dtype))
    zeros = int((weight == 0).sum().item())
    return LayerReport(name=name, shape=tuple(weight.shape), zeros=zeros, numel=weight.numel(), info=dict(info or {}))


def _check_finite(stats: LayerStats, block: int, group: tuple[str, ...]) -> None:
    for tensor in (stats.sq_norm, stats.hessian):
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            raise LlmpruneError(
                f"non-finite activations entering layers.{block}.{group[0]}: the model produces inf/NaN on "
                "the calibration data (try --dtype float32 or a bfloat16 model)"
            )


def _batches(hidden: torch.Tensor, batch_size: int):
    for start in range(0, hidden.shape[0], batch_size):
        yield slice(start, min(start + batch_size, hidden.shape[0]))


def calibrate_and_prune(block: nn.Module, index: int, plan: BlockPlan, hidden: torch.Tensor, kwargs: dict,
                        config: PruneConfig, method, needs: frozenset[str]) -> list[LayerReport]:
    """Statistics pass(es) with hooks on the block's dense weights, then the method on each layer.

    One pass for all stages, or with ``true_sequential`` one pass per stage, each from inputs
    that already go through the stages pruned before it.
    """
    reports = []
    passes = [[stage] for stage in plan.stages] if config.true_sequential else [plan.stages]
    for groups in passes:
        collector = StatsCollector(plan.layers, groups, norms="norms" in needs, hessian="hessian" in needs,
                                   stop_early=True)
        with collector:
            for batch in _batches(hidden, config.calib.batch_size):
                collector.run(block, hidden[batch], **kwargs)
        for group, stats in collector.pop_stats():
            _check_finite(stats, index, group)
            for name in group:
                reports.append(_prune_layer(f"layers.{index}.{name}", plan.layers[name], stats, config, method))
    return reports


def propagate(block: nn.Module, hidden: torch.Tensor, kwargs: dict, batch_size: int) -> torch.Tensor:
    """The pruned block's outputs for every window (hooks off): the next block's inputs."""
    out = torch.empty_like(hidden)
    for batch in _batches(hidden, batch_size):
        out[batch] = block_output(block(hidden[batch], **kwargs))
    return out


def _calibration_inputs(model, tokenizer, config: PruneConfig, data_dir, windows, store_device):
    """Block 0's inputs for the calibration windows, and a JSON-ready description of the data."""
    calib = config.calib
    if windows is None:
        from llmprune.data import calibration_windows, describe_source

        seqlen = resolve_seqlen(model, calib.seqlen)
        windows = calibration_windows(calib.dataset, tokenizer, calib.nsamples, seqlen, calib.seed, data_dir)
        source = describe_source(calib.dataset, data_dir, split="calibration")
    else:
        resolve_seqlen(model, windows.shape[1])  # refuse windows longer than the model's positions
        source = "windows given by the caller"
    nsamples, seqlen = windows.shape
    description = {"dataset": calib.dataset, "source": source, "nsamples": int(nsamples), "seqlen": int(seqlen),
                   "seed": calib.seed, "batch_size": calib.batch_size, "tokens": int(nsamples * seqlen)}
    blocks = get_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], windows, calib.batch_size,
                                  store_device=store_device or block_device(blocks[0]))
    return inputs, description


@contextlib.contextmanager
def _on(block: nn.Module, compute: torch.device | None):
    """Run the body with ``block`` on ``compute`` (if given), and put it back afterwards."""
    home = block_device(block)
    moved = compute is not None and home != compute and home.type != "meta"
    if moved:
        block.to(compute)
    try:
        yield
    finally:
        if moved:
            block.to(home)


@torch.no_grad()
def prune(
    model: nn.Module,
    tokenizer,
    config: PruneConfig,
    data_dir=None,
    progress: bool = True,
    device: str | torch.device | None = None,
    windows: torch.Tensor | None = None,
    model_name: str | None = None,
) -> PruneReport:
    """Prune ``model`` in place as ``config`` says and return what was done.

    ``windows`` (nsamples, seqlen) overrides the calibration data set in ``config.calib``.
    ``device``: where each block computes; by default the device the block already lives on.
    """
    method = get_method(config.method)
    validate_config(config)
    needs = needs_for(config)
    plans = plan_layers(model, config)
    compute = torch.device(device) if device is not None else None
    blocks = get_blocks(model)
    start_time = time.perf_counter()
    inputs, calibration = None, None
    if needs:
        check_calibration_memory(model, config, compute)
        inputs, calibration = _calibration_inputs(model, tokenizer, config, data_dir, windows, compute)

    reports: list[LayerReport] = []
    block_seconds: list[float] = []
    bar = tqdm(total=len(blocks), desc=f"{config.method} {config.pattern} {config.sparsity:.0%}",
               unit="block", disable=not progress)
    try:
        for i, block in enumerate(blocks):
            t_block = time.perf_counter()
            with _on(block, compute):
                if not needs:
                    for name, module in plans[i].layers.items():
                        reports.append(_prune_layer(f"layers.{i}.{name}", module, None, config, method))
                else:
                    dev = block_device(block)
                    hidden, kwargs = inputs.hidden.to(dev), kwargs_on(inputs.kwargs, dev)
                    reports += calibrate_and_prune(block, i, plans[i], hidden, kwargs, config, method, needs)
                    if i + 1 < len(blocks):
                        inputs.hidden = propagate(block, hidden, kwargs, config.calib.batch_size)
                    del hidden
            block_seconds.append(time.perf_counter() - t_block)
            bar.update(1)
    finally:
        bar.close()
    seconds = time.perf_counter() - start_time
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return PruneReport(config=config.to_dict(), model=str(name), layers=reports, block_seconds=block_seconds,
                       seconds=seconds, calibration=calibration, versions=_versions())
