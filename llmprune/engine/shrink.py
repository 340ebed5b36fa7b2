"""The shrink strategy: remove whole MLP channels and attention heads, so the model really shrinks.

A zeroed weight in a dense tensor saves nothing. Removing an MLP intermediate channel (a row of
gate_proj and up_proj and the matching column of down_proj) or an attention head (its rows of
q/k/v_proj and columns of o_proj) makes every matrix smaller, and the result is a standard
model: a smaller ``intermediate_size``, fewer heads with an explicit ``head_dim``.

Channels are scored (by the method's ``channel_score``) on the input of the layer that reads them
(down_proj for MLP channels, o_proj for head dimensions). With grouped-query attention a
key/value head serves several query heads, so heads go by whole KV groups: a group's score is the
sum of its query heads' scores, and removing it removes the KV head and all its query heads.
A method with ``bias`` (FLAP) compensates what it removes: the removed channels' mean contribution
``W[:, removed] @ mean(x)[removed]`` becomes a bias of down_proj / o_proj (``mlp_bias`` /
``attention_bias`` in the config).

``--structure mlp`` removes MLP channels only; ``heads`` KV groups only; ``both`` the same fraction
of each block's KV groups (rounded) and the rest from the MLP. ``--width-allocation`` decides how
much each block loses:

uniform  the same in every block (both official codes' default, FLAP's "UL-UM" structure), which
         keeps the config standard: ``--sparsity`` is the fraction of each decoder block's
         parameters removed.
global   FLAP's adaptive structure search ("AL-AM"): a pass of the calibration windows through the
         dense blocks scores every block's channels and KV groups before any is pruned; one ranking
         of all of them by standardised score, weighted by the parameters each holds, decides what
         goes (``llmprune.math.channels.global_keep``; where it differs from the official code:
         ``llmprune.methods.flap``). FLAP then shrinks each block with those dense statistics;
         Wanda-sp keeps the per-block counts and chooses the channels from its usual sequential
         pass (inputs through the blocks already pruned).
owl      OWL's outlier-weighted ratios (``llmprune.math.allocation``) from the same dense pass over
         all of a block's Linears (``owl_m``, ``owl_lambda``): block i removes the fraction s_i of
         its parameters, s_i spread 2 lambda around ``--sparsity`` (mean exactly ``--sparsity``, up
         to rounding), less where the block has more outliers; a block that would pass the most
         its structure can remove gives the rest to the others.

``--sparsity`` is then the fraction of all blocks' parameters removed; every block keeps at least
one KV group and one (``channel_multiple``) MLP channel. The blocks differ, so the config cannot
describe them with one width: ``llmprune.nonuniform`` adds the per-block widths and the checkpoint's
modeling file.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from llmprune.blocks import block_device, block_output, kwargs_on
from llmprune.engine.inputs import batches, propagate
from llmprune.engine.mask import outlier_ratios
from llmprune.engine.report import LayerReport
from llmprune.errors import LlmpruneError
from llmprune.math.allocation import capped_shares, owl_sparsities
from llmprune.math.channels import (
    global_keep,
    group_scores,
    keep_top,
    standardised,
    standardised_group_scores,
)
from llmprune.methods import get_method
from llmprune.models import block_stages, get_blocks, prunable_linears, select_layers
from llmprune.nonuniform import block_layout, describe_widths, model_class
from llmprune.stats import input_moments

if TYPE_CHECKING:
    from llmprune.config import PruneConfig
    from llmprune.methods.shrink import StructuredSpec

ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class BlockParts:
    """The Linear layers structured pruning changes in one block, by role (``ROLES``)."""

    attention: nn.Module
    mlp: nn.Module
    linears: dict[str, nn.Linear]
    names: dict[str, str]  # role -> name inside the block, e.g. "self_attn.q_proj"


def block_parts(model: nn.Module, index: int, block: nn.Module | None = None) -> BlockParts:
    """q/k/v/o_proj and gate/up/down_proj of block ``index`` (or of ``block``, a copy of it),
    found among its prunable layers (llmprune.models), and the modules that hold them."""
    block = get_blocks(model)[index] if block is None else block
    found: dict[str, str] = {}
    for name, layer in prunable_linears(model, index).items():
        role = name.rpartition(".")[2]
        if role in ROLES and isinstance(layer, nn.Linear):
            if role in found:
                found = {}
                break  # two of a role (experts, cross-attention): not the layout we shrink
            found[role] = name
    missing = [role for role in ROLES if role not in found]
    attention = {found[r].rpartition(".")[0] for r in ROLES[:4] if r in found}
    mlp = {found[r].rpartition(".")[0] for r in ROLES[4:] if r in found}
    if missing or len(attention) != 1 or len(mlp) != 1:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise LlmpruneError(
            "structured pruning needs LLaMA-style blocks (one attention with q/k/v/o_proj, one gated MLP "
            f"with gate/up/down_proj); block {index} of model type {model_type!r} "
            + (f"has no {missing[0]}" if missing else "does not have them in one module each"))
    return BlockParts(block.get_submodule(attention.pop()), block.get_submodule(mlp.pop()),
                      {role: block.get_submodule(found[role]) for role in ROLES}, found)


# fields a uniform plan's report leaves out, so that its record keeps the keys it always had
_PER_BLOCK_FIELDS = ("channel_params", "group_params", "width_allocation", "blocks", "block_channels",
                     "block_groups", "allocation")


@dataclass(frozen=True)
class StructuredPlan:
    """How much each block keeps. ``width_allocation`` uniform: the same in every block
    (``keep_channels``, ``keep_groups``), fixed before calibration. global / owl: per block
    (``block_channels``, ``block_groups``), decided by the dense scoring pass before the first
    block is pruned (:func:`allocate_widths`); until then only the target is known."""

    structure: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    keep_channels: int  # MLP intermediate channels kept (per-block widths: the dense count until allocated)
    keep_groups: int  # KV groups kept (each: one KV head and heads // kv_heads query heads)
    block_params: int  # parameters of one dense block
    removed_params: int  # parameters one block loses, before any added bias (per-block widths: mean target)
    bias: bool
    channel_params: int = 0  # one MLP channel: a row of gate and up (with biases), a column of down
    group_params: int = 0  # parameters of one KV group: its q/k/v rows (with biases) and o_proj columns
    width_allocation: str = "uniform"
    blocks: int = 1
    block_channels: tuple[int, ...] | None = None  # per block (global, owl), after the scoring pass
    block_groups: tuple[int, ...] | None = None
    allocation: dict | None = None  # JSON-ready facts of the per-block allocation (OWL's outlier ratios ...)

    @property
    def uniform(self) -> bool:
        return self.width_allocation == "uniform"

    @property
    def removes_mlp(self) -> bool:
        """Whether the MLPs are shrunk: per-block widths shrink every block's (a block that keeps
        all its channels still gets FLAP's bias, so that one config switch describes all blocks)."""
        return self.keep_channels < self.intermediate if self.uniform else self.structure in ("mlp", "both")

    @property
    def removes_heads(self) -> bool:
        return self.keep_groups < self.kv_heads if self.uniform else self.structure in ("heads", "both")

    def channels(self, block: int) -> int:
        return self.keep_channels if self.block_channels is None else self.block_channels[block]

    def groups(self, block: int) -> int:
        return self.keep_groups if self.block_groups is None else self.block_groups[block]

    def removed(self, block: int) -> int:
        """Parameters block ``block`` loses (before any added bias)."""
        return ((self.intermediate - self.channels(block)) * self.channel_params
                + (self.kv_heads - self.groups(block)) * self.group_params)

    def most_removed(self, multiple: int) -> int:
        """The most one block can lose: it keeps one KV group and one ``multiple`` of MLP channels."""
        most = (self.kv_heads - 1) * self.group_params if self.structure in ("heads", "both") else 0
        if self.structure in ("mlp", "both"):
            most += (self.intermediate - _round_keep(1, multiple, self.intermediate)) * self.channel_params
        return most

    @property
    def target_fraction(self) -> float:
        return self.removed_params / self.block_params

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in _PER_BLOCK_FIELDS}
        if self.uniform or self.block_channels is None:
            return {**out, "removed_fraction": self.target_fraction}
        removed = [self.removed(i) for i in range(self.blocks)]
        return {**out, "width_allocation": self.width_allocation, "keep_channels": list(self.block_channels),
                "keep_groups": list(self.block_groups), "removed_params": removed,
                "removed_fraction": sum(removed) / (self.blocks * self.block_params),
                **(self.allocation or {})}


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _geometry(model: nn.Module, config: PruneConfig) -> StructuredPlan:
    """The dense block's counts (nothing removed yet), checked: grouped-query attention that splits
    by heads, and every block of the same shapes as block 0."""
    spec = get_method(config.method).structured
    text = _text_config(model)
    lin = block_parts(model, 0).linears
    hidden, inter = lin["gate_proj"].in_features, lin["gate_proj"].out_features
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = lin["q_proj"].out_features // heads
    if heads % kv_heads or lin["k_proj"].out_features != kv_heads * head_dim:
        raise LlmpruneError(f"attention of {heads} query and {kv_heads} key/value heads with q_proj "
                            f"{tuple(lin['q_proj'].weight.shape)} and k_proj "
                            f"{tuple(lin['k_proj'].weight.shape)} is not grouped-query attention llmprune "
                            "can split by heads")
    blocks = get_blocks(model)
    for i in range(1, len(blocks)):
        other = block_parts(model, i).linears
        for role, layer in lin.items():
            if other[role].weight.shape != layer.weight.shape:
                raise LlmpruneError(f"block {i}'s {role} is {tuple(other[role].weight.shape)}, block 0's "
                                    f"{tuple(layer.weight.shape)}: structured pruning needs blocks of equal "
                                    "widths (this model's already differ per block); prune the dense model")
    bias_of = {role: int(lin[role].bias is not None) for role in ROLES}
    # a row of gate, up; a column of down
    per_channel = 3 * hidden + bias_of["gate_proj"] + bias_of["up_proj"]
    q_per_kv = heads // kv_heads
    per_group = head_dim * ((2 * q_per_kv + 2) * hidden + q_per_kv * bias_of["q_proj"]
                            + bias_of["k_proj"] + bias_of["v_proj"])
    block_params = sum(p.numel() for p in blocks[0].parameters())
    return StructuredPlan(config.structure, hidden, heads, kv_heads, head_dim, inter, inter, kv_heads,
                          block_params, 0, spec.bias, per_channel, per_group, config.width_allocation,
                          len(blocks))


