"""The mask strategy: per block, statistics of the dense weights' inputs, then each layer's mask
from its method, then the refiner and the reconstruction the config asks for; and the per-block
targets of an allocation (OWL's dense statistics pass among them).

With ``true_sequential`` a block is pruned stage by stage (q/k/v, then o, then gate/up, then
down), each stage's statistics collected from inputs that already pass through the pruned
stages before it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from llmprune.blocks import block_device, block_output, kwargs_on
from llmprune.engine.inputs import PhaseTimer, batches
from llmprune.engine.report import LayerReport
from llmprune.errors import LlmpruneError
from llmprune.math.allocation import BlockTargets, outlier_ratio
from llmprune.math.scores import score
from llmprune.math.solvers.sparsegpt import all_finite
from llmprune.methods import (
    ALLOCATIONS,
    BLOCK_STEPS,
    METHODS,
    RECONSTRUCTIONS,
    REFINERS,
    effective_group_metric,
)
from llmprune.methods.base import Selection, finish
from llmprune.offload import Resident
from llmprune.registry import COLLECTORS
from llmprune.stats import LayerStats, StatsCollector

if TYPE_CHECKING:
    from llmprune.config import PruneConfig
    from llmprune.engine.plan import BlockPlan
    from llmprune.registry import MethodSpec


def prune_weight(method: MethodSpec, weight: torch.Tensor, stats: LayerStats | None, config: PruneConfig,
                 layer: str = "") -> tuple[torch.Tensor, dict]:
    """The method on one layer (``layer`` = "layers.{i}.{name}"), then the refinement and the
    reconstruction the config asks for. Returns (new weight float32, JSON-ready info)."""
    sel = method.select(weight, stats, config)
    if config.refine is None and not config.reconstruct:
        return finish(sel)
    dense = weight.detach().float()
    mask = sel.mask
    if config.refine is not None:
        mask, sel.info["refine"] = REFINERS.get(config.refine).run(dense, sel, stats, config, layer)
    changed = mask is not sel.mask and not torch.equal(mask, sel.mask)
    if sel.updates and not changed and config.reconstruct in (None, sel.own_update):
        new = sel.weight  # the method's own update for this very mask (SparseGPT)
    elif config.reconstruct or sel.updates:  # a solver's update redone for a refined mask: by default OBS
        spec = RECONSTRUCTIONS.get(config.reconstruct or "obs")
        new, sel.info["reconstruct"] = spec.run(dense, stats.hessian, mask, config)
    else:
        new = dense.masked_fill(mask, 0.0)
    return finish(Selection(mask, new, sel.info))


def prune_layer(name: str, module: nn.Linear, stats: LayerStats | None, config: PruneConfig,
                method) -> LayerReport:
    weight = module.weight.data
    routed = getattr(module, "routed", False) and stats is not None
    if routed and stats.tokens == 0:  # an expert no calibration token reached: nothing to weigh |W| by
        method, config, stats = METHODS.get("magnitude"), _magnitude_fallback(config), None
    try:
        new_weight, info = prune_weight(method, weight.float(), stats, config, name)
    except LlmpruneError as exc:  # a solver that diverged: say where
        raise LlmpruneError(f"{name}: {exc}") from None
    if not all_finite(new_weight):
        raise LlmpruneError(f"{name}: {method.name} produced non-finite weights (inf/NaN); nothing was "
                            "saved: raise --percdamp, or try --dtype float32")
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
    group, _ = effective_group_metric(config)
    return config.derived(method="magnitude", group=group, metric=None, use_variant=False)


def _check_finite(stats: LayerStats, block: int, group: tuple[str, ...]) -> None:
    for tensor in (stats.sq_norm, stats.hessian):
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            raise LlmpruneError(
                f"non-finite activations entering layers.{block}.{group[0]}: the model produces inf/NaN on "
                "the calibration data (try --dtype float32 or a bfloat16 model)"
            )


def calibrate_and_prune(block: nn.Module, index: int, plan: BlockPlan, hidden: torch.Tensor, kwargs: dict,
                        config: PruneConfig, method, needs: frozenset[str],
                        timer: PhaseTimer | None = None,
                        device: torch.device | None = None) -> list[LayerReport]:
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
        inputs_needs = [n for n in sorted(needs) if COLLECTORS.get(n).kind == "layer_input"]
        collector = StatsCollector(plan.layers, groups, inputs_needs, stop_early=True,
                                   only=_only_groups(groups, index, config, needs))
        with timer("stats", dev):
            with collector:
                for batch in batches(hidden, config.calib.batch_size):
                    collector.run(block, hidden[batch].to(dev), **kwargs)
            block_values = _block_statistics(block, plan, groups, hidden, kwargs, needs, dev)
        with timer("prune", dev):
            for group, stats in collector.pop_stats():
                _check_finite(stats, index, group)
                for name in group:
                    layer_stats = stats
                    if name in block_values:
                        layer_stats = LayerStats(**{**stats.__dict__,
                                                    "extra": {**stats.extra, **block_values[name]}})
                    reports.append(prune_layer(f"layers.{index}.{name}", plan.layers[name], layer_stats,
                                               config, method))
    return reports


def _only_groups(groups, index: int, config: PruneConfig, needs: frozenset[str]) -> dict[str, frozenset[str]]:
    """For the refiner's statistics, the lead names of the groups with a layer it refines (DSnoT
    skips the MLP by default, whose 1536-wide inputs cost the most)."""
    if config.refine is None:
        return {}
    refiner = REFINERS.get(config.refine)
    refines = refiner.extra.get("layer_filter")
    if refines is None:
        return {}
    own = [n for n in refiner.needs if n in needs and n not in _method_and_step_needs(config)]
    leads = frozenset(g[0] for g in groups if any(refines(f"layers.{index}.{n}", config) for n in g))
    return {name: leads for name in own}


def _method_and_step_needs(config: PruneConfig) -> set[str]:
    """What the method and the reconstruction need for every layer (a refiner's own needs are
    collected only where it refines)."""
    method = METHODS.get(config.method)
    needs = set(method.needs_for(config) if method.needs_for is not None else method.needs)
    if config.reconstruct:
        needs |= set(RECONSTRUCTIONS.get(config.reconstruct).needs)
    return needs


def _block_statistics(block: nn.Module, plan: BlockPlan, groups, hidden: torch.Tensor, kwargs: dict,
                      needs: frozenset[str], device: torch.device) -> dict[str, dict]:
    """The ``block`` collectors' values (e.g. Wanda++'s regional gradients), per layer of ``groups``,
    from the block's dense weights."""
    out: dict[str, dict] = {}
    layers = {name: plan.layers[name] for group in groups for name in group}
    for name in sorted(needs):
        spec = COLLECTORS.get(name)
        if spec.kind != "block":
            continue
        for layer, value in spec.factory(block, hidden, kwargs, layers, device).items():
            out.setdefault(layer, {})[name] = value
    return out


