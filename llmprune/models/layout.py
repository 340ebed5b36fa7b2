"""The one place that knows model layouts: found from the model, not listed.

* **Blocks**: the ModuleList of repeated decoder layers under the base model (``model.layers``,
  ``model.decoder.layers``, ``transformer.h``, ``gpt_neox.layers``...): the list of
  ``num_hidden_layers`` modules holding Linear layers, nearest the input embeddings.
* **Prunable layers** of a block: every ``nn.Linear`` in it (and GPT-2's transposed ``Conv1D``),
  and each expert's matrix of a fused 3-D expert parameter (transformers 5 stores MoE experts as
  ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I)). Never the embeddings or lm_head,
  never an MoE router.
* **Groups and stages**: one forward over :data:`PROBE_TOKENS` tokens with a pre-hook on every
  prunable layer. Layers whose input is the very same tensor form a *group* (q/k/v, gate/up):
  statistics are collected once per group. The order of first calls gives the *stages* of
  true-sequential pruning; all experts' first projections form one stage, their second one.

Discovery runs once per model and is cached. Hand-written :data:`OVERRIDES` (``Family``: blocks
path and stages, by ``model_type``) remain for models where discovery cannot work. Layer names
are relative to the block; users see ``layers.{i}.{name}`` (an expert's matrix of a fused
parameter is ``mlp.experts.{e}.gate_up_proj``, as if the experts were modules).
"""

from __future__ import annotations

import fnmatch
import re
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from llmprune.errors import LlmpruneError

MAX_DEFAULT_SEQLEN = 4096

PROBE_TOKENS = 16  # the discovery forward: enough for every layer to be called once
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")  # Linear routers inside an MoE block
KINDS = ("attention", "mlp")


# ---------------------------------------------------------------- hand-written overrides

@dataclass(frozen=True)
class Family:
    """A hand-written layout, for a model type where discovery cannot work.

    ``blocks``: attribute path from the CausalLM to the ModuleList of decoder blocks.
    ``stages``: prunable Linear names inside a block, grouped by shared input, in the order the
    block computes them (q/k/v, then o, then gate/up, then down).
    """

    name: str
    blocks: str
    stages: tuple[tuple[str, ...], ...]

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for stage in self.stages for name in stage)


OVERRIDES: dict[str, Family] = {}  # model_type -> Family; empty: every tested family is discovered


def register_override(model_types: tuple[str, ...], family: Family) -> None:
    for model_type in model_types:
        if model_type in OVERRIDES:
            raise ValueError(f"model type {model_type!r} registered twice")
        OVERRIDES[model_type] = family


# ---------------------------------------------------------------- what discovery finds

