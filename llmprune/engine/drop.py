"""The drop strategy: depth pruning removes whole decoder blocks, so the model really gets shallower.

One pass of the calibration windows through the dense blocks records, per block, the mean cosine
between its input and output over every token, and the last token's state at every block
boundary (the state after the last block passes through the model's final norm, as
transformers' ``hidden_states`` give it). The method's ``choose`` picks the blocks from these;
then they are deleted from the blocks' ModuleList, the rest renumbered (each attention's
``layer_idx``, which the KV cache is indexed by) and the config updated: ``num_hidden_layers`` and
every per-layer list of the old length (``layer_types`` ...), so the checkpoint saves and reloads
with plain transformers, and exports to GGUF with the smaller ``block_count``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmprune.engine.inputs import propagate
from llmprune.engine.report import LayerReport
from llmprune.math.drop import cosine_sum
from llmprune.methods.drop import removed_count
from llmprune.models import final_norm, get_blocks, prunable_linears


@dataclass(frozen=True)
class DropPlan:
    """How many blocks go, fixed before calibration."""

    blocks: int  # decoder blocks before
    remove: int  # decoder blocks removed


def plan_drop(model: nn.Module, config) -> DropPlan:
    blocks = len(get_blocks(model))
    return DropPlan(blocks, removed_count(config, blocks))


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def remove_blocks(model: nn.Module, removed: list[int]) -> None:
    """Delete blocks ``removed`` (indices of the current blocks) from ``model`` in place; renumber
    the rest and make the config describe the shallower model."""
    blocks = get_blocks(model)
    before = len(blocks)
    gone = set(removed)
    for index in sorted(gone, reverse=True):
        del blocks[index]
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    text = _text_config(model.config)
    for key, value in list(vars(text).items()):
        if isinstance(value, (list, tuple)) and len(value) == before and not key.startswith("_"):
            setattr(text, key, type(value)(v for i, v in enumerate(value) if i not in gone))
    text.num_hidden_layers = len(blocks)


class DropStrategy:
    """One block of a depth method: the dense block's outputs (the next inputs), the cosine
    between its input and output, the last token's state; the removal happens in :meth:`finish`."""

    def __init__(self, plan, model: nn.Module):
        self.config = plan.config
        self.plan = plan.drop
        self.spec = plan.method.structured
        self.model = model
        self.cosines: list[float] = []
        self.states: list[torch.Tensor] = []  # (windows, hidden) float32 on the CPU, one per boundary
        self.label = f"{self.config.method}: {self.plan.remove} of {self.plan.blocks} blocks"

    def prepare(self, blocks, inputs, place) -> None:
        self.states = [inputs.hidden[:, -1, :].float().cpu()]

    def block(self, i: int, block: nn.Module, inputs, hidden, kwargs, dev, timer, last: bool):
        with timer("stats", dev):
            out = propagate(block, hidden, kwargs, self.config.calib.batch_size, dev)
            if last:  # the stream leaving the last block, as the head reads it
                norm = final_norm(self.model)
                if norm is not None:
                    out = norm(out.to(dev)).to(out.device)
            total, count = cosine_sum(hidden, out)
            self.cosines.append(total / count)
            self.states.append(out[:, -1, :].float().cpu())
        if not last:
            inputs.hidden = out
        del out
        layers = prunable_linears(self.model, i)
        return [], {f"layers.{i}.{name}": layer.weight.data for name, layer in layers.items()
                    if isinstance(layer, nn.Linear)}

    def finish(self, blocks) -> dict:
        """Choose and remove the blocks; the report's layers (the removed blocks' weights count as
        zeros) and its ``depth`` entry."""
        removed, scores = self.spec.choose(self.cosines, self.states, self.plan.remove)
        reports = []
        for i in range(len(blocks)):
            for name, layer in prunable_linears(self.model, i).items():
                numel, gone = layer.weight.numel(), i in removed
                reports.append(LayerReport(f"layers.{i}.{name}", tuple(layer.weight.shape),
                                           numel if gone else 0, numel, {"removed_block": gone}))
        params_before = sum(p.numel() for p in self.model.parameters())
        remove_blocks(self.model, removed)
        params_after = sum(p.numel() for p in self.model.parameters())
        return {"layers": reports, "depth": {
            "method": self.config.method, "blocks_before": self.plan.blocks, "removed_blocks": removed,
            "blocks_after": self.plan.blocks - len(removed), self.spec.score_name: scores,
            "mean_cosine": self.cosines, "params_before": params_before, "params_after": params_after,
            "final_norm": final_norm(self.model) is not None}}