def wants_dense_block(config: PruneConfig, method) -> bool:
    """Whether a block's dense copy must be kept until its masks are chosen: a method's own block
    pass (SparseLLM) or a block reconstruction re-runs the dense block for its targets."""
    return method.block is not None or config.block_reconstruct is not None


def block_updates(dense: nn.Module, block: nn.Module, index: int, plan: BlockPlan, hidden: torch.Tensor,
                  kwargs: dict, config: PruneConfig, method, reports: list[LayerReport],
                  timer: PhaseTimer, device: torch.device, state: dict) -> None:
    """After every layer of block ``index`` has its mask: the method's own block pass, then the
    block reconstruction the config asks for, both toward ``dense`` (the block before pruning) on
    the same inputs. Pruned weights stay zero: each step keeps the masks it is given. The
    reports' zero counts are taken again afterwards and each step's info is added to them.
    ``state``: what a step carries from block to block (the dense model's activations for lunch)."""
    steps = []
    if method.block is not None:
        steps.append(("block", "prune", method.block))
    if config.block_reconstruct is not None:
        spec = BLOCK_STEPS.get(config.block_reconstruct)
        steps.append(("block_reconstruct", "block_reconstruct", spec.run))
    infos = {}
    for key, phase, run in steps:
        with timer(phase, device):
            try:
                infos[key] = run(dense, block, plan.layers, hidden, kwargs, config, state)
            except LlmpruneError as exc:  # a solver that diverged: say where
                raise LlmpruneError(f"layers.{index}: {exc}") from None
    for report in reports:
        weight = plan.layers[report.name.split(".", 2)[2]].weight.data
        if not all_finite(weight):
            raise LlmpruneError(f"{report.name}: {config.block_reconstruct or method.name} produced "
                                "non-finite weights (inf/NaN); nothing was saved: lower its learning rate or "
                                "iterations")
        report.zeros = int((weight == 0).sum().item())
        report.info = {**report.info, **infos}


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
            collector = StatsCollector(plan.layers, plan.stages, ("norms",))
            with collector:  # one full pass: statistics and the next block's dense inputs
                for batch in batches(hidden, config.calib.batch_size):
                    hidden[batch] = block_output(block(hidden[batch].to(dev), **kwargs)).to(hidden.device)
            scores = [score(plan.layers[name].weight, stats.sq_norm, stats.tokens, "wanda")
                      for group, stats in collector.pop_stats() for name in group]
            ratios.append(outlier_ratio(scores, config.owl_m) if scores else None)
    return ratios


def allocate(blocks, plans: list[BlockPlan], inputs, config: PruneConfig,
             compute: torch.device | None, place=None) -> BlockTargets:
    """Per-block sparsity targets (the allocation's), with OWL's dense statistics pass when it needs one."""
    spec = ALLOCATIONS.get(config.allocation)
    if not spec.extra.get("dense_pass"):
        return spec.run(len(blocks), config)
    t0 = time.perf_counter()
    ratios = outlier_ratios(blocks, plans, inputs, config, compute, place)
    used = [i for i, r in enumerate(ratios) if r is not None]
    part = spec.run(len(used), config, [ratios[i] for i in used])
    m = config.pattern.m
    targets = BlockTargets(spec.name, [config.sparsity] * len(blocks),
                           [config.pattern.n] * len(blocks) if m else None, ratios)
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
            return config.derived(pattern="unstructured", sparsity=0.0)
        return config.derived(pattern=f"{keep}:{m}", sparsity=1.0 - keep / m)
    return config.derived(sparsity=targets.sparsity[index])