@dataclass(frozen=True)
class FusedExperts:
    """Experts stored as 3-D parameters by transformers 5 (``@use_experts_implementation``).

    ``first`` is ``gate_up_proj`` (gated) or ``up_proj``, (E, out, in), or (E, in, out) when
    ``transposed``; ``second`` is ``down_proj``. The experts module is called as
    ``experts(hidden_states (T, H), top_k_index (T, k), top_k_weights)``.
    """

    path: str  # of the experts module inside the block
    num_experts: int
    first: str
    second: str
    transposed: bool
    gated: bool
    bias: bool

    def name(self, expert: int, param: str) -> str:
        return f"{self.path}.{expert}.{param}"

    @staticmethod
    def routing(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden (T, H), expert indices (T, k))`` from the experts module's call."""
        x = args[0] if args else kwargs["hidden_states"]
        if len(args) > 1:
            index = args[1]
        else:
            index = next(kwargs[k] for k in ("top_k_index", "router_indices", "selected_experts")
                         if k in kwargs)
        x = x.reshape(-1, x.shape[-1])
        return x, index.reshape(x.shape[0], -1)

    def hidden(self, module: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        """The input of ``expert``'s second projection for its routed rows ``x`` (n, H): as
        transformers' own ``batched_mm`` computes it (the model's ``_apply_gate`` or ``act_fn``)."""
        w = getattr(module, self.first)[expert]
        h = x @ w if self.transposed else nn.functional.linear(x, w)  # (n, out)
        if self.bias:
            h = h + getattr(module, f"{self.first}_bias")[expert]
        return module._apply_gate(h) if self.gated else module.act_fn(h)


class WeightView:
    """The (out, in) weight of a prunable layer that is not a plain ``nn.Linear``: a GPT-2
    ``Conv1D`` (stored transposed), one expert of a fused 3-D parameter, or an expert Linear.

    It has the parts of ``nn.Linear`` the pipeline uses (``weight``, ``bias``, ``in_features``,
    ``out_features``); ``weight`` is a view, so writing into it writes the model's parameter.
    ``module`` is what calibration hooks: the module whose input this layer reads (for a fused
    expert, the experts module, with ``fused`` and ``role`` saying how to split its input).
    """

    def __init__(self, module: nn.Module, param: str = "weight", expert: int | None = None,
                 transposed: bool = False, routed: bool = False, fused: FusedExperts | None = None,
                 role: str | None = None):
        self.module, self.param, self.expert = module, param, expert
        self.transposed, self.routed, self.fused, self.role = transposed, routed, fused, role

    def _matrix(self, param: str) -> torch.Tensor | None:
        tensor = getattr(self.module, param, None)
        if tensor is None:
            return None
        tensor = tensor.data if self.expert is None else tensor.data[self.expert]
        return tensor.t() if self.transposed and tensor.dim() == 2 else tensor

    @property
    def weight(self) -> torch.Tensor:
        return self._matrix(self.param)  # (out, in)

    @property
    def bias(self) -> torch.Tensor | None:
        return self._matrix(f"{self.param}_bias" if self.fused is not None else "bias")

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __repr__(self) -> str:
        return (f"WeightView({type(self.module).__name__}.{self.param}, expert={self.expert}, "
                f"shape={tuple(self.weight.shape)})")


@dataclass(frozen=True)
class LayerRef:
    """How to reach one prunable layer from its block."""

    module: str  # path of the module inside the block
    kind: str  # "attention" | "mlp"
    param: str = "weight"
    expert: int | None = None  # routed expert index (None: every token reaches it)
    transposed: bool = False
    fused: FusedExperts | None = None
    role: str | None = None  # "first" | "second" for a fused expert

    @property
    def routed(self) -> bool:
        return self.expert is not None


@dataclass(frozen=True)
class BlockLayout:
    """One block's prunable layers, in stage order.

    ``stages``: tuples of groups (tuples of layer names reading one input); calibrating a stage
    needs only the stages before it. ``skipped``: Linear layers the probe never reached (not
    pruned); ``routers``: MoE routers (never pruned); ``fixed``: other weight matrices.
    """

    stages: tuple[tuple[tuple[str, ...], ...], ...]
    refs: dict[str, LayerRef] = field(hash=False)
    routers: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    fixed: tuple[str, ...] = ()
    fused: tuple[FusedExperts, ...] = ()

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        return tuple(group for stage in self.stages for group in stage)

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)


@dataclass(frozen=True)
class Layout:
    """What discovery (or an override) found for a model."""

    model_type: str | None
    blocks: str  # attribute path of the ModuleList of decoder blocks
    source: str  # "discovered" | "override"
    block_layouts: tuple[BlockLayout, ...]


_BLOCK_PATHS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
_LAYOUTS: "weakref.WeakKeyDictionary[nn.Module, Layout]" = weakref.WeakKeyDictionary()


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    return getattr(config, "get_text_config", lambda: config)() if config is not None else None


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def _is_prunable(module: nn.Module, conv1d: type | None) -> bool:
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((name for name, m in model.named_modules() if m is target), None)


# ---------------------------------------------------------------- blocks

