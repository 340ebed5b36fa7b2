"""The sequential block pipeline, as the algorithm reads:

1. capture block 0's inputs for every calibration window (:func:`capture_block_inputs`);
2. per block, *calibrate and prune*: the inputs (outputs of the already-pruned blocks before
   it) pass through the block's dense weights with hooks collecting input statistics, then
   each prunable Linear is scored and masked (or, for SparseGPT, reconstructed);
3. per block, *propagate*: the pruned block runs again, hooks off, and its outputs become the
   next block's inputs.

Only the current block needs to be on the compute device; with ``config.offload`` the others
wait in CPU memory or on disk (offload.py), and with ``config.activations == "cpu"`` the
calibration activations wait in CPU memory too, one batch at a time on the device. Calibration
windows go through a block in batches. Everything that can be checked from the config and the
model's shapes (method options, include/exclude, N:M divisibility, sequence length, memory) is
checked before the first window is drawn.

With ``true_sequential`` a block is pruned stage by stage (q/k/v, then o, then gate/up, then
down), each stage's statistics collected from inputs that already pass through the pruned
stages before it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.allocation import BlockTargets, block_targets, get_allocation, outlier_ratio
from llmprune.calibration import (StatsCollector, block_device, block_output,
                                  capture_block_inputs, kwargs_on)
from llmprune.config import PruneConfig
from llmprune.errors import LlmpruneError
from llmprune.methods import LayerStats, block_needs, get_method, needs_for, prune_weight, validate_config
from llmprune.models import (EXPERT_INDEX, block_passes, block_stages, get_blocks, resolve_seqlen,
                             select_layers)
from llmprune.offload import Resident, placement
from llmprune.refine import skipped
from llmprune.scores import score


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
    # per block, seconds in each phase: "stats" (hooked pass), "prune" (score + mask or solve),
    # "propagate" (pruned block, hooks off): where a regression shows
    phase_seconds: dict[str, list[float]] = field(default_factory=dict)
    # per-block targets (allocation.py): "allocation", "block_sparsity", OWL's "outlier_ratio", ...
    allocation: dict | None = None
    # structured methods (structured.py): the plan and the parameters before/after; --quantize: what it did
    structured: dict | None = None
    quantization: dict | None = None
    # --offload (offload.py): the store's mode, block loads and writes, peak blocks materialised at once
    offload: dict | None = None

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
            if not per_layer and "routed_tokens" in layer.info:  # one row for all experts
                key = EXPERT_INDEX.sub(".*.", key, count=1)
            zeros_numel = rows.setdefault(key, [0, 0])
            zeros_numel[0] += layer.zeros
            zeros_numel[1] += layer.numel
        width = max([len(k) for k in rows] + [10])
        lines = [f"{'layer':<{width}}  {'sparsity':>8}  {'params':>12}"]
        for key, (zeros, numel) in rows.items():
            lines.append(f"{key:<{width}}  {zeros / numel:>8.4f}  {numel:>12,}")
        total = sum(n for _, n in rows.values())
        lines.append(f"{'total':<{width}}  {self.overall_sparsity:>8.4f}  {total:>12,}")
        if self.allocation and self.allocation.get("allocation") != "uniform":
            targets = self.allocation["block_sparsity"]
            lines.append(f"allocation {self.allocation['allocation']}: block sparsity "
                         + " ".join(f"{s:.3f}" for s in targets))
        blocks = len(self.block_seconds)
        per_block = sum(self.block_seconds) / blocks if blocks else 0.0
        lines.append(f"pruned in {self.seconds:.1f} s ({blocks} blocks, {per_block:.2f} s per block)")
        if self.offload:
            o = self.offload
            lines.append(f"offload {o['mode']} (compute on {o['compute']}): {o['loads']} block loads, {o['writes']} "
                         f"write-backs, at most {o['peak_blocks']} block(s) materialised at once"
                         + (f"; {o['bytes_read'] / 2**20:.1f} MiB read, {o['bytes_written'] / 2**20:.1f} MiB written"
                            if o["mode"] == "disk" else ""))
        experts = self.expert_tokens()
        if experts:
            counts = sorted(experts.values())
            starved = [name for name, n in experts.items() if n == 0]
            named = ", ".join(starved[:8]) + (f", ... ({len(starved) - 8} more in the JSON)" if len(starved) > 8 else "")
            lines.append(f"experts: {len(counts)} expert matrices, calibration tokens routed to each: min {counts[0]}, "
                         f"median {counts[len(counts) // 2]}, max {counts[-1]}"
                         + (f"; {len(starved)} got none and were pruned by magnitude: {named}" if starved else ""))
        return "\n".join(lines)

    def expert_tokens(self) -> dict[str, int]:
        """Calibration tokens routed to each expert matrix (MoE models), by layer name."""
        return {layer.name: layer.info["routed_tokens"] for layer in self.layers if "routed_tokens" in layer.info}


def _versions() -> dict:
    from llmprune.results import versions

    return versions()


@dataclass
class BlockPlan:
    """The layers of one block that will be pruned, and their stages (shared-input groups in
    the order their inputs become available). ``passes``: the calibration passes of
    true-sequential pruning, each a list of groups (all experts' gate/up are one pass); None:
    one pass per group."""

    layers: dict[str, nn.Linear]  # or llmprune.models.WeightView (Conv1D, experts)
    stages: list[tuple[str, ...]]
    passes: list[list[tuple[str, ...]]] | None = None


def plan_layers(model: nn.Module, config: PruneConfig) -> list[BlockPlan]:
    """Every block's selected layers, validated before any weight is touched: include/exclude
    must match something, and an N:M pattern's M must divide every selected layer's inputs."""
    plans = []
    skip = tuple(kind for kind, on in (("attention", config.skip_attention), ("mlp", config.skip_mlp)) if on)
    for i, layers in enumerate(select_layers(model, config.include, config.exclude, skip)):
        plans.append(BlockPlan(layers, block_stages(model, i, layers), block_passes(model, i, layers)))
    if not any(plan.layers for plan in plans):
        raise LlmpruneError(
            f"no prunable layer matches include={list(config.include)} exclude={list(config.exclude)}"
            f"{' skip=' + ','.join(skip) if skip else ''}: "
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
    writes) and one batch's intermediate activations; that must fit in the memory free now. With
    ``activations == "cpu"`` the hidden states must fit in CPU memory and one batch on the device.
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
    if config.activations == "cpu" and dev.type != "cpu":  # the windows wait in RAM, one batch on the device
        free = available_bytes(torch.device("cpu"))
        if free is not None and calib.nsamples * per_window > free:
            raise LlmpruneError(
                f"calibration with nsamples {calib.nsamples} x seqlen {seqlen} needs about "
                f"{calib.nsamples * per_window / 2**30:.1f} GiB of CPU memory for the activations (--activations "
                f"cpu), but {free / 2**30:.1f} GiB are free: use --nsamples {int(free // per_window)} or fewer, "
                "or a shorter --seqlen")
        need = batch + min(calib.batch_size, calib.nsamples) * per_window
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
    routed = getattr(module, "routed", False) and stats is not None
    if routed and stats.tokens == 0:  # an expert no calibration token reached: nothing to weigh |W| by
        method, config, stats = get_method("magnitude"), _magnitude_fallback(config), None
    new_weight, info = prune_weight(method, weight.float(), stats, config, name)
    weight.copy_(new_weight.to(weight.dtype))
    zeros = int((weight == 0).sum().item())
    info = dict(info or {})
    if routed:
        info["routed_tokens"] = 0 if stats is None else stats.tokens
        if stats is None:
            info["fallback"] = "magnitude"
    return LayerReport(name=name, shape=tuple(weight.shape), zeros=zeros, numel=weight.numel(), info=info)


def _magnitude_fallback(config: PruneConfig) -> PruneConfig:
    """Magnitude with the same pattern, sparsity and comparison group as ``config``."""
    from llmprune.results import effective_group_metric

    group, _ = effective_group_metric(config)
    return dataclasses.replace(config, method="magnitude", group=group, metric=None, use_variant=False)


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


class PhaseTimer:
    """Wall seconds per phase, one entry per block; synchronises CUDA so a phase gets its own time."""

    def __init__(self, phases: tuple[str, ...] = ("stats", "prune", "propagate")):
        self.seconds: dict[str, list[float]] = {phase: [] for phase in phases}

    def new_block(self) -> None:
        for values in self.seconds.values():
            values.append(0.0)

    @contextlib.contextmanager
    def __call__(self, phase: str, device: torch.device | None = None):
        sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda *_: None)
        sync(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            sync(device)
            self.seconds[phase][-1] += time.perf_counter() - start


def calibrate_and_prune(block: nn.Module, index: int, plan: BlockPlan, hidden: torch.Tensor, kwargs: dict,
                        config: PruneConfig, method, needs: frozenset[str],
                        timer: PhaseTimer | None = None, device: torch.device | None = None) -> list[LayerReport]:
    """Statistics pass(es) with hooks on the block's dense weights, then the method on each layer.

    One pass for all stages, or with ``true_sequential`` one pass per stage, each from inputs
    that already go through the stages pruned before it. ``device``: where the block computes,
    when ``hidden`` waits elsewhere (``activations="cpu"``): each batch is moved there.
    """
    dev = device if device is not None else hidden.device
    if timer is None:  # called on its own: time into a throwaway timer
        timer = PhaseTimer()
        timer.new_block()
    reports = []
    sequential = plan.passes if plan.passes is not None else [[stage] for stage in plan.stages]
    passes = sequential if config.true_sequential else [plan.stages]
    for groups in passes:
        collector = StatsCollector(plan.layers, groups, norms="norms" in needs, hessian="hessian" in needs,
                                   stop_early=True, moments=_moment_groups(groups, index, config, needs))
        with timer("stats", dev), collector:
            for batch in _batches(hidden, config.calib.batch_size):
                collector.run(block, hidden[batch].to(dev), **kwargs)
        with timer("prune", dev):
            for group, stats in collector.pop_stats():
                _check_finite(stats, index, group)
                for name in group:
                    reports.append(_prune_layer(f"layers.{index}.{name}", plan.layers[name], stats, config, method))
    return reports


def _moment_groups(groups, index: int, config: PruneConfig, needs: frozenset[str]) -> frozenset[str]:
    """Lead names of the groups whose input DSnoT's moments are collected for: those with a layer
    it refines (by default it skips the MLP, whose 1536-wide inputs cost the most)."""
    if "moments" not in needs:
        return frozenset()
    return frozenset(g[0] for g in groups if not all(skipped(f"layers.{index}.{n}", config.dsnot_skip) for n in g))


def propagate(block: nn.Module, hidden: torch.Tensor, kwargs: dict, batch_size: int,
              device: torch.device | None = None) -> torch.Tensor:
    """The pruned block's outputs for every window (hooks off): the next block's inputs, where
    ``hidden`` is. ``device``: where the block computes, when that is elsewhere."""
    dev = device if device is not None else hidden.device
    out = torch.empty_like(hidden)
    for batch in _batches(hidden, batch_size):
        out[batch] = block_output(block(hidden[batch].to(dev), **kwargs)).to(out.device)
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


@torch.no_grad()
def outlier_ratios(blocks, plans: list[BlockPlan], inputs, config: PruneConfig,
                   compute: torch.device | None, place=None) -> list[float | None]:
    """OWL's dense statistics pass (official ``prune_wanda_outlier`` and siblings): the calibration
    windows (the first ``owl_nsamples``) run through the *unpruned* blocks; each block's Wanda
    scores of all its selected Linears give its outlier ratio D (None for a block with none).
    ``place``: where the blocks wait (offload.py); each is read, never written back."""
    place = place if place is not None else Resident(blocks, compute)
    hidden = inputs.hidden[: config.owl_nsamples or inputs.hidden.shape[0]].clone()
    ratios: list[float | None] = []
    for i, plan in enumerate(plans):
        with place.use(i, write=False) as block:
            dev = block_device(block)
            kwargs = kwargs_on(inputs.kwargs, dev)
            collector = StatsCollector(plan.layers, plan.stages, norms=True, hessian=False)
            with collector:  # one full pass: statistics and the next block's dense inputs
                for batch in _batches(hidden, config.calib.batch_size):
                    hidden[batch] = block_output(block(hidden[batch].to(dev), **kwargs)).to(hidden.device)
            scores = [score(plan.layers[name].weight, stats.sq_norm, stats.tokens, "wanda")
                      for group, stats in collector.pop_stats() for name in group]
            ratios.append(outlier_ratio(scores, config.owl_m) if scores else None)
    return ratios


def allocate(blocks, plans: list[BlockPlan], inputs, config: PruneConfig,
             compute: torch.device | None, place=None) -> BlockTargets:
    """Per-block sparsity targets (allocation.py), with OWL's statistics pass when it needs one."""
    n, m = config.pattern.n, config.pattern.m
    spec = get_allocation(config.allocation)
    if not spec.needs_data:
        return block_targets(spec.name, len(blocks), config.sparsity, n, m, delta=config.depth_delta)
    t0 = time.perf_counter()
    ratios = outlier_ratios(blocks, plans, inputs, config, compute, place)
    used = [i for i, r in enumerate(ratios) if r is not None]
    part = block_targets(spec.name, len(used), config.sparsity, n, m, [ratios[i] for i in used], lam=config.owl_lambda)
    targets = BlockTargets(spec.name, [config.sparsity] * len(blocks), [n] * len(blocks) if m else None, ratios)
    for j, i in enumerate(used):
        targets.sparsity[i] = part.sparsity[j]
        if m:
            targets.keep[i] = part.keep[j]
    targets.seconds = time.perf_counter() - t0
    return targets


def block_config(config: PruneConfig, targets: BlockTargets, index: int) -> PruneConfig:
    """``config`` with block ``index``'s own sparsity (or N:M kept count) from the allocation."""
    if targets.allocation == "uniform":
        return config
    if targets.keep is not None:
        keep, m = targets.keep[index], config.pattern.m
        if keep >= m:  # the official code leaves a block with nothing to prune dense
            return dataclasses.replace(config, pattern="unstructured", sparsity=0.0)
        return dataclasses.replace(config, pattern=f"{keep}:{m}", sparsity=None)
    return dataclasses.replace(config, sparsity=targets.sparsity[index])


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
    store=None,
) -> PruneReport:
    """Prune ``model`` in place as ``config`` says and return what was done.

    ``windows`` (nsamples, seqlen) overrides the calibration data set in ``config.calib``.
    ``device``: where each block computes; by default the device the block already lives on.
    ``store``: an :class:`llmprune.offload.BlockStore` holding the blocks (a model from
    :func:`llmprune.offload.load_for_offload`); they stay in it, pruned. Without one,
    ``config.offload`` makes a store for this call and puts the blocks back at the end.
    """
    method = get_method(config.method)
    compute = torch.device(device) if device is not None else None
    if method.structured is not None:  # removes whole channels and heads: another algorithm, structured.py
        from llmprune.structured import prune_structured

        return prune_structured(model, tokenizer, config, data_dir, progress, device, windows, model_name, store)
    validate_config(config)
    plans = plan_layers(model, config)
    with placement(model, config, compute, store) as place:
        return _prune_blocks(model, tokenizer, config, data_dir, progress, windows, model_name, method, plans, place)


