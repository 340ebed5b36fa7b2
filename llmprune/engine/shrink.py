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

Both official codes prune the same fraction in every block (FLAP's "UL-UM" structure), which
keeps the config standard: ``--sparsity`` is the fraction of each decoder block's parameters
removed. ``--structure mlp`` removes MLP channels only; ``heads`` KV groups only; ``both`` the
same fraction of each block's KV groups (rounded) and the rest from the MLP.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from llmprune.engine.inputs import propagate
from llmprune.engine.report import LayerReport
from llmprune.errors import LlmpruneError
from llmprune.math.channels import group_scores, keep_top
from llmprune.methods import get_method
from llmprune.models import get_blocks, prunable_linears
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


@dataclass(frozen=True)
class StructuredPlan:
    """How much every block keeps (the same in each), fixed before calibration."""

    structure: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    keep_channels: int  # MLP intermediate channels kept
    keep_groups: int  # KV groups kept (each: one KV head and heads // kv_heads query heads)
    block_params: int  # parameters of one dense block
    removed_params: int  # parameters one block loses (before any added bias)
    bias: bool

    @property
    def target_fraction(self) -> float:
        return self.removed_params / self.block_params

    def to_dict(self) -> dict:
        return {**asdict(self), "removed_fraction": self.target_fraction}


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def plan_structured(model: nn.Module, config: PruneConfig) -> StructuredPlan:
    """Counts to keep per block, checked against the model before any calibration: the fraction
    must be reachable with what ``--structure`` removes, at least one KV group and one channel
    must stay, and the model's config must be able to describe the smaller block."""
    spec = get_method(config.method).structured
    text = _text_config(model)
    parts = block_parts(model, 0)
    lin = parts.linears
    hidden, inter = lin["gate_proj"].in_features, lin["gate_proj"].out_features
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = lin["q_proj"].out_features // heads
    if heads % kv_heads or lin["k_proj"].out_features != kv_heads * head_dim:
        raise LlmpruneError(f"attention of {heads} query and {kv_heads} key/value heads with q_proj "
                            f"{tuple(lin['q_proj'].weight.shape)} and k_proj "
                            f"{tuple(lin['k_proj'].weight.shape)} is not grouped-query attention llmprune "
                            "can split by heads")
    block_params = sum(p.numel() for p in get_blocks(model)[0].parameters())
    bias_of = {role: int(lin[role].bias is not None) for role in ROLES}
    # a row of gate, up; a column of down
    per_channel = 3 * hidden + bias_of["gate_proj"] + bias_of["up_proj"]
    q_per_kv = heads // kv_heads
    per_group = head_dim * ((2 * q_per_kv + 2) * hidden + q_per_kv * bias_of["q_proj"]
                            + bias_of["k_proj"] + bias_of["v_proj"])
    target = config.sparsity * block_params
    s = config.structure
    remove_groups = 0
    if s in ("heads", "both"):
        ideal = target / per_group if s == "heads" else config.sparsity * kv_heads
        remove_groups = _groups_to_remove(model, ideal, kv_heads, q_per_kv, config.sparsity, s)
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
    plan = StructuredPlan(s, hidden, heads, kv_heads, head_dim, inter, keep_channels,
                          kv_heads - remove_groups, block_params,
                          (inter - keep_channels) * per_channel + remove_groups * per_group, spec.bias)
    if plan.keep_channels == inter and plan.keep_groups == kv_heads:
        raise LlmpruneError(f"sparsity {config.sparsity:g} removes nothing from blocks of {block_params:,} "
                            f"parameters (one MLP channel is {per_channel:,}, rounded to multiples of "
                            f"{config.channel_multiple}): raise --sparsity or lower --channel-multiple")
    _check_expressible(model, plan)
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


def shrunk_config(config, plan: StructuredPlan):
    """A copy of the model config describing the pruned blocks."""
    new = copy.deepcopy(config)
    describe_pruned(new, plan)
    return new


def _shrink(parts: BlockParts, plan: StructuredPlan, keep_channels: torch.Tensor, keep_groups: torch.Tensor,
            mlp_mean: torch.Tensor | None, attn_mean: torch.Tensor | None) -> None:
    if plan.keep_channels < plan.intermediate:
        shrink_mlp(parts, keep_channels, mlp_mean, plan.bias)
    if plan.keep_groups < plan.kv_heads:
        shrink_attention(parts, keep_groups, plan.heads, plan.kv_heads, plan.head_dim, attn_mean, plan.bias)


def _check_expressible(model: nn.Module, plan: StructuredPlan) -> None:
    """The pruned block must be what the model class builds from the new config, or the saved
    checkpoint would not load: shrink a meta-device copy of block 0 and compare it, parameter by
    parameter, with block 0 of a meta-device model made from :func:`shrunk_config`."""
    block = copy.deepcopy(get_blocks(model)[0]).to("meta")
    mean = (torch.zeros(plan.intermediate, device="meta"),
            torch.zeros(plan.heads * plan.head_dim, device="meta"))
    _shrink(block_parts(model, 0, block), plan, torch.arange(plan.keep_channels),
            torch.arange(plan.keep_groups), *(mean if plan.bias else (None, None)))
    try:
        with torch.device("meta"):
            built = AutoModelForCausalLM.from_config(shrunk_config(model.config, plan))
        reference = {k: tuple(v.shape) for k, v in get_blocks(built)[0].state_dict().items()}
    except Exception as exc:  # noqa: BLE001 - any failure means: this config cannot describe it
        reference = {"(config)": f"{type(exc).__name__}: {exc}"}
    ours = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    if ours != reference:
        diff = sorted(set(ours.items()) ^ set(reference.items()), key=str)[0]
        model_type = getattr(model.config, "model_type", None)
        raise LlmpruneError(
            f"model type {model_type!r} cannot describe the pruned block in its config ({diff[0]}: "
            f"{'pruned' if diff in ours.items() else 'config says'} {diff[1]}): its class does not follow "
            "intermediate_size/head_dim"
            + ("/mlp_bias/attention_bias (FLAP's bias compensation); try wanda-sp" if plan.bias else "")
            + " or --structure mlp")


def _choose(parts: BlockParts, plan: StructuredPlan, moments: dict, score_fn, spec: StructuredSpec,
            config: PruneConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Channels and KV groups to keep in one block, from the method's channel scores."""
    keep_channels = torch.arange(plan.intermediate)
    keep_groups = torch.arange(plan.kv_heads)
    info: dict = {}
    if "mlp" in moments:
        scores = score_fn(parts.linears["down_proj"].weight, moments["mlp"], config)  # (intermediate,)
        keep_channels = keep_top(scores.cpu(), plan.keep_channels)
        info["down_proj"] = {"kept_channels": plan.keep_channels}
    if "attention" in moments:
        scores = score_fn(parts.linears["o_proj"].weight, moments["attention"], config)  # (heads * head_dim,)
        groups = group_scores(scores.cpu(), plan.heads, plan.kv_heads, plan.head_dim, spec.head_power)
        keep_groups = keep_top(groups, plan.keep_groups)
        info["o_proj"] = {"kept_kv_groups": keep_groups.tolist(), "group_scores": groups.tolist()}
    return keep_channels, keep_groups, info


class ShrinkStrategy:
    """One block of a shrink method: a dense pass with hooks on o_proj's and down_proj's inputs,
    the channel scores, the surgery, and (Wanda-sp) a pass of the shrunk block for the next
    block's inputs; FLAP takes the next inputs from the dense pass itself."""

    def __init__(self, plan, model: nn.Module):
        self.config = plan.config
        self.plan = plan.structured
        self.method = plan.method
        self.spec = plan.method.structured
        self.model = model
        self.watch = {"attention": "o_proj", "mlp": "down_proj"}
        if self.plan.keep_groups == self.plan.kv_heads:
            del self.watch["attention"]
        if self.plan.keep_channels == self.plan.intermediate:
            del self.watch["mlp"]
        self.params_before = 0

    def prepare(self, blocks, inputs, place) -> None:
        self.params_before = sum(p.numel() for b in blocks for p in b.parameters())

    def block(self, i: int, block: nn.Module, inputs, hidden, kwargs, dev, timer, last: bool):
        """Shrink block ``i``; returns its layer reports and the layers to quantize."""
        batch = self.config.calib.batch_size
        parts = block_parts(self.model, i)
        before = {role: (tuple(layer.weight.shape), layer.weight.numel())
                  for role, layer in parts.linears.items()}
        with timer("stats", dev):
            with input_moments({kind: parts.linears[role] for kind, role in self.watch.items()}) as moments:
                out = propagate(block, hidden, kwargs, batch, dev)  # dense outputs
        with timer("prune", dev):
            keep_channels, keep_groups, info = _choose(parts, self.plan, moments, self.method.channel_score,
                                                       self.spec, self.config)
            _shrink(parts, self.plan, keep_channels, keep_groups,
                    moments["mlp"].mean if self.spec.bias and "mlp" in moments else None,
                    moments["attention"].mean if self.spec.bias and "attention" in moments else None)
        if not last:
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
        describe_pruned(self.model.config, self.plan)
        params_after = sum(p.numel() for b in blocks for p in b.parameters())
        return {"structured": {**self.plan.to_dict(), "block_params_before": self.params_before,
                               "block_params_after": params_after,
                               "removed_fraction_achieved": 1 - params_after / self.params_before}}