def _find_blocks(model: nn.Module) -> str:
    """Path of the decoder blocks: a ModuleList of ``num_hidden_layers`` modules holding prunable
    layers; among several, the one under the base model (the input embeddings' parent), then
    the shallowest (an MoE's expert list is deeper than the blocks)."""
    text = _text_config(model)
    wanted = next((getattr(text, k) for k in ("num_hidden_layers", "n_layer", "num_layers")
                   if isinstance(getattr(text, k, None), int)), None)
    try:
        embeddings = _path_of(model, model.get_input_embeddings())
    except (AttributeError, NotImplementedError):
        embeddings = None
    base = embeddings.rpartition(".")[0] if embeddings else ""
    conv1d = _conv1d_type()
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or not name:
            continue
        if not any(_is_prunable(m, conv1d) or _is_fused(m) for m in module[0].modules()):
            continue
        under_base = name.startswith(base + ".") if base else True
        candidates.append(((len(module) != wanted, not under_base, name.count(".")), name))
    if not candidates:
        counted = f" of {wanted} entries" if wanted else ""
        raise LlmpruneError(
            f"no decoder blocks found in {type(model).__name__} (model type {_model_type(model)!r}): "
            f"searched every ModuleList{counted} holding Linear layers (model.layers, model.decoder.layers, "
            "transformer.h, ...) and found none; add an entry to llmprune.models.OVERRIDES")
    return min(candidates)[1]


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of ``model``, in order (found once, then cached)."""
    path = _BLOCK_PATHS.get(model)
    if path is None:
        override = OVERRIDES.get(_model_type(model))
        path = override.blocks if override is not None else _find_blocks(model)
        _BLOCK_PATHS[model] = path
    return model.get_submodule(path)


FINAL_NORMS = ("norm", "final_layernorm", "ln_f", "norm_f", "final_norm")


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last decoder block (a sibling of the blocks' ModuleList named
    one of ``FINAL_NORMS``); None when the model has none there."""
    get_blocks(model)  # finds and caches the blocks' path
    path = _BLOCK_PATHS[model].rpartition(".")[0]
    parent = model.get_submodule(path) if path else model
    for name in FINAL_NORMS:
        module = getattr(parent, name, None)
        if isinstance(module, nn.Module) and not list(module.children()):
            return module
    return None


# ---------------------------------------------------------------- experts

def _is_fused(module: nn.Module) -> bool:
    """A module keeping experts as fused parameters: 3-D weights, or an ``*Expert*`` class
    whose 2-D weights are not Linear modules (e.g. DBRX's (E*I, H) matrices)."""
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Embedding)):  # a Mamba mixer's conv, not experts
        return False
    own = list(module.parameters(recurse=False))
    if any(p.dim() == 3 for p in own):
        return True
    return "expert" in type(module).__name__.lower() and any(p.dim() == 2 for p in own)