def _prune_blocks(model, tokenizer, config: PruneConfig, data_dir, progress: bool, windows, model_name,
                  method, plans: list[BlockPlan], place) -> PruneReport:
    """:func:`prune`'s sequence, each block used through ``place`` (offload.py): brought to the
    compute device for its turn and, pruned, written back."""
    needs = needs_for(config)
    compute = place.compute
    blocks = get_blocks(model)
    place.reset_counters()  # the report counts this call's moves only
    # where the calibration activations wait: the CPU with --activations cpu, else the compute device
    waiting = torch.device("cpu") if config.activations == "cpu" else compute
    start_time = time.perf_counter()
    inputs, calibration = None, None
    if needs:
        check_calibration_memory(model, config, compute)
        inputs, calibration = _calibration_inputs(model, tokenizer, config, data_dir, windows, waiting)
    targets = allocate(blocks, plans, inputs, config, compute, place)
    needs = block_needs(config)  # what each block's own pass collects (OWL's pass is done above)

    reports: list[LayerReport] = []
    block_seconds: list[float] = []
    quantized: list[dict] = []
    timer = PhaseTimer()
    bar = tqdm(total=len(blocks), desc=f"{config.method} {config.pattern} {config.sparsity:.0%}",
               unit="block", disable=not progress)
    try:
        for i in range(len(blocks)):
            t_block = time.perf_counter()
            timer.new_block()
            with place.use(i) as block:
                dev = block_device(block)
                if not needs:
                    with timer("prune", dev):
                        for name, module in plans[i].layers.items():
                            reports.append(_prune_layer(f"layers.{i}.{name}", module, None,
                                                        block_config(config, targets, i), method))
                else:
                    hidden = inputs.hidden if config.activations == "cpu" else inputs.hidden.to(dev)
                    kwargs = kwargs_on(inputs.kwargs, dev)
                    reports += calibrate_and_prune(block, i, plans[i], hidden, kwargs, block_config(config, targets, i),
                                                   method, needs, timer, device=dev)
                    if i + 1 < len(blocks):
                        with timer("propagate", dev):
                            inputs.hidden = propagate(block, hidden, kwargs, config.calib.batch_size, device=dev)
                    del hidden
                if config.quantize is not None:  # after propagation: the next block sees unquantized outputs
                    quantized.append(_quantize(plans[i], i, config))
            block_seconds.append(time.perf_counter() - t_block)
            bar.update(1)
    finally:
        bar.close()
    seconds = time.perf_counter() - start_time
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return PruneReport(config=config.to_dict(), model=str(name), layers=reports, block_seconds=block_seconds,
                       seconds=seconds, calibration=calibration, versions=_versions(), phase_seconds=timer.seconds,
                       allocation=targets.to_dict(), quantization=merge_quantization(quantized, config),
                       offload=place.summary())


def _quantize(plan: BlockPlan, index: int, config: PruneConfig) -> dict:
    """``--quantize``: one block's pruned layers, in place (zeros stay zero)."""
    from llmprune.quantize import quantize_weights

    return quantize_weights({f"layers.{index}.{name}": layer.weight.data for name, layer in plan.layers.items()},
                            config.quantize)


def merge_quantization(parts: list[dict], config: PruneConfig) -> dict | None:
    """The per-block quantization summaries as one (the summary of quantizing all layers at once)."""
    if config.quantize is None:
        return None
    return {"type": config.quantize, "layers": sum(p["layers"] for p in parts),
            "max_abs_error": max((p["max_abs_error"] for p in parts), default=0.0),
            "zeros_before": sum(p["zeros_before"] for p in parts), "zeros_after": sum(p["zeros_after"] for p in parts)}