def plan_structured(model: nn.Module, config: PruneConfig) -> StructuredPlan:
    """Counts to keep per block, checked against the model before any calibration: the fraction
    must be reachable with what ``--structure`` removes, at least one KV group and one channel
    must stay, and the model's config must be able to describe the smaller block."""
    dense = _geometry(model, config)
    if not dense.uniform:
        return _plan_per_block(model, config, dense)
    inter, kv_heads = dense.intermediate, dense.kv_heads
    block_params, per_channel, per_group = dense.block_params, dense.channel_params, dense.group_params
    target = config.sparsity * block_params
    s = config.structure
    remove_groups = 0
    if s in ("heads", "both"):
        ideal = target / per_group if s == "heads" else config.sparsity * kv_heads
        remove_groups = _groups_to_remove(model, ideal, kv_heads, dense.heads // kv_heads, config.sparsity, s)
        if s == "heads" and remove_groups == 0:
            raise LlmpruneError(
                f"sparsity {config.sparsity:g} is less than half a KV group ({per_group / block_params:.1%} "
                f"of a block, {kv_heads} groups): --structure heads removes nothing; raise --sparsity or use "
                "--structure mlp|both")
    keep_channels = inter
    if s in ("mlp", "both"):
        remove = max(round((target - remove_groups * per_group) / per_channel), 0)
        keep_channels = _round_keep(inter - remove, config.channel_multiple, inter)
        if inter - remove < 1 or keep_channels < 1:
            most = (inter - 1) * per_channel + (kv_heads - 1) * per_group * (s == "both")
            raise LlmpruneError(
                f"sparsity {config.sparsity:g} would remove every MLP channel: --structure {s} can remove at "
                f"most {most / block_params:.1%} of a block; lower --sparsity"
                + (" or use --structure both" if s == "mlp" else ""))
    plan = replace(dense, keep_channels=keep_channels, keep_groups=kv_heads - remove_groups,
                   removed_params=(inter - keep_channels) * per_channel + remove_groups * per_group)
    if plan.keep_channels == inter and plan.keep_groups == kv_heads:
        raise LlmpruneError(f"sparsity {config.sparsity:g} removes nothing from blocks of {block_params:,} "
                            f"parameters (one MLP channel is {per_channel:,}, rounded to multiples of "
                            f"{config.channel_multiple}): raise --sparsity or lower --channel-multiple")
    _check_expressible(model, plan)
    return plan


def _plan_per_block(model: nn.Module, config: PruneConfig, dense: StructuredPlan) -> StructuredPlan:
    """Per-block widths: only the target is fixed here; it must be reachable with every block
    keeping one KV group and one ``channel_multiple`` of MLP channels, remove something, and the
    checkpoint's class must be able to rebuild blocks of their own widths."""
    s, how = config.structure, f"--structure {config.structure} --width-allocation {config.width_allocation}"
    most = dense.most_removed(config.channel_multiple)
    if config.sparsity * dense.block_params > most:
        raise LlmpruneError(
            f"sparsity {config.sparsity:g} is more than {how} can remove: every block keeps at least one KV "
            f"group and {_round_keep(1, config.channel_multiple, dense.intermediate)} MLP channel(s), so at "
            f"most {most / dense.block_params:.1%} of a block goes; lower --sparsity"
            + (" or use --structure both" if s != "both" else ""))
    unit = min(([dense.group_params] if s in ("heads", "both") else [])
               + ([dense.channel_params * min(config.channel_multiple, dense.intermediate)]
                  if s in ("mlp", "both") else []))
    # global spreads the whole target over all blocks; owl gives each block about the mean
    spread = dense.blocks if config.width_allocation == "global" else 1
    if 2 * config.sparsity * dense.block_params * spread < unit:
        raise LlmpruneError(f"sparsity {config.sparsity:g} is less than half of the smallest unit {how} "
                            f"removes ({unit:,} parameters, blocks of {dense.block_params:,}): it removes "
                            "nothing; raise --sparsity"
                            + (" or lower --channel-multiple" if s != "heads" else ""))
    plan = replace(dense, removed_params=round(config.sparsity * dense.block_params))
    _check_rebuildable(model, plan)
    return plan


def _groups_to_remove(model: nn.Module, ideal: float, kv_heads: int, q_per_kv: int, sparsity: float,
                      structure: str) -> int:
    """KV groups to remove: the count nearest ``ideal`` (fewer on a tie) whose head count the
    model's config class accepts (transformers' LlamaConfig wants hidden_size to be a multiple of
    num_attention_heads, even with an explicit head_dim). At least one group stays."""
    if structure == "heads" and round(ideal) >= kv_heads:
        raise LlmpruneError(
            f"sparsity {sparsity:g} with --structure heads removes {round(ideal)} of {kv_heads} KV groups "
            f"and would leave no KV group: heads alone can remove at most {kv_heads - 1} of them; use "
            "--structure both or a lower sparsity")
    refused = []
    for remove in sorted(range(kv_heads), key=lambda g: (abs(g - ideal), g)):
        problem = _config_problem(model.config, (kv_heads - remove) * q_per_kv, kv_heads - remove)
        if problem is None:
            return remove
        refused.append(f"{remove}: {problem}")
    raise LlmpruneError("no number of KV groups to remove gives a config the model class accepts "
                        f"({refused[0]})")


def _config_problem(config, heads: int, kv_heads: int) -> str | None:
    """What the config class says against ``heads`` query and ``kv_heads`` KV heads (None: fine)."""
    new = copy.deepcopy(config)
    text = new.get_text_config() if hasattr(new, "get_text_config") else new
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = heads, kv_heads, head_dim
    try:
        getattr(new, "validate", lambda: None)()
    except Exception as exc:  # noqa: BLE001 - the class's own validators (strict dataclasses)
        return str(getattr(exc, "__cause__", None) or exc).strip().splitlines()[-1]
    return None


def _round_keep(keep: int, multiple: int, limit: int) -> int:
    """``keep`` rounded to the nearest multiple of ``multiple`` (at least one multiple, at most ``limit``)."""
    if multiple <= 1 or limit < multiple:
        return keep
    return min(max(multiple, int(round(keep / multiple)) * multiple), limit)



def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding exactly these tensors (no initialisation)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return layer


def _bias(layer: nn.Linear, rows: torch.Tensor, add: bool) -> torch.Tensor | None:
    """``layer``'s bias restricted to ``rows``; zeros where the config's bias switch adds one."""
    if layer.bias is not None:
        return layer.bias.detach()[rows]
    if add:
        return torch.zeros(len(rows), dtype=layer.weight.dtype, device=layer.weight.device)
    return None


def _compensation(layer: nn.Linear, removed: torch.Tensor,
                  mean: torch.Tensor | None, add: bool) -> torch.Tensor | None:
    """The output layer's new bias: its own, plus (FLAP) the removed inputs' mean contribution."""
    bias = layer.bias.detach().float() if layer.bias is not None else None
    if mean is not None and len(removed):
        # (out,)
        extra = layer.weight.detach().float()[:, removed] @ mean.float()[removed].to(layer.weight.device)
        bias = extra if bias is None else bias + extra
    if bias is None and add:
        bias = torch.zeros(layer.out_features, device=layer.weight.device)
    return None if bias is None else bias.to(layer.weight.dtype)


def _complement(keep: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep] = False
    return torch.nonzero(mask).flatten()


def shrink_mlp(parts: BlockParts, keep: torch.Tensor,
               mean: torch.Tensor | None = None, bias: bool = False) -> None:
    """Keep only MLP channels ``keep`` (ascending indices): rows of gate/up, columns of down.
    ``mean`` (intermediate,): the inputs' mean, whose removed part becomes down_proj's bias;
    ``bias``: give every MLP Linear a bias (the config's ``mlp_bias`` switch covers all three)."""
    lin = parts.linears
    dev = lin["gate_proj"].weight.device
    rows, removed = keep.to(dev), _complement(keep, lin["gate_proj"].out_features).to(dev)
    down = lin["down_proj"]
    new = {role: _linear(lin[role].weight.detach()[rows], _bias(lin[role], rows, bias))
           for role in ("gate_proj", "up_proj")}
    new["down_proj"] = _linear(down.weight.detach()[:, rows], _compensation(down, removed, mean, bias))
    for role, layer in new.items():
        setattr(parts.mlp, role, layer)
    if hasattr(parts.mlp, "intermediate_size"):
        parts.mlp.intermediate_size = len(keep)


def head_rows(groups: torch.Tensor, per_group: int, head_dim: int) -> torch.Tensor:
    """Row indices (ascending) of the heads of KV groups ``groups``, ``per_group`` heads each:
    query rows with per_group = heads // kv_heads, key/value rows with per_group = 1."""
    heads = (groups[:, None] * per_group + torch.arange(per_group)).flatten()  # (groups * per_group,)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def shrink_attention(parts: BlockParts, keep_groups: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                     mean: torch.Tensor | None = None, bias: bool = False) -> None:
    """Keep only KV groups ``keep_groups`` (ascending): their KV heads and query heads, rows of
    q/k/v_proj and columns of o_proj. ``mean`` (heads * head_dim,): o_proj's input mean, whose
    removed part becomes o_proj's bias; ``bias``: give q/k/v/o a bias (``attention_bias``)."""
    lin = parts.linears
    dev = lin["q_proj"].weight.device
    q_per_kv = heads // kv_heads
    q_rows = head_rows(keep_groups.cpu(), q_per_kv, head_dim)
    removed = _complement(q_rows, heads * head_dim).to(dev)
    q_rows, kv_rows = q_rows.to(dev), head_rows(keep_groups.cpu(), 1, head_dim).to(dev)
    o = lin["o_proj"]
    new = {"q_proj": _linear(lin["q_proj"].weight.detach()[q_rows], _bias(lin["q_proj"], q_rows, bias))}
    for role in ("k_proj", "v_proj"):
        new[role] = _linear(lin[role].weight.detach()[kv_rows], _bias(lin[role], kv_rows, bias))
    new["o_proj"] = _linear(o.weight.detach()[:, q_rows], _compensation(o, removed, mean, bias))
    for role, layer in new.items():
        setattr(parts.attention, role, layer)
    kept = len(keep_groups)
    for attr, value in (("num_heads", kept * q_per_kv), ("num_attention_heads", kept * q_per_kv),
                        ("num_key_value_heads", kept), ("num_kv_heads", kept)):
        if isinstance(getattr(parts.attention, attr, None), int):
            setattr(parts.attention, attr, value)


def describe_pruned(config, plan: StructuredPlan) -> None:
    """Make the model config (in place) describe the pruned blocks: the attention and MLP
    modules hold a reference to this very object."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    text.intermediate_size = plan.keep_channels
    text.num_attention_heads = plan.keep_groups * (plan.heads // plan.kv_heads)
    text.num_key_value_heads = plan.keep_groups
    text.head_dim = plan.head_dim
    if plan.bias:
        if plan.keep_channels < plan.intermediate:
            text.mlp_bias = True
        if plan.keep_groups < plan.kv_heads:
            text.attention_bias = True


def describe_per_block(model: nn.Module, plan: StructuredPlan, config=None) -> None:
    """Per-block widths: ``config`` (default: the model's, in place) keeps its dense counts and gets
    each block's widths and where its Linears are (``llmprune.nonuniform``); FLAP's bias switches
    cover every block, as every block of a shrunk kind got its bias."""
    config = model.config if config is None else config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if plan.bias:
        if plan.removes_mlp:
            text.mlp_bias = True
        if plan.removes_heads:
            text.attention_bias = True
    groups = [plan.groups(i) for i in range(plan.blocks)]
    describe_widths(config, block_layout(model, get_blocks(model), block_parts(model, 0).names),
                    [plan.channels(i) for i in range(plan.blocks)],
                    [g * (plan.heads // plan.kv_heads) for g in groups], groups, plan.head_dim)


def shrunk_config(config, plan: StructuredPlan):
    """A copy of the model config describing the pruned blocks."""
    new = copy.deepcopy(config)
    describe_pruned(new, plan)
    return new


def _shrink(parts: BlockParts, plan: StructuredPlan, keep_channels: torch.Tensor, keep_groups: torch.Tensor,
            mlp_mean: torch.Tensor | None, attn_mean: torch.Tensor | None) -> None:
    if plan.removes_mlp:
        shrink_mlp(parts, keep_channels, mlp_mean, plan.bias)
    if plan.removes_heads:
        shrink_attention(parts, keep_groups, plan.heads, plan.kv_heads, plan.head_dim, attn_mean, plan.bias)


def _shrunk_copy(model: nn.Module, plan: StructuredPlan, channels: int, groups: int) -> dict:
    """Parameter shapes of a meta-device copy of block 0 shrunk to ``channels`` / ``groups``."""
    block = copy.deepcopy(get_blocks(model)[0]).to("meta")
    mean = (torch.zeros(plan.intermediate, device="meta"),
            torch.zeros(plan.heads * plan.head_dim, device="meta"))
    _shrink(block_parts(model, 0, block), plan, torch.arange(channels), torch.arange(groups),
            *(mean if plan.bias else (None, None)))
    return {k: tuple(v.shape) for k, v in block.state_dict().items()}


def _built_block(build) -> dict:
    """Parameter shapes of block 0 of the meta-device model ``build()`` makes (or why it failed)."""
    try:
        with torch.device("meta"):
            built = build()
        return {k: tuple(v.shape) for k, v in get_blocks(built)[0].state_dict().items()}
    except LlmpruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means: this config cannot describe it
        return {"(config)": f"{type(exc).__name__}: {exc}"}


def _first_difference(ours: dict, reference: dict) -> str:
    diff = sorted(set(ours.items()) ^ set(reference.items()), key=str)[0]
    return f"{diff[0]}: {'pruned' if diff in ours.items() else 'config says'} {diff[1]}"


def _check_expressible(model: nn.Module, plan: StructuredPlan) -> None:
    """The pruned block must be what the model class builds from the new config, or the saved
    checkpoint would not load: shrink a meta-device copy of block 0 and compare it, parameter by
    parameter, with block 0 of a meta-device model made from :func:`shrunk_config`."""
    ours = _shrunk_copy(model, plan, plan.keep_channels, plan.keep_groups)
    reference = _built_block(lambda: AutoModelForCausalLM.from_config(shrunk_config(model.config, plan)))
    if ours != reference:
        model_type = getattr(model.config, "model_type", None)
        raise LlmpruneError(
            f"model type {model_type!r} cannot describe the pruned block in its config "
            f"({_first_difference(ours, reference)}): its class does not follow "
            "intermediate_size/head_dim"
            + ("/mlp_bias/attention_bias (FLAP's bias compensation); try wanda-sp" if plan.bias else "")
            + " or --structure mlp")


def _check_rebuildable(model: nn.Module, plan: StructuredPlan) -> None:
    """Per-block widths: the checkpoint's class (the model's transformers class, its Linears rebuilt
    at each block's widths by ``llmprune.nonuniform_modeling``) must build the block the surgery
    makes. Probed on block 0, on the meta device, with about half of what the structure removes."""
    channels = max(plan.intermediate // 2, 1) if plan.removes_mlp else plan.intermediate
    groups = max(plan.kv_heads // 2, 1) if plan.removes_heads else plan.kv_heads
    probe = replace(plan, block_channels=(channels,) * plan.blocks, block_groups=(groups,) * plan.blocks)
    ours = _shrunk_copy(model, probe, channels, groups)
    config = copy.deepcopy(model.config)
    describe_per_block(model, probe, config)
    reference = _built_block(lambda: model_class(config)._from_config(config))
    if ours != reference:
        raise LlmpruneError(
            f"model type {getattr(model.config, 'model_type', None)!r} cannot rebuild blocks of their own "
            f"widths ({_first_difference(ours, reference)}): use --width-allocation uniform")


def _choose(parts: BlockParts, plan: StructuredPlan, index: int, moments: dict, score_fn,
            spec: StructuredSpec, config: PruneConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Channels and KV groups to keep in block ``index``, from the method's channel scores."""
    keep_channels = torch.arange(plan.intermediate)
    keep_groups = torch.arange(plan.kv_heads)
    info: dict = {}
    if "mlp" in moments:
        scores = score_fn(parts.linears["down_proj"].weight, moments["mlp"], config)  # (intermediate,)
        keep_channels = keep_top(scores.cpu(), plan.channels(index))
        info["down_proj"] = {"kept_channels": plan.channels(index)}
    if "attention" in moments:
        scores = score_fn(parts.linears["o_proj"].weight, moments["attention"], config)  # (heads * head_dim,)
        groups = group_scores(scores.cpu(), plan.heads, plan.kv_heads, plan.head_dim, spec.head_power)
        keep_groups = keep_top(groups, plan.groups(index))
        info["o_proj"] = {"kept_kv_groups": keep_groups.tolist(), "group_scores": groups.tolist()}
    return keep_channels, keep_groups, info


def _watched(plan: StructuredPlan) -> dict[str, str]:
    """The layers whose inputs are scored: o_proj's for KV groups, down_proj's for MLP channels."""
    return {kind: role for kind, role, on in (("attention", "o_proj", plan.removes_heads),
                                              ("mlp", "down_proj", plan.removes_mlp)) if on}


# ---- per-block widths: the dense scoring pass before any block is pruned ------------------------

@torch.no_grad()
def _dense_scores(model: nn.Module, plan: StructuredPlan, blocks, inputs, place, method,
                  config: PruneConfig, keep_inputs: bool) -> tuple[list[dict], list[dict]]:
    """The calibration windows through the unpruned blocks (FLAP's statistics pass): per block, the
    input moments of o_proj / down_proj and the method's channel scores from them. ``keep_inputs``:
    work on a copy, so that block 0's inputs stay for the pruning pass (Wanda-sp); else in place."""
    hidden = inputs.hidden.clone() if keep_inputs else inputs.hidden
    watch = _watched(plan)
    all_moments, all_scores = [], []
    for i in range(len(blocks)):
        with place.use(i, write=False) as block:
            dev = block_device(block)
            kwargs = kwargs_on(inputs.kwargs, dev)
            lin = block_parts(model, i, block).linears
            with input_moments({kind: lin[role] for kind, role in watch.items()}) as moments:
                for batch in batches(hidden, config.calib.batch_size):
                    hidden[batch] = block_output(block(hidden[batch].to(dev), **kwargs)).to(hidden.device)
            all_scores.append({kind: method.channel_score(lin[role].weight, moments[kind], config).cpu()
                               for kind, role in watch.items()})
            all_moments.append(moments)
    return all_moments, all_scores


def _global_widths(plan: StructuredPlan, scores: list[dict], head_power: int,
                   config: PruneConfig) -> tuple[list[int], list[int]]:
    """FLAP's global search over the dense scores; each block's MLP count then rounded to
    ``channel_multiple``."""
    mlp = [standardised(s["mlp"]) for s in scores] if plan.removes_mlp else None
    groups = ([standardised_group_scores(s["attention"], plan.heads, plan.kv_heads, plan.head_dim, head_power)
               for s in scores] if plan.removes_heads else None)
    channels, kept_groups = global_keep(mlp, groups, plan.channel_params, plan.group_params,
                                        config.sparsity * plan.block_params * plan.blocks)
    channels = ([_round_keep(c, config.channel_multiple, plan.intermediate) for c in channels] if mlp
                else [plan.intermediate] * plan.blocks)
    return channels, (kept_groups if groups else [plan.kv_heads] * plan.blocks)


def _block_counts(plan: StructuredPlan, fraction: float, multiple: int) -> tuple[int, int]:
    """Kept MLP channels and KV groups of a block that loses ``fraction`` of its parameters, by the
    uniform plan's arithmetic (``both``: that fraction of its KV groups, rounded, the rest from the
    MLP), held to one KV group and one ``multiple`` of channels."""
    target = fraction * plan.block_params
    remove_groups = 0
    if plan.structure in ("heads", "both"):
        ideal = target / plan.group_params if plan.structure == "heads" else fraction * plan.kv_heads
        remove_groups = min(max(round(ideal), 0), plan.kv_heads - 1)
    channels = plan.intermediate
    if plan.structure in ("mlp", "both"):
        remove = max(round((target - remove_groups * plan.group_params) / plan.channel_params), 0)
        channels = _round_keep(max(plan.intermediate - remove, 1), multiple, plan.intermediate)
    return channels, plan.kv_heads - remove_groups


def _owl_widths(model: nn.Module, plan: StructuredPlan, blocks, inputs, place,
                config: PruneConfig) -> tuple[list[int], list[int], dict]:
    """OWL's block fractions from the outlier ratios of each block's Wanda scores (all its Linears,
    the dense pass of ``llmprune.engine.mask``), held to what a block can lose, then counts."""
    layers = select_layers(model)
    plans = [SimpleNamespace(layers=found, stages=block_stages(model, i, found))  # engine.plan's BlockPlan
             for i, found in enumerate(layers)]
    ratios = outlier_ratios(blocks, plans, inputs, config, None, place)
    wanted = owl_sparsities(ratios, config.sparsity, config.owl_lambda)
    most = plan.most_removed(config.channel_multiple) / plan.block_params
    fractions = capped_shares(wanted, [most] * plan.blocks)
    counts = [_block_counts(plan, f, config.channel_multiple) for f in fractions]
    info = {"outlier_ratio": ratios, "block_target": fractions}
    return [c for c, _ in counts], [g for _, g in counts], info


def allocate_widths(model: nn.Module, plan: StructuredPlan, blocks, inputs, place, method,
                    config: PruneConfig) -> tuple[StructuredPlan, list[dict] | None]:
    """Per-block widths (global, owl) from a pass of the calibration windows through the dense
    blocks, before any block is pruned. Returns the plan holding them and, for a method whose
    statistics come from the dense model (FLAP, global), each block's input moments of that pass,
    which the surgery then uses instead of a second pass."""
    t0 = time.perf_counter()
    moments = None
    if plan.width_allocation == "owl":
        channels, groups, info = _owl_widths(model, plan, blocks, inputs, place, config)
    else:
        dense = method.structured.dense_statistics
        moments, scores = _dense_scores(model, plan, blocks, inputs, place, method, config,
                                        keep_inputs=not dense)
        channels, groups = _global_widths(plan, scores, method.structured.head_power, config)
        info, moments = {}, (moments if dense else None)
    if channels == [plan.intermediate] * plan.blocks and groups == [plan.kv_heads] * plan.blocks:
        raise LlmpruneError(f"--width-allocation {plan.width_allocation} at sparsity {config.sparsity:g} "
                            "keeps every channel and KV group after rounding: raise --sparsity or lower "
                            "--channel-multiple")
    info["allocation_seconds"] = time.perf_counter() - t0
    return replace(plan, block_channels=tuple(channels), block_groups=tuple(groups), allocation=info), moments


class ShrinkStrategy:
    """One block of a shrink method: a dense pass with hooks on o_proj's and down_proj's inputs,
    the channel scores, the surgery, and (Wanda-sp) a pass of the shrunk block for the next
    block's inputs; FLAP takes the next inputs from the dense pass itself. Per-block widths first
    run the dense scoring pass over all blocks (:func:`allocate_widths`); FLAP then reuses its
    statistics and needs no pass of its own per block."""

    def __init__(self, plan, model: nn.Module):
        self.config = plan.config
        self.plan = plan.structured
        self.method = plan.method
        self.spec = plan.method.structured
        self.model = model
        self.watch = _watched(self.plan)
        self.params_before = 0
        self.dense: list[dict] | None = None  # per block, the scoring pass's input moments (FLAP, global)

    def prepare(self, blocks, inputs, place) -> None:
        self.params_before = sum(p.numel() for b in blocks for p in b.parameters())
        if not self.plan.uniform:
            self.plan, self.dense = allocate_widths(self.model, self.plan, blocks, inputs, place, self.method,
                                                    self.config)

    def block(self, i: int, block: nn.Module, inputs, hidden, kwargs, dev, timer, last: bool):
        """Shrink block ``i``; returns its layer reports and the layers to quantize."""
        batch = self.config.calib.batch_size
        parts = block_parts(self.model, i)
        before = {role: (tuple(layer.weight.shape), layer.weight.numel())
                  for role, layer in parts.linears.items()}
        out = None
        if self.dense is not None:
            moments = self.dense[i]
        else:
            watched = {kind: parts.linears[role] for kind, role in self.watch.items()}
            with timer("stats", dev), input_moments(watched) as moments:
                out = propagate(block, hidden, kwargs, batch, dev)  # dense outputs
        with timer("prune", dev):
            keep_channels, keep_groups, info = _choose(parts, self.plan, i, moments,
                                                       self.method.channel_score, self.spec, self.config)
            _shrink(parts, self.plan, keep_channels, keep_groups,
                    moments["mlp"].mean if self.spec.bias and "mlp" in moments else None,
                    moments["attention"].mean if self.spec.bias and "attention" in moments else None)
        if not last and out is not None:
            with timer("propagate", dev):
                inputs.hidden = (out if self.spec.dense_statistics
                                 else propagate(block, hidden, kwargs, batch, dev))
        del out
        parts = block_parts(self.model, i)
        reports = []
        for role, layer in parts.linears.items():
            shape, numel = before[role]
            reports.append(LayerReport(f"layers.{i}.{parts.names[role]}", tuple(layer.weight.shape),
                                       numel - layer.weight.numel(), numel,
                                       {"original_shape": list(shape), **info.get(role, {})}))
        return reports, {f"layers.{i}.{parts.names[role]}": layer.weight.data
                         for role, layer in parts.linears.items()}

    def finish(self, blocks) -> dict:
        """The model config made to describe the shrunk blocks; the report's ``structured`` entry."""
        if self.plan.uniform:
            describe_pruned(self.model.config, self.plan)
        else:
            describe_per_block(self.model, self.plan)
        params_after = sum(p.numel() for b in blocks for p in b.parameters())
        return {"structured": {**self.plan.to_dict(), "block_params_before": self.params_before,
                               "block_params_after": params_after,
                               "removed_fraction_achieved": 1 - params_after / self.params_before}}
