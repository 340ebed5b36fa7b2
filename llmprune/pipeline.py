"""The sequential block pipeline: calibrate, score, mask, re-run, one decoder block at a time.

For each block the calibration inputs (outputs of the already-pruned blocks before it) pass
through the block's dense weights with hooks that collect input statistics; each prunable
Linear is then scored and masked (or, for SparseGPT, reconstructed); finally the pruned block
is run again so that its outputs become the next block's inputs. Only the current block needs
to be on the compute device. Calibration windows go through a block in batches.

With ``true_sequential`` a block is pruned stage by stage (q/k/v, then o, then gate/up, then
down), each stage's statistics collected from inputs that already pass through the pruned
stages before it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.calibration import (BlockInputs, StatsCollector, block_device, block_output,
                                  capture_block_inputs, kwargs_on)
from llmprune.config import PruneConfig
from llmprune.errors import LlmpruneError
from llmprune.methods import LayerStats, get_method, needs_for
from llmprune.models import default_seqlen, family_of, get_blocks, prunable_linears


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
    from llmprune.io import versions

    return versions()


def _check_layers(model: nn.Module, config: PruneConfig) -> list[dict[str, nn.Linear]]:
    """Every block's selected layers, validated before any weight is touched."""
    per_block = [prunable_linears(model, i, config.include, config.exclude) for i in range(len(get_blocks(model)))]
    if not any(per_block):
        raise LlmpruneError(
            f"no prunable layer matches include={list(config.include)} exclude={list(config.exclude)}: "
            "patterns match names like 'layers.3.mlp.down_proj'"
        )
    if config.pattern.structured:
        m = config.pattern.m
        for i, layers in enumerate(per_block):
            for name, module in layers.items():
                if module.in_features % m:
                    raise LlmpruneError(
                        f"layers.{i}.{name} has in_features {module.in_features}, not a multiple of M={m}: "
                        f"pick an M that divides it or exclude the layer"
                    )
    return per_block


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


def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, batch_size: int, out: torch.Tensor | None,
               collector: StatsCollector | None = None) -> None:
    """Run every calibration window through ``block``; write outputs into ``out`` if given."""
    for start in range(0, hidden.shape[0], batch_size):
        stop = min(start + batch_size, hidden.shape[0])
        if collector is not None:
            collector.run(block, hidden[start:stop], **kwargs)
        else:
            out[start:stop] = block_output(block(hidden[start:stop], **kwargs))


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
    needs = needs_for(config)
    family = family_of(model)
    blocks = get_blocks(model)
    per_block = _check_layers(model, config)
    start_time = time.perf_counter()
    calib = config.calib
    calibration = None
    inputs: BlockInputs | None = None
    compute = torch.device(device) if device is not None else None

    if needs:
        seqlen = calib.seqlen or getattr(model, "seqlen", None) or default_seqlen(model)
        if windows is None:
            from llmprune.data import calibration_windows, describe_source

            windows = calibration_windows(calib.dataset, tokenizer, calib.nsamples, seqlen, calib.seed, data_dir)
            source = describe_source(calib.dataset, data_dir, split="calibration")
        else:
            source = "windows given by the caller"
        nsamples, seqlen = windows.shape
        calibration = {"dataset": calib.dataset, "source": source, "nsamples": int(nsamples), "seqlen": int(seqlen),
                       "seed": calib.seed, "batch_size": calib.batch_size, "tokens": int(nsamples * seqlen)}
        inputs = capture_block_inputs(model, blocks[0], windows, calib.batch_size,
                                      store_device=compute or block_device(blocks[0]))

    reports: list[LayerReport] = []
    block_seconds: list[float] = []
    bar = tqdm(total=len(blocks), desc=f"{config.method} {config.pattern} {config.sparsity:.0%}",
               unit="block", disable=not progress)
    try:
        for i, block in enumerate(blocks):
            t_block = time.perf_counter()
            layers = per_block[i]
            home = block_device(block)
            moved = compute is not None and home != compute and home.type != "meta"
            if moved:
                block.to(compute)
            try:
                if not needs:
                    for name, module in layers.items():
                        reports.append(_prune_layer(f"layers.{i}.{name}", module, None, config, method))
                else:
                    hidden = inputs.hidden
                    dev = block_device(block)
                    if hidden.device != dev:
                        hidden = hidden.to(dev)
                    kwargs = kwargs_on(inputs.kwargs, dev)
                    stages = [tuple(n for n in stage if n in layers) for stage in family.stages]
                    stages = [s for s in stages if s]
                    # one pass for all stages, or one pass per stage (true sequential)
                    passes = [[s] for s in stages] if config.true_sequential else [stages]
                    for groups in passes:
                        collector = StatsCollector(layers, groups, norms="norms" in needs,
                                                   hessian="hessian" in needs, stop_early=True)
                        with collector:
                            _run_block(block, hidden, kwargs, calib.batch_size, None, collector)
                        for group, stats in collector.pop_stats():
                            _check_finite(stats, i, group)
                            for name in group:
                                reports.append(_prune_layer(f"layers.{i}.{name}", layers[name], stats, config, method))
                    if i + 1 < len(blocks):
                        out = torch.empty_like(hidden)
                        _run_block(block, hidden, kwargs, calib.batch_size, out)
                        inputs.hidden = out
                        del hidden
            finally:
                if moved:
                    block.to(home)
            block_seconds.append(time.perf_counter() - t_block)
            bar.update(1)
    finally:
        bar.close()
    seconds = time.perf_counter() - start_time
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return PruneReport(config=config.to_dict(), model=str(name), layers=reports, block_seconds=block_seconds,
                       seconds=seconds, calibration=calibration, versions=_versions())


def layer_sparsity(model: nn.Module, include=(), exclude=()) -> dict[str, float]:
    """Fraction of zeros in each prunable Linear, counted from the weights."""
    out = {}
    for i in range(len(get_blocks(model))):
        for name, module in prunable_linears(model, i, include, exclude).items():
            w = module.weight
            out[f"layers.{i}.{name}"] = float((w == 0).sum().item()) / w.numel()
    return out

