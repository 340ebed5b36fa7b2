"""The one preflight: ``plan(model, config)`` checks everything the config and the model's shapes
decide, before any calibration window is drawn, and returns the :class:`Plan` the engine runs.

What the config alone decides (method, options, combinations of steps) was checked when the
``PruneConfig`` was made; here come the model: which layers are selected and their N:M
divisibility, a shrink method's counts per block (and that the model's config can describe the
smaller blocks), what a block-level collector needs of the layers, and whether the calibration
activations fit in memory. The CLI, recipes, the SLURM executor and the Python ``prune`` all go
through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmprune.config import PruneConfig
from llmprune.engine.drop import DropPlan, plan_drop
from llmprune.engine.inputs import check_calibration_memory
from llmprune.engine.shrink import StructuredPlan, plan_structured
from llmprune.errors import LlmpruneError
from llmprune.methods import block_needs, get_method, needs_for
from llmprune.models import block_passes, block_stages, select_layers
from llmprune.registry import COLLECTORS, MethodSpec


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


@dataclass
class Plan:
    """What ``run`` executes: the config, its method, and per block what is pruned."""

    config: PruneConfig
    method: MethodSpec
    needs: frozenset[str]  # statistics anywhere (empty: no calibration at all)
    block_needs: frozenset[str]  # statistics of each block's own pass
    blocks: list[BlockPlan] | None = None  # the mask strategy's layers per block
    structured: StructuredPlan | None = None  # the shrink strategy's counts per block
    drop: DropPlan | None = None  # the drop strategy's block count

    @property
    def strategy(self) -> str:
        if self.drop is not None:
            return "drop"
        return "shrink" if self.structured is not None else "mask"


def plan(model: nn.Module, config: PruneConfig, device: str | torch.device | None = None) -> Plan:
    """Check ``config`` against ``model`` and return the :class:`Plan` that :func:`llmprune.run`
    executes; a user error raises :class:`llmprune.LlmpruneError`. Nothing is computed on the
    weights: the layers ``include``/``exclude``/``skip_*`` select, N:M divisibility, a structured
    method's counts per block, whether the calibration activations fit on ``device`` (default:
    where the model lives).

    Example::

        >>> import llmprune
        >>> model, tok = llmprune.load_model("smollm2-135m")
        >>> the_plan = llmprune.plan(model, llmprune.PruneConfig(method="wanda", pattern="2:4"))
        >>> sorted(the_plan.blocks[0].layers)[:2]
        ['mlp.down_proj', 'mlp.gate_proj']
    """
    method = get_method(config.method)
    if method.supports.drop:
        result = Plan(config, method, needs_for(config), block_needs(config), drop=plan_drop(model, config))
    elif method.supports.shrink:
        result = Plan(config, method, needs_for(config), block_needs(config),
                      structured=plan_structured(model, config))
    else:
        result = Plan(config, method, needs_for(config), block_needs(config),
                      blocks=plan_layers(model, config))
        _check_block_collectors(result)
        if method.check_blocks is not None:
            method.check_blocks(result.blocks)
    check_calibration_memory(model, config, device)
    return result


def _check_block_collectors(result: Plan) -> None:
    """A block-level collector or step differentiates or retrains the block's weights: they must be
    plain Linears."""
    block = [n for n in sorted(result.block_needs) if COLLECTORS.get(n).kind in ("block", "block_inputs")]
    if not block:
        return
    for i, bp in enumerate(result.blocks):
        for name, layer in bp.layers.items():
            if not isinstance(layer, nn.Linear):
                what = result.config.block_reconstruct or result.method.name
                raise LlmpruneError(f"{what} needs {block[0]} (a pass through each block that moves or "
                                    "differentiates its weights), which llmprune does for nn.Linear layers "
                                    f"only; layers.{i}.{name} is a {type(layer).__name__}: exclude it "
                                    "(--exclude) or use another method")