def _fused_layout(name: str, module: nn.Module, where: str) -> FusedExperts:
    """The layout of transformers' fused experts; anything else cannot be split: named."""
    shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in module.named_parameters(recurse=False))
    gated = getattr(module, "has_gate", None)
    first = "gate_up_proj" if gated else "up_proj"
    count = getattr(module, "num_experts", None)
    params = [getattr(module, n, None) for n in (first, "down_proj")]
    ok = (gated is not None and hasattr(module, "is_transposed") and isinstance(count, int)
          and all(isinstance(p, torch.Tensor) and p.dim() == 3 and p.shape[0] == count for p in params))
    if ok:
        transposed = bool(module.is_transposed)
        (_, a, b), (_, c, d) = params[0].shape, params[1].shape
        out1, in1, out2, in2 = (b, a, d, c) if transposed else (a, b, c, d)
        ok = out2 == in1 and in2 == (out1 // 2 if gated else out1) and (not gated or out1 % 2 == 0)
    if not ok:
        raise LlmpruneError(
            f"{where}.{name} ({type(module).__name__}: {shapes}) stores experts in a fused layout llmprune "
            "cannot split into per-expert matrices (it reads transformers' gate_up_proj/up_proj and "
            "down_proj of shape (num_experts, out, in) with has_gate/is_transposed); to prune only the "
            "model's Linear layers, add an entry to llmprune.models.OVERRIDES")
    bias = bool(getattr(module, "has_bias", False))
    return FusedExperts(name, count, first, "down_proj", transposed, bool(gated), bias)


# ---------------------------------------------------------------- probing

class _ProbeDone(Exception):
    """Ends the discovery forward after the last block."""


def _input_key(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)


@torch.no_grad()
def _probe(model: nn.Module, blocks: nn.ModuleList,
           hooked: list[dict[str, nn.Module]]) -> list[dict[str, tuple]]:
    """Per block, ``{name: key of its first input}`` in the order of first calls."""
    calls: list[dict[str, tuple]] = [{} for _ in blocks]
    keep: list[torch.Tensor] = []  # every probed input stays alive, so no two share an address

    def make_hook(i: int, name: str):
        def hook(_module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)
            if name not in calls[i] and isinstance(x, torch.Tensor):
                keep.append(x)
                calls[i][name] = _input_key(x)
        return hook

    def done(*_):
        raise _ProbeDone

    handles = [blocks[-1].register_forward_hook(done)]
    try:
        for i, modules in enumerate(hooked):
            for name, module in modules.items():
                handles.append(module.register_forward_pre_hook(make_hook(i, name), with_kwargs=True))
        embed = model.get_input_embeddings()
        vocab = embed.num_embeddings if hasattr(embed, "num_embeddings") else embed.weight.shape[0]
        tokens = min(PROBE_TOKENS, max_positions(model) or PROBE_TOKENS)
        device = next(embed.parameters()).device
        ids = ((torch.arange(tokens) * 7919 + 11) % vocab).unsqueeze(0).to(device)
        try:
            model(input_ids=ids, use_cache=False)
        except _ProbeDone:
            pass
        except Exception as exc:  # noqa: BLE001 - any failure means the layout cannot be probed
            raise LlmpruneError(
                f"could not run {type(model).__name__} on a {tokens}-token probe to find the order of its "
                f"layers ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}); add an entry to "
                "llmprune.models.OVERRIDES") from None
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _kind(block_modules: dict[str, nn.Module], name: str) -> str:
    """"attention" when the layer sits in an attention module (by class or attribute name)."""
    parts = name.split(".")
    for k in range(1, len(parts)):
        module = block_modules.get(".".join(parts[:k]))
        label = parts[k - 1].lower() + " " + (type(module).__name__.lower() if module is not None else "")
        if "attn" in label or "attention" in label:
            return "attention"
    return "mlp"


EXPERT_INDEX = re.compile(r"\.\d+\.")  # the expert number in a layer name


def _expert_of(name: str, expert_lists: list[str]) -> tuple[int, str] | None:
    """``(expert index, name with the index as '*')`` for a layer inside an expert ModuleList."""
    for path in expert_lists:
        if name.startswith(path + "."):
            index, _, rest = name[len(path) + 1:].partition(".")
            if index.isdigit():
                return int(index), f"{path}.*.{rest}"
    return None


def _fused_in(block: nn.Module, where: str) -> list[FusedExperts]:
    conv1d = _conv1d_type()
    return [_fused_layout(n, m, where) for n, m in block.named_modules()
            if n and _is_fused(m) and not _is_prunable(m, conv1d)]


def _router(name: str, containers: set[str], expert_wide: bool) -> bool:
    """A layer inside an MoE block (beside its experts) that routes: as wide as the expert count
    (or one gate value), or called gate/router."""
    for container in containers:
        if container and name.startswith(container + "."):
            return expert_wide or any(part in ROUTER_NAMES for part in name[len(container) + 1:].split("."))
    return False


def _block_layout(block: nn.Module, calls: dict[str, tuple], fused: list[FusedExperts],
                  exclude_ids: set[int]) -> BlockLayout:
    """Groups and stages of one block from its probe calls (see the module docstring)."""
    conv1d = _conv1d_type()
    modules = dict(block.named_modules())
    expert_lists = [n for n, m in modules.items()
                    if isinstance(m, nn.ModuleList) and len(m) > 1
                    and "expert" in n.rpartition(".")[2].lower()]
    num_experts = {f.num_experts for f in fused} | {len(modules[n]) for n in expert_lists}
    containers = {f.path.rpartition(".")[0] for f in fused} | {n.rpartition(".")[0] for n in expert_lists}
    refs: dict[str, LayerRef] = {}
    routers, skipped, dense, listed = [], [], [], []
    for name, module in modules.items():
        if not _is_prunable(module, conv1d) or id(module) in exclude_ids:
            continue
        transposed = conv1d is not None and isinstance(module, conv1d)
        expert = _expert_of(name, expert_lists)
        out = module.weight.shape[1 if transposed else 0]
        if expert is None and _router(name, containers, out in num_experts | {1}):
            routers.append(name)
        elif expert is None and name not in calls:
            skipped.append(name)  # never called in the forward: nothing to calibrate, nothing it changes
        else:
            refs[name] = LayerRef(name, _kind(modules, name), expert=expert[0] if expert else None,
                                  transposed=transposed)
            if expert:
                listed.append((name, *expert))
            else:
                dense.append(name)
    order = {name: pos for pos, name in enumerate(calls)}
    groups = _dense_groups(dense, calls, order) + _listed_expert_groups(listed, calls, order)
    grouped = {name for group in groups for name in group[3]}
    for name, _, _ in listed:
        if name not in grouped:  # no expert's copy of this layer was called
            skipped.append(name)
            del refs[name]
    for f in fused:
        if f.path not in order:
            skipped.extend(f.name(e, p) for p in (f.first, f.second) for e in range(f.num_experts))
            continue
        # all first projections at the experts module's call, then all second projections
        for offset, (param, role) in enumerate(((f.first, "first"), (f.second, "second"))):
            for e in range(f.num_experts):
                name = f.name(e, param)
                refs[name] = LayerRef(f.path, _kind(modules, name), param=param, expert=e,
                                      transposed=f.transposed, fused=f, role=role)
                groups.append([order[f.path] + 0.5 * offset, e, ("fused", f.path, param), [name]])
    stages: dict[tuple, list[tuple[str, ...]]] = {}
    for _, _, stage, names in sorted(groups, key=lambda g: (g[0], g[1])):
        stages.setdefault(stage, []).append(tuple(names))
    bare_routers, fixed = _bare_matrices(modules, conv1d, containers)
    return BlockLayout(tuple(tuple(s) for s in stages.values()), refs, tuple(routers + bare_routers),
                       tuple(skipped), tuple(fixed), tuple(fused))


def _bare_matrices(modules: dict[str, nn.Module], conv1d,
                   containers: set[str]) -> tuple[list[str], list[str]]:
    """``(routers, fixed)``: the matrices a block holds as bare parameters (outside its prunable
    layers and fused experts), routers kept as such (TopKRouter), the others left as they are."""
    routers, fixed = [], []
    for n, m in modules.items():
        if _is_prunable(m, conv1d) or _is_fused(m) \
                or not any(t.dim() >= 2 for t in m.parameters(recurse=False)):
            continue
        if _router(n, containers, True):  # a router kept as a bare parameter (TopKRouter)
            routers.append(f"{n} ({type(m).__name__})")
        else:
            fixed.extend(f"{n}.{p}" if n else p for p, t in m.named_parameters(recurse=False) if t.dim() >= 2)
    return routers, fixed


# a group under construction: [position of its first call, expert index (-1: none), stage key, names]

def _dense_groups(names: list[str], calls: dict[str, tuple], order: dict[str, int]) -> list[list]:
    """Layers given the very same input tensor: one group, at its first call; one stage each."""
    by_input: dict[tuple, list] = {}
    for name in sorted(names, key=order.__getitem__):
        if calls[name] not in by_input:
            by_input[calls[name]] = [order[name], -1, ("dense", order[name]), []]
        by_input[calls[name]][3].append(name)
    return list(by_input.values())


def _listed_expert_groups(listed: list[tuple[str, int, str]], calls: dict[str, tuple],
                          order: dict[str, int]) -> list[list]:
    """Experts kept as modules (``experts.{e}.w1``): a name pattern (``experts.*.w1``) takes the
    place of its first call, patterns sharing an input form one stage, and each expert has its
    own group there, also an expert the probe's few tokens did not reach."""
    first_call: dict[str, tuple[int, tuple]] = {}
    for name, _, pattern in listed:
        if name in calls:
            first_call.setdefault(pattern, (order[name], calls[name]))
    stage_of: dict[str, tuple] = {}
    for pattern, (pos, key) in sorted(first_call.items(), key=lambda kv: kv[1][0]):
        same = [p for p in stage_of if first_call[p][1] == key]
        stage_of[pattern] = stage_of[same[0]] if same else ("experts", pos)
    groups: dict[tuple, list] = {}
    for name, index, pattern in listed:
        if pattern in stage_of:
            stage = stage_of[pattern]
            groups.setdefault((stage, index), [stage[1], index, stage, []])[3].append(name)
    return list(groups.values())


def _override_layout(model: nn.Module, family: Family) -> Layout:
    blocks = get_blocks(model)
    layouts = []
    for i, block in enumerate(blocks):
        modules = dict(block.named_modules())
        refs = {}
        for name in family.linears:
            module = modules.get(name)
            if not isinstance(module, nn.Linear):
                what = "missing" if module is None else f"a {type(module).__name__}, not a Linear layer"
                raise LlmpruneError(f"layers.{i}.{name} is {what} (override {family.name!r})")
            refs[name] = LayerRef(name, _kind(modules, name))
        layouts.append(BlockLayout(tuple((stage,) for stage in family.stages), refs))
    return Layout(_model_type(model), family.blocks, "override", tuple(layouts))


def layout(model: nn.Module) -> Layout:
    """The model's layout: discovered by one short probe forward (cached), or an override."""
    found = _LAYOUTS.get(model)
    if found is not None:
        return found
    override = OVERRIDES.get(_model_type(model))
    if override is not None:
        found = _override_layout(model, override)
    else:
        blocks = get_blocks(model)
        conv1d = _conv1d_type()
        ends = (model.get_input_embeddings(), getattr(model, "get_output_embeddings", lambda: None)())
        embeddings = {id(m) for m in ends if m is not None}
        hooked = [{n: m for n, m in block.named_modules() if n and (_is_prunable(m, conv1d) or _is_fused(m))}
                  for block in blocks]
        # refused before any forward
        fused = [_fused_in(block, f"layers.{i}") for i, block in enumerate(blocks)]
        calls = _probe(model, blocks, hooked)
        found = Layout(_model_type(model), _BLOCK_PATHS[model], "discovered",
                       tuple(_block_layout(block, calls[i], fused[i], embeddings)
                             for i, block in enumerate(blocks)))
    _LAYOUTS[model] = found
    return found


# ---------------------------------------------------------------- selection

def _layer(block: nn.Module, ref: LayerRef) -> nn.Linear | WeightView:
    module = block.get_submodule(ref.module)
    if isinstance(module, nn.Linear) and not ref.routed:
        return module
    return WeightView(module, ref.param, expert=ref.expert if ref.fused is not None else None,
                      transposed=ref.transposed, routed=ref.routed, fused=ref.fused, role=ref.role)


def _selected(name: str, index: int, ref: LayerRef, include, exclude, skip: tuple[str, ...]) -> bool:
    qualified = f"layers.{index}.{name}"
    if include and not any(fnmatch.fnmatchcase(qualified, p) for p in include):
        return False
    return ref.kind not in skip and not any(fnmatch.fnmatchcase(qualified, p) for p in exclude)


def prunable_linears(
    model: nn.Module,
    index: int,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
) -> dict[str, nn.Linear | WeightView]:
    """Prunable layers of block ``index`` as ``{name: layer}``, in stage order.

    A layer is the ``nn.Linear`` itself, or a :class:`WeightView` (Conv1D, experts).
    ``include``/``exclude`` are fnmatch patterns over the qualified name ``layers.{index}.{name}``
    (for example ``layers.*.mlp.*`` or ``*.down_proj``); an empty ``include`` means all. ``skip``
    names kinds left out: ``"attention"``, ``"mlp"`` (experts are mlp).
    """
    block_layout = layout(model).block_layouts[index]
    block = get_blocks(model)[index]
    return {name: _layer(block, block_layout.refs[name]) for name in block_layout.linears
            if _selected(name, index, block_layout.refs[name], include, exclude, skip)}


def select_layers(model: nn.Module, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                  skip: tuple[str, ...] = ()) -> list[dict[str, nn.Linear | WeightView]]:
    """:func:`prunable_linears` of every block; an ``include`` pattern that matches no layer is an error."""
    unknown = [k for k in skip if k not in KINDS]
    if unknown:
        raise LlmpruneError(f"unknown layer kind {unknown[0]!r} to skip: use {' or '.join(KINDS)}")
    found = layout(model)
    for pattern in include:
        if not any(fnmatch.fnmatchcase(f"layers.{i}.{name}", pattern)
                   for i, b in enumerate(found.block_layouts) for name in b.linears):
            example = next((f"layers.0.{n}" for n in found.block_layouts[0].linears),
                           "layers.0.mlp.down_proj")
            raise LlmpruneError(f"no prunable layer matches include pattern {pattern!r}: names look like "
                                f"{example!r} (see `llmprune inspect`)")
    return [prunable_linears(model, i, include, exclude, skip) for i in range(len(found.block_layouts))]


def block_stages(model: nn.Module, index: int, layers: dict) -> list[tuple[str, ...]]:
    """Block ``index``'s groups restricted to ``layers`` (its selected layers), empty ones dropped.

    Each group lists layers that read the same input (q/k/v, gate/up): statistics are collected
    once per group, in the order the block computes them.
    """
    return [g for stage in block_passes(model, index, layers) for g in stage]


def block_passes(model: nn.Module, index: int, layers: dict) -> list[list[tuple[str, ...]]]:
    """Block ``index``'s stages restricted to ``layers``: the calibration passes of true-sequential
    pruning (each stage's groups; all experts' first projections are one stage)."""
    passes = []
    for stage in layout(model).block_layouts[index].stages:
        groups = [tuple(n for n in group if n in layers) for group in stage]
        groups = [g for g in groups if g]
        if groups:
            passes.append(groups)
    return passes


# ---------------------------------------------------------------- inspect

def _pattern(name: str, ref: LayerRef) -> str:
    return EXPERT_INDEX.sub(".*.", name, count=1) if ref.routed else name


def describe(model: nn.Module) -> str:
    """What discovery found, for ``llmprune inspect``: blocks, layers, groups, stages, experts."""
    found = layout(model)
    blocks = get_blocks(model)
    classes = sorted({type(b).__name__ for b in blocks})
    how = (f"discovered by a {PROBE_TOKENS}-token probe forward" if found.source == "discovered"
           else "hand-written override (llmprune.models.OVERRIDES)")
    lines = [f"model: {type(model).__name__} (model type {found.model_type}), layout {how}",
             f"blocks: {found.blocks} ({len(blocks)} x {', '.join(classes)})"]
    runs: list[list] = []  # consecutive blocks with the same description
    for i, b in enumerate(found.block_layouts):
        text = _describe_block(blocks[i], b)
        if runs and runs[-1][2] == text:
            runs[-1][1] = i
        else:
            runs.append([i, i, text])
    for first, last, text in runs:
        lines.append(f"block {first}" if first == last else f"blocks {first}-{last}")
        lines.extend("  " + line for line in text.splitlines())
    lines.append("names for --include/--exclude: layers.{i}.{name}; --skip-attention / "
                 "--skip-mlp drop a kind")
    return "\n".join(lines)


def _describe_block(block: nn.Module, b: BlockLayout) -> str:
    rows: dict[str, list] = {}  # pattern -> [count, shape, kind, how]
    for name in b.linears:
        ref = b.refs[name]
        w = _layer(block, ref).weight
        how = ("fused expert" if ref.fused else "expert" if ref.routed
               else "transposed" if ref.transposed else "")
        row = rows.setdefault(_pattern(name, ref), [0, tuple(w.shape), ref.kind, how])
        row[0] += 1
    width = max([len(p) for p in rows] + [10])
    lines = ["layers (name, out x in, kind):"]
    for pattern, (count, shape, kind, how) in rows.items():
        extra = f"  {how} x {count}" if how and count > 1 else f"  {how}" if how else ""
        lines.append(f"  {pattern:<{width}}  {shape[0]:>6} x {shape[1]:<6} {kind}{extra}")

    def show(groups) -> str:
        seen: list[str] = []
        for group in groups:
            text = "[" + ", ".join(_pattern(n, b.refs[n]) for n in group) + "]"
            if text not in seen:
                seen.append(text)
        return " ".join(seen)

    lines.append("groups (one input each): " + show(b.groups))
    lines.append("stages: " + " | ".join(f"{k + 1}: {show(stage)}" for k, stage in enumerate(b.stages)))
    for f in b.fused:
        lines.append(f"experts: {f.path} holds {f.num_experts} experts as fused parameters {f.first}, "
                     f"{f.second}{' (transposed)' if f.transposed else ''}: pruned expert by expert, "
                     "from the tokens routed to each")
    if b.routers:
        lines.append("routers (never pruned): " + ", ".join(b.routers))
    if b.fixed:
        lines.append("other weights (not pruned): " + ", ".join(b.fixed))
    if b.skipped:
        lines.append("not reached by the probe (not pruned): " + ", ".join(b.skipped))
    return "\n".join(lines)


def default_seqlen(model: nn.Module) -> int:
    """The model's context length, capped at 4096 as the reference scripts effectively do."""
    n = max_positions(model) or MAX_DEFAULT_SEQLEN
    return int(min(n, MAX_DEFAULT_SEQLEN))


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position encoding covers (None: no stated limit)."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if n else None


def resolve_seqlen(model: nn.Module, requested: int | None = None) -> int:
    """The window length to use: ``requested``, else ``model.seqlen``, else :func:`default_seqlen`.

    The one place sequence lengths are resolved (calibration and evaluation alike). A length
    past the model's maximum positions is refused: positions beyond it index past the rotary
    or learned position table, which gives an index error or silent garbage.
    """
    seqlen = requested or getattr(model, "seqlen", None) or default_seqlen(model)
    limit = max_positions(model)
    if limit is not None and seqlen > limit:
        raise LlmpruneError(
            f"seqlen {seqlen} is longer than the model's maximum positions ({limit}): use --seqlen "
            f"{limit} or less"
        )
    return int(seqlen)
