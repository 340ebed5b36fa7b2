"""Discovery of blocks, layers, groups, stages and experts, checked against what the model does.

The layouts below are written out by hand from the transformers sources; the Wanda statistics are
checked against inputs captured directly from an ordinary forward (for fused experts: the operands
of the expert matmuls of transformers' eager implementation, so only the routed tokens).
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from conftest import make_family_model, make_model, make_tokenizer
from llmprune.blocks import hook_count
from llmprune.cli import main
from llmprune.config import CalibConfig, PruneConfig
from llmprune.engine import mask as pipeline
from llmprune.engine import prune
from llmprune.engine.plan import plan_layers
from llmprune.errors import LlmpruneError
from llmprune.math.scores import score
from llmprune.models import (
    block_passes,
    block_stages,
    describe,
    get_blocks,
    layout,
    prunable_linears,
    select_layers,
)
from llmprune.stats import StatsCollector

LLAMA_GROUPS = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]


def _windows(n=4, seqlen=32, vocab=512, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, seqlen), generator=g)


def _config(method="wanda", **kw):
    return PruneConfig(method=method, calib=CalibConfig(nsamples=4, seqlen=32, batch_size=2), **kw)


def _groups(model, i=0):
    layers = prunable_linears(model, i)
    return block_stages(model, i, layers)


# ---------------------------------------------------------------- layouts against the sources

@pytest.mark.parametrize("model_type, blocks, groups", [
    ("llama", "model.layers", LLAMA_GROUPS),
    ("qwen3", "model.layers", LLAMA_GROUPS),
    ("opt", "model.decoder.layers", [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                     ("self_attn.out_proj",), ("fc1",), ("fc2",)]),
    ("gpt_neox", "gpt_neox.layers", [("attention.query_key_value",), ("attention.dense",),
                                     ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)]),
    ("gpt2", "transformer.h", [("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)]),
    ("phi3", "model.layers", [("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",),
                              ("mlp.down_proj",)]),
])
def test_dense_layouts_match_the_sources(model_type, blocks, groups):
    model = make_family_model(model_type)
    found = layout(model)
    assert found.blocks == blocks and found.source == "discovered"
    assert get_blocks(model) is model.get_submodule(blocks)
    for i in range(len(get_blocks(model))):
        assert _groups(model, i) == groups
    assert hook_count(model) == 0


def test_phi_parallel_block_groups_attention_and_mlp_inputs():
    """Phi-1/2 feed one layernorm output to q/k/v and fc1: one group across attention and MLP."""
    model = make_family_model("phi")
    groups = _groups(model)
    assert ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1") in groups
    assert groups[-1] == ("mlp.fc2",) or ("self_attn.dense",) in groups


def test_moe_layout_with_a_dense_first_block_shared_expert_and_routers():
    model = make_family_model("qwen2_moe", mlp_only_layers=[0])
    dense, moe = layout(model).block_layouts
    assert dense.groups == (*LLAMA_GROUPS[:2], ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
    assert not dense.fused and not dense.routers
    shared = [("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), ("mlp.shared_expert.down_proj",)]
    experts = [[(f"mlp.experts.{e}.{p}",) for e in range(4)] for p in ("gate_up_proj", "down_proj")]
    layers = prunable_linears(model, 1)
    assert block_passes(model, 1, layers) == [[g] for g in LLAMA_GROUPS[:2]] + [[g] for g in shared] + experts
    assert "mlp.shared_expert_gate" in moe.routers  # Linear(hidden, 1): a gate, never pruned
    assert any(r.startswith("mlp.gate ") for r in moe.routers)  # the top-k router's bare weight
    assert not any("gate" == n.rsplit(".", 1)[-1] for n in layers)
    experts_module = get_blocks(model)[1].mlp.experts
    view = layers["mlp.experts.2.down_proj"]
    assert view.weight.data_ptr() == experts_module.down_proj[2].data_ptr() and view.weight.shape == (64, 32)


def test_layout_is_probed_once_and_cached():
    model = make_model("llama")
    calls = []
    handle = model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    first = layout(model)
    for i in range(2):
        prunable_linears(model, i)
    plan_layers(model, _config())
    handle.remove()
    assert layout(model) is first and len(calls) == 1
    assert hook_count(model) == 0


# ---------------------------------------------------------------- transposed storage, written in place

def test_gpt2_conv1d_is_pruned_along_its_input_dimension():
    """Conv1D stores (in, out): 2:4 must group 4 consecutive *input* rows of each output column."""
    model = make_family_model("gpt2")
    prune(model, None, _config(pattern="2:4"), windows=_windows(), progress=False)
    for block in get_blocks(model):
        for conv in (block.attn.c_attn, block.mlp.c_fc, block.mlp.c_proj):
            w = conv.weight  # (in, out)
            kept = (w != 0).reshape(w.shape[0] // 4, 4, w.shape[1]).sum(1)
            assert (kept == 2).all()


def test_gpt_oss_transposed_fused_experts_pruned_along_inputs():
    """gpt-oss keeps experts transposed, (E, in, out), with biases: N:M runs over the input dim."""
    model = make_family_model("gpt_oss")
    biases = {n: p.clone() for n, p in model.named_parameters() if n.endswith("_bias")}
    prune(model, None, _config(pattern="2:4"), windows=_windows(), progress=False)
    for block in get_blocks(model):
        for w in (block.mlp.experts.gate_up_proj, block.mlp.experts.down_proj):  # (E, in, out)
            kept = (w != 0).reshape(w.shape[0], w.shape[1] // 4, 4, w.shape[2]).sum(2)
            assert (kept == 2).all()
    for n, p in model.named_parameters():
        if n in biases:
            assert torch.equal(p, biases[n]), n


# ---------------------------------------------------------------- statistics against captured inputs

_MATMULS = (nn.functional.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


class _CaptureExpertMatmuls(TorchFunctionMode):
    """Records the left operand of every linear/matmul whose right operand is one expert's slice
    of one of ``params`` (3-D), keyed by (parameter name, expert)."""

    def __init__(self, params: dict[str, torch.Tensor]):
        super().__init__()
        self.params = params
        self.seen: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _MATMULS and len(args) >= 2:
            w = args[1]
            for name, p in self.params.items():
                if isinstance(w, torch.Tensor) \
                        and w.untyped_storage().data_ptr() == p.untyped_storage().data_ptr():
                    expert = (w.storage_offset() - p.storage_offset()) // p[0].numel()
                    self.seen[(name, expert)].append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        return func(*args, **(kwargs or {}))


def _captured_inputs(model, b: int, windows) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Block ``b``'s weight matrices (out, in) and the inputs they see in a plain forward of
    ``model``, found without llmprune: every Linear/Conv1D by a hook, every 3-D expert parameter
    through its matmuls in transformers' eager experts implementation."""
    from transformers.pytorch_utils import Conv1D

    block = get_blocks(model)[b]
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)
    handles = []
    for name, m in block.named_modules():
        if isinstance(m, (nn.Linear, Conv1D)):
            handles.append(m.register_forward_pre_hook(lambda _m, a, name=name: seen[name].append(
                a[0].detach().reshape(-1, a[0].shape[-1]).double())))
    fused = {f"{n}.{p}": t for n, m in block.named_modules() for p, t in m.named_parameters(recurse=False)
             if t.dim() == 3}
    if hasattr(model, "set_experts_implementation") and fused:
        model.set_experts_implementation("eager")
    try:
        with torch.no_grad(), _CaptureExpertMatmuls(fused) as capture:
            model(input_ids=windows, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, xs in seen.items():
        m = block.get_submodule(name)
        out[name] = (m.weight.detach().T if isinstance(m, Conv1D) else m.weight.detach(), torch.cat(xs))
    for (param, e), xs in capture.seen.items():
        path, _, leaf = param.rpartition(".")
        experts = block.get_submodule(path)
        w = getattr(experts, leaf)[e].detach()
        out[f"{path}.{e}.{leaf}"] = (w.T if getattr(experts, "is_transposed", False) else w, torch.cat(xs))
    for path, p in fused.items():  # an expert no token reached: an empty capture
        for e in range(p.shape[0]):
            head, _, leaf = path.rpartition(".")
            out.setdefault(f"{head}.{e}.{leaf}", (None, torch.zeros(0, 1, dtype=torch.float64)))
    return out


def _spy_statistics(monkeypatch) -> list[dict]:
    """Per stats pass: {layer name: (dense weight, LayerStats)} exactly as the pipeline used them."""
    seen: list[dict] = []

    class Spy(StatsCollector):
        def pop_stats(self):
            record: dict = {}
            seen.append(record)
            for group, stats in super().pop_stats():
                for name in group:
                    record[name] = (self.layers[name].weight.detach().clone(), stats)
                yield group, stats

    monkeypatch.setattr(pipeline, "StatsCollector", Spy)
    return seen


def _assert_scores_match(used: dict, captured: dict, tokens: dict, prefix: str) -> None:
    """Each layer's Wanda score from the pipeline's statistics equals |W| * sqrt(mean x^2) over
    its captured inputs; its token count equals the number of captured rows."""
    for name, (weight, stats) in used.items():
        w, x = captured[name]
        assert stats.tokens == x.shape[0], name
        if prefix + name in tokens:
            assert tokens[prefix + name] == x.shape[0]
        if x.shape[0] == 0:
            continue
        torch.testing.assert_close(weight.double(), w.double())
        ours = score(weight, stats.sq_norm, stats.tokens, "wanda").double()
        brute = w.double().abs() * (x ** 2).mean(0).sqrt().unsqueeze(0)
        torch.testing.assert_close(ours, brute, rtol=2e-4, atol=1e-7)


def _hybrid(dense, pruned, block: int, layers=()):
    """``dense`` with blocks before ``block`` (and ``layers`` of it) taken from ``pruned``: what
    the pipeline's statistics pass for that block (stage) ran on."""
    hybrid = copy.deepcopy(dense)
    for i in range(block):
        get_blocks(hybrid)[i].load_state_dict(get_blocks(pruned)[i].state_dict())
    mine, theirs = prunable_linears(hybrid, block), prunable_linears(pruned, block)
    with torch.no_grad():
        for name in layers:
            mine[name].weight.copy_(theirs[name].weight)
    return hybrid


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen3_moe", "gpt_oss"])
def test_wanda_scores_equal_those_from_directly_captured_inputs(model_type, monkeypatch):
    """For every block and layer (experts: one per expert), the pipeline's Wanda score equals
    |W| * sqrt(mean x^2) over the inputs captured from the model with the earlier blocks pruned."""
    model = make_family_model(model_type)
    dense = copy.deepcopy(model)
    windows = _windows()
    seen = _spy_statistics(monkeypatch)
    report = prune(model, None, _config(sparsity=0.5), windows=windows, progress=False)
    tokens = report.expert_tokens()
    assert len(seen) == len(get_blocks(model))
    for b, used in enumerate(seen):
        captured = _captured_inputs(_hybrid(dense, model, b), b, windows)
        routers = set(layout(model).block_layouts[b].routers)
        assert set(used) == {n for n in captured if n not in routers}, \
            "layers pruned != matrices in the block"
        _assert_scores_match(used, captured, tokens, f"layers.{b}.")
    if model_type in ("qwen3_moe", "gpt_oss"):
        assert len(tokens) == 2 * 2 * 4 and sum(tokens.values()) > 0


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
def test_true_sequential_statistics_see_the_pruned_earlier_stages(model_type, monkeypatch):
    """With --true-sequential each stage's statistics come from inputs through the stages of its
    block pruned before it (all experts' gate_up before any down_proj)."""
    model = make_family_model(model_type)
    dense = copy.deepcopy(model)
    windows = _windows()
    seen = iter(_spy_statistics(monkeypatch))
    report = prune(model, None, _config(sparsity=0.5, true_sequential=True), windows=windows, progress=False)
    for b in range(len(get_blocks(model))):
        done: list[str] = []
        passes = block_passes(model, b, prunable_linears(model, b))
        assert len(passes) == 4
        for stage in passes:
            used = next(seen)
            assert set(used) == {name for group in stage for name in group}
            captured = _captured_inputs(_hybrid(dense, model, b, done), b, windows)
            _assert_scores_match(used, captured, report.expert_tokens(), f"layers.{b}.")
            done += list(used)
    assert next(seen, None) is None


def test_snapshot_and_restore_cover_expert_weights():
    from llmprune.runner import restore_weights, snapshot_weights

    model = make_family_model("gpt_oss")
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    saved = snapshot_weights(model)
    prune(model, None, _config(pattern="2:4"), windows=_windows(), progress=False)
    experts = "model.layers.0.mlp.experts.gate_up_proj"
    assert not torch.equal(model.get_parameter(experts), original[experts])
    restore_weights(model, saved)
    for name, p in model.named_parameters():
        assert torch.equal(p, original[name]), name


def test_an_expert_without_tokens_falls_back_to_magnitude_and_is_reported(monkeypatch):
    model = make_family_model("qwen3_moe")
    for block in get_blocks(model):  # the router never picks expert 3
        gate = block.mlp.gate
        original = gate.forward

        def never_three(x, original=original):
            logits, scores, index = original(x)
            return logits, scores, torch.where(index == 3, (index + 1) % 4, index)

        monkeypatch.setattr(gate, "forward", never_three)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = prune(model, None, _config(sparsity=0.5), windows=_windows(), progress=False)
    by_name = {layer.name: layer for layer in report.layers}
    for b in range(2):
        for param in ("gate_up_proj", "down_proj"):
            starved = by_name[f"layers.{b}.mlp.experts.3.{param}"]
            assert starved.info["routed_tokens"] == 0 and starved.info["fallback"] == "magnitude"
            w = dense[f"model.layers.{b}.mlp.experts.{param}"][3]  # (out, in)
            smallest = w.abs().argsort(dim=1, stable=True)[:, : w.shape[1] // 2]
            # per row, as Wanda's group
            expected = torch.zeros_like(w, dtype=torch.bool).scatter_(1, smallest, True)
            got = getattr(get_blocks(model)[b].mlp.experts, param)[3] == 0
            assert torch.equal(got, expected)
            other = by_name[f"layers.{b}.mlp.experts.0.{param}"]
            assert other.info["routed_tokens"] > 0 and "fallback" not in other.info
    text = report.table()
    assert "mlp.experts.*.gate_up_proj" in text and "4 got none" in text
    assert "layers.0.mlp.experts.3.down_proj" in text


class _ListMoE(nn.Module):
    """An MoE block the old way: a Linear router and a ModuleList of expert MLPs, top-1."""

    def __init__(self, hidden=64, inner=32, experts=4):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(
            nn.ModuleDict({"w1": nn.Linear(hidden, inner, bias=False),
                           "w3": nn.Linear(hidden, inner, bias=False),
                           "w2": nn.Linear(inner, hidden, bias=False)}) for _ in range(experts))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        choice = self.gate(flat).argmax(-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows = (choice == e).nonzero().squeeze(-1)
            if rows.numel():
                h = flat[rows]
                out[rows] = expert["w2"](nn.functional.silu(expert["w1"](h)) * expert["w3"](h))
        return out.reshape(x.shape)


def test_experts_kept_as_linear_modules_get_their_routed_tokens(monkeypatch):
    model = make_model("llama")
    for block in get_blocks(model):
        block.mlp = _ListMoE()
    dense = copy.deepcopy(model)
    found = layout(model).block_layouts[0]
    assert found.routers == ("mlp.gate",)
    assert found.stages[-2] == tuple((f"mlp.experts.{e}.w1", f"mlp.experts.{e}.w3") for e in range(4))
    assert found.stages[-1] == tuple((f"mlp.experts.{e}.w2",) for e in range(4))
    seen = _spy_statistics(monkeypatch)
    windows = _windows()
    report = prune(model, None, _config(sparsity=0.5), windows=windows, progress=False)
    tokens = report.expert_tokens()
    captured = _captured_inputs(dense, 0, windows)
    for e in range(4):
        assert tokens[f"layers.0.mlp.experts.{e}.w1"] == captured[f"mlp.experts.{e}.w1"][1].shape[0]
    assert sum(tokens[f"layers.0.mlp.experts.{e}.w2"] for e in range(4)) == windows.numel()
    for name, (_weight, stats) in seen[0].items():
        if stats.tokens:
            w, x = captured[name]
            torch.testing.assert_close(stats.sq_norm.double(), (x ** 2).sum(0), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- selection

def test_skip_attention_and_skip_mlp():
    model = make_family_model("qwen3_moe")
    prune(model, None, _config(skip_attention=True), windows=_windows(), progress=False)
    block = get_blocks(model)[0]
    assert (block.self_attn.q_proj.weight != 0).all() and (block.self_attn.o_proj.weight != 0).all()
    assert (block.mlp.experts.gate_up_proj == 0).float().mean() == pytest.approx(0.5)

    model = make_family_model("gpt2")
    plans = plan_layers(model, _config(skip_mlp=True))
    assert [list(p.layers) for p in plans] == [["attn.c_attn", "attn.c_proj"]] * 2
    with pytest.raises(LlmpruneError, match="no prunable layer matches"):
        plan_layers(model, _config(skip_mlp=True, skip_attention=True))


def test_include_exclude_on_discovered_names():
    model = make_family_model("qwen3_moe")
    layers = select_layers(model, include=("layers.1.mlp.experts.*",), exclude=("*.down_proj",))
    assert layers[0] == {}
    assert list(layers[1]) == [f"mlp.experts.{e}.gate_up_proj" for e in range(4)]
    with pytest.raises(LlmpruneError,
                       match=r"no prunable layer matches include pattern 'layers\.\*\.mlp\.down'"):
        plan_layers(model, _config(include=("layers.*.self_attn.*", "layers.*.mlp.down")))


# ---------------------------------------------------------------- bad input

class _NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 16)

    def get_input_embeddings(self):
        return self.embed


def test_model_without_decoder_blocks_names_what_was_searched():
    with pytest.raises(LlmpruneError,
                       match=r"no decoder blocks found in _NoBlocks .*ModuleList.*model\.layers"):
        get_blocks(_NoBlocks())


def test_unsplittable_fused_experts_are_named():
    model = make_family_model("qwen3_moe")
    del get_blocks(model)[1].mlp.experts.is_transposed  # no longer transformers' known layout
    with pytest.raises(LlmpruneError,
                       match=r"layers\.1\.mlp\.experts \(Qwen3MoeExperts: gate_up_proj \(4, 64, 64\)"):
        layout(model)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("discovery")
    tokenizer = make_tokenizer()
    for model_type in ("qwen3_moe", "llama4_text"):
        model = make_family_model(model_type)
        model.save_pretrained(root / model_type)
        tokenizer.save_pretrained(root / model_type)
    (root / "text.txt").write_text(
        " ".join(["pruning removes weights from a network without retraining it"] * 60))
    return root


def test_inspect_prints_blocks_layers_groups_stages(saved_models, capsys):
    assert main(["inspect", str(saved_models / "qwen3_moe")]) == 0
    out = capsys.readouterr().out
    assert "blocks: model.layers (2 x Qwen3MoeDecoderLayer)" in out
    assert re.search(r"mlp\.experts\.\*\.gate_up_proj\s+64 x 64\s+mlp\s+fused expert x 4", out)
    assert "groups (one input each): [self_attn.q_proj, self_attn.k_proj, self_attn.v_proj]" in out
    assert "stages: 1: [self_attn.q_proj, self_attn.k_proj, self_attn.v_proj] | 2: [self_attn.o_proj]" in out
    assert "routers (never pruned): mlp.gate (Qwen3MoeTopKRouter)" in out


@pytest.mark.parametrize("args, needle", [
    (["--include", "layers.*.mlp.nothing"],
     "no prunable layer matches include pattern 'layers.*.mlp.nothing'"),
    (["--skip-attention", "--skip-mlp"], "no prunable layer matches"),
])
def test_bad_selection_exit_2(saved_models, capsys, args, needle):
    text = str(saved_models / "text.txt")
    code = main(["prune", "--model", str(saved_models / "qwen3_moe"), "--calib", text, "--nsamples", "2",
                 "--seqlen", "16", "--eval", text, "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_llama4_fused_experts_without_layout_metadata_exit_2(saved_models, capsys):
    """Llama-4 keeps (E, H, 2I) experts without transformers' experts metadata: refused, named."""
    code = main(["inspect", str(saved_models / "llama4_text")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "layers.0.feed_forward.experts (Llama4TextExperts: gate_up_proj" in err and "cannot split" in err


def test_cli_without_blocks_exit_2(monkeypatch, capsys):
    import llmprune.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (_NoBlocks(), None))
    assert main(["inspect", "some/model"]) == 2
    err = capsys.readouterr().err
    assert "no decoder blocks found in _NoBlocks" in err and len(err.strip().splitlines()) == 1


def test_describe_on_a_dense_model_lists_every_block_once():
    text = describe(make_model("llama", layers=3))
    assert "blocks 0-2" in text and text.count("groups (one input each)") == 1
