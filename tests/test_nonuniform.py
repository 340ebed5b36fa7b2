"""Per-block widths (issue "edge path"): structured methods that give each block its own MLP width and
KV-group count (``--width-allocation global|owl``), the report of them, and the checkpoint that plain
transformers loads (``trust_remote_code``) with the same logits."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import dense_means, make_model, make_tokenizer, write_local_setup
from llmprune.blocks import hook_count
from llmprune.cli import main
from llmprune.config import CalibConfig, PruneConfig
from llmprune.engine import prune
from llmprune.errors import LlmpruneError
from llmprune.io import save_pruned
from llmprune.math.allocation import capped_shares, owl_sparsities
from llmprune.math.channels import global_keep, standardised, standardised_group_scores
from llmprune.models import load_model

HIDDEN, INTER, HEADS, KV, HEAD_DIM = 64, 128, 4, 2, 16


def _model(layers=3):
    """The house's tiny LLaMA: 4 query heads in 2 KV groups."""
    return make_model("llama", layers=layers, vocab_size=128)


def _windows(n=4, seqlen=32, seed=0):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _prune(model, method, sparsity, structure="both", widths="global", multiple=1, **options):
    config = PruneConfig(method=method, sparsity=sparsity, structure=structure, channel_multiple=multiple,
                         width_allocation=widths, calib=CalibConfig(nsamples=4, seqlen=32, batch_size=2),
                         **options)
    return prune(model, None, config, windows=_windows(), progress=False)


# ---- pure math -----------------------------------------------------------------------------------

def test_standardised_scores_and_group_means():
    assert standardised(torch.tensor([1.0, 2.0, 3.0])).tolist() == [-1.0, 0.0, 1.0]  # unbiased std: 1
    assert standardised(torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]  # no spread: no preference
    # 4 heads of dim 1 in 2 KV groups: heads 0,1 -> group 0; heads 2,3 -> group 1
    channel = torch.tensor([1.0, 2.0, 3.0, 4.0])
    std1 = torch.tensor([1.0, 2.0, 3.0, 4.0]).std().item()
    torch.testing.assert_close(standardised_group_scores(channel, 4, 2, 1, power=1),
                               torch.tensor([-1.0 / std1, 1.0 / std1]))  # z = (-1.5, -0.5, 0.5, 1.5) / std
    sq = torch.tensor([1.0, 4.0, 9.0, 16.0])  # FLAP squares before standardising
    z = (sq - sq.mean()) / sq.std()
    expected = torch.stack([z[:2].mean(), z[2:].mean()])
    torch.testing.assert_close(standardised_group_scores(channel, 4, 2, 1, power=2), expected)


def test_global_keep_ranks_everything_once_and_cuts_by_parameters():
    # worked by hand: the best channel and group of each block stay; the candidates ranked
    # b1c0 0.5 | b0c2 0.0 | b1g0 -0.2 | b0g1 -0.3 | b1c1 -0.5 | b0c1 -1.0 weigh 1,1,3,3,1,1 (10);
    # removing 4 keeps 6: prefixes 0,1,2,5,8,9,10, the closest is 5 (the first three)
    channels = [torch.tensor([1.0, -1.0, 0.0]), torch.tensor([0.5, -0.5, 2.0])]
    groups = [torch.tensor([0.3, -0.3]), torch.tensor([-0.2, 0.2])]
    assert global_keep(channels, groups, 1, 3, remove_params=4) == ([2, 2], [1, 2])
    # channels only; removing everything removable leaves the forced ones
    assert global_keep(channels, None, 1, 3, remove_params=2) == ([2, 2], [0, 0])
    assert global_keep(channels, None, 1, 3, remove_params=100) == ([1, 1], [0, 0])


def test_capped_shares_keep_the_sum():
    assert capped_shares([0.5, 0.7, 0.3], [0.6, 0.6, 0.6]) == pytest.approx([0.55, 0.6, 0.35])
    assert capped_shares([0.9, 0.9, 0.3], [0.6, 0.6, 0.6]) == pytest.approx([0.6, 0.6, 0.6])
    assert capped_shares([0.2, 0.4], [0.5, 0.5]) == [0.2, 0.4]


# ---- FLAP's global search, computed again here by brute force -----------------------------------

def _dense_inputs(model, windows):
    """Per block, the inputs of o_proj and down_proj over all calibration tokens (float64)."""
    seen, handles = {}, []
    for i, block in enumerate(model.model.layers):
        for role, module in (("o", block.self_attn.o_proj), ("down", block.mlp.down_proj)):
            def hook(_m, args, key=(i, role)):
                seen.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]))
            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(windows)
    for h in handles:
        h.remove()
    return {k: torch.cat(v).double() for k, v in seen.items()}


def _score(method, weight, x):
    w = weight.detach().double()
    if method == "flap":  # WIFV: Var(x_j) * sum_i W_ij^2
        return x.var(dim=0, unbiased=False) * w.pow(2).sum(dim=0)
    return (w.abs() * x.pow(2).mean(dim=0).sqrt()).mean(dim=0)  # Wanda-sp: mean_i |W_ij| ||x_j||


def _brute_force_global(dense, method, sparsity):
    """Standardise per layer, rank all blocks' channels and KV groups together, cut by parameters."""
    x = _dense_inputs(dense, _windows())
    layers = dense.model.layers
    candidates = []  # (score, parameters, block, "group"/"channel", index)
    per_group = HEAD_DIM * (2 * (HEADS // KV) + 2) * HIDDEN  # q and o of two heads, k and v of one
    for b, block in enumerate(layers):
        s = _score(method, block.self_attn.o_proj.weight, x[b, "o"]) ** (2 if method == "flap" else 1)
        z = (s - s.mean()) / s.std()
        for g in range(KV):
            width = HEADS // KV * HEAD_DIM
            candidates.append((float(z[g * width:(g + 1) * width].mean()), per_group, b, "group", g))
    for b, block in enumerate(layers):
        s = _score(method, block.mlp.down_proj.weight, x[b, "down"])
        z = (s - s.mean()) / s.std()
        candidates += [(float(z[c]), 3 * HIDDEN, b, "channel", c) for c in range(INTER)]
    kept = set()
    for b in range(len(layers)):  # every block keeps its best channel and its best group
        for kind in ("group", "channel"):
            mine = [c for c in candidates if c[2] == b and c[3] == kind]
            kept.add(max(mine, key=lambda c: c[0])[2:])
    ranked = sorted((c for c in candidates if c[2:] not in kept), key=lambda c: -c[0])
    block_params = sum(p.numel() for p in layers[0].parameters())
    keep_target = sum(c[1] for c in ranked) - sparsity * block_params * len(layers)
    prefix, best, cut = 0, abs(keep_target), 0
    for k, c in enumerate(ranked, start=1):
        prefix += c[1]
        if abs(prefix - keep_target) < best:
            best, cut = abs(prefix - keep_target), k
    kept |= {c[2:] for c in ranked[:cut]}
    return [[sorted(i for b2, k, i in kept if b2 == b and k == kind) for b in range(len(layers))]
            for kind in ("channel", "group")]


def _kept_rows(new: torch.Tensor, old: torch.Tensor) -> list[int]:
    """Which rows of ``old`` the rows of ``new`` are (random rows are unique)."""
    return [int(torch.nonzero((old == row).all(dim=1)).flatten()[0]) for row in new]


@pytest.mark.parametrize("method", ["flap", "wanda-sp"])
def test_global_selection_is_flaps_ranking(method):
    dense = _model(layers=4)
    model = copy.deepcopy(dense)
    report = _prune(model, method, 0.3)
    channels, groups = _brute_force_global(dense, method, 0.3)
    s = report.structured
    assert s["width_allocation"] == "global"
    assert s["keep_channels"] == [len(c) for c in channels] and s["keep_groups"] == [len(g) for g in groups]
    assert len(set(s["keep_channels"])) > 1  # the blocks differ
    for b, (small, big) in enumerate(zip(model.model.layers, dense.model.layers)):
        assert small.mlp.gate_proj.out_features == len(channels[b])
        assert small.self_attn.k_proj.out_features == len(groups[b]) * HEAD_DIM
        if method == "flap":  # FLAP shrinks with the same dense scores: the very channels ranked
            assert sorted(_kept_rows(small.mlp.gate_proj.weight, big.mlp.gate_proj.weight)) == channels[b]
            kv = sorted({r // HEAD_DIM for r in _kept_rows(small.self_attn.k_proj.weight,
                                                            big.self_attn.k_proj.weight)})
            assert kv == groups[b]
    # the planned fraction is the target up to half the largest unit (one KV group)
    total = 4 * sum(p.numel() for p in dense.model.layers[0].parameters())
    assert s["removed_fraction"] == pytest.approx(0.3, abs=HEAD_DIM * 6 * HIDDEN / 2 / total)
    assert s["removed_fraction"] == pytest.approx(sum(s["removed_params"]) / total)


# ---- OWL's per-block ratios --------------------------------------------------------------------

@pytest.mark.parametrize("method", ["flap", "wanda-sp"])
def test_owl_widths_follow_the_outlier_ratios_and_meet_the_target(method):
    model = _model(layers=4)
    report = _prune(model, method, 0.3, structure="mlp", widths="owl", owl_lambda=0.1, owl_m=3.0)
    s = report.structured
    ratios, targets = s["outlier_ratio"], s["block_target"]
    assert targets == pytest.approx(owl_sparsities(ratios, 0.3, 0.1))  # no block at its cap here
    assert sum(targets) / 4 == pytest.approx(0.3)
    assert max(targets) - min(targets) == pytest.approx(0.2)  # OWL's span: 2 lambda
    # fewer outliers, more removed
    order = sorted(range(4), key=lambda i: ratios[i])
    assert [s["keep_channels"][i] for i in order] == sorted(s["keep_channels"])
    assert len(set(s["keep_channels"])) == 4
    block_params = s["block_params"]
    per_channel = 3 * HIDDEN
    assert s["removed_fraction"] == pytest.approx(0.3, abs=4 * per_channel / 2 / (4 * block_params))
    assert [m.mlp.gate_proj.out_features for m in model.model.layers] == s["keep_channels"]


def test_owl_caps_a_block_at_what_it_can_lose():
    model = _model(layers=4)
    # MLP channels alone are at most 127 * 192 of a block's 36,992 parameters (65.9%)
    report = _prune(model, "wanda-sp", 0.5, structure="mlp", widths="owl", owl_lambda=0.3)
    s = report.structured
    assert min(s["keep_channels"]) == 1 and max(s["block_target"]) == pytest.approx(127 * 192 / 36992)
    assert sum(s["block_target"]) / 4 == pytest.approx(0.5)


# ---- the shrunk model computes what the zeroed dense one does -----------------------------------

def _zeroed_like(dense, model, flap: bool):
    """``dense`` with the channels and KV groups ``model`` lacks zeroed (+ FLAP's biases as hooks)."""
    zeroed = copy.deepcopy(dense)
    mlp_means = dense_means(dense, _windows(), lambda b: b.mlp.down_proj)
    attn_means = dense_means(dense, _windows(), lambda b: b.self_attn.o_proj)
    q = HEADS // KV
    for i, (small, big) in enumerate(zip(model.model.layers, zeroed.model.layers)):
        kept = _kept_rows(small.mlp.gate_proj.weight, big.mlp.gate_proj.weight)
        removed = sorted(set(range(INTER)) - set(kept))
        k_rows = _kept_rows(small.self_attn.k_proj.weight, big.self_attn.k_proj.weight)
        kv_kept = {r // HEAD_DIM for r in k_rows}
        cols = [h * HEAD_DIM + d for h in range(HEADS) if h // q not in kv_kept for d in range(HEAD_DIM)]
        kv_rows = [g * HEAD_DIM + d for g in range(KV) if g not in kv_kept for d in range(HEAD_DIM)]
        bias_mlp = big.mlp.down_proj.weight[:, removed] @ mlp_means[i][removed]
        bias_attn = big.self_attn.o_proj.weight[:, cols] @ attn_means[i][cols]
        with torch.no_grad():
            big.mlp.gate_proj.weight[removed] = 0
            big.mlp.up_proj.weight[removed] = 0
            big.self_attn.q_proj.weight[cols] = 0
            big.mlp.down_proj.weight[:, removed] = 0
            big.self_attn.o_proj.weight[:, cols] = 0
            big.self_attn.k_proj.weight[kv_rows] = 0
            big.self_attn.v_proj.weight[kv_rows] = 0
        if flap:
            big.mlp.down_proj.register_forward_hook(lambda _m, _a, out, b=bias_mlp: out + b)
            big.self_attn.o_proj.register_forward_hook(lambda _m, _a, out, b=bias_attn: out + b)
    return zeroed


@pytest.mark.parametrize("method, widths", [("flap", "global"), ("wanda-sp", "global"), ("flap", "owl"),
                                            ("wanda-sp", "owl")])
def test_shrunk_model_equals_zeroed_model_plus_biases(method, widths):
    dense = _model(layers=4)
    model = copy.deepcopy(dense)
    report = _prune(model, method, 0.35, widths=widths, **({"owl_lambda": 0.1} if widths == "owl" else {}))
    assert hook_count(model) == 0
    s = report.structured
    assert len(set(zip(s["keep_channels"], s["keep_groups"]))) > 1  # blocks of different widths
    assert min(s["keep_groups"]) < KV  # some block lost a KV group
    zeroed = _zeroed_like(dense, model, flap=method == "flap")
    ids = _windows(2, 24, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, zeroed(ids).logits, atol=2e-5, rtol=1e-4)
    assert s["removed_fraction_achieved"] == pytest.approx(0.35, abs=0.06)
    text = model.config
    assert text.intermediate_sizes == s["keep_channels"] and text.layer_kv_heads == s["keep_groups"]
    assert text.layer_heads == [g * HEADS // KV for g in s["keep_groups"]]
    assert text.intermediate_size == INTER and text.num_key_value_heads == KV  # the dense block's
    assert bool(text.mlp_bias) == bool(text.attention_bias) == (method == "flap")


# ---- saving: plain transformers (trust_remote_code) and llmprune load it, same logits ------------

def _plain_transformers_logits(folder, ids_path, out_path, tmp_path, trust=True):
    script = ("import sys; sys.modules['llmprune'] = None\n"  # plain transformers, no llmprune
              "import torch; from transformers import AutoModelForCausalLM\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, dtype=torch.float32, "
              f"trust_remote_code={trust})\n"
              f"torch.save(m(torch.load({str(ids_path)!r})).logits, {str(out_path)!r})\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")  # transformers copies the modeling file there
    return subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, env=env)


def test_checkpoint_reloads_with_identical_logits(tmp_path):
    model = _model(layers=3)
    report = _prune(model, "flap", 0.3, multiple=8)
    assert all(c % 8 == 0 for c in report.structured["keep_channels"])
    save_pruned(model, make_tokenizer(), tmp_path / "small", {"method": "flap"})
    folder = tmp_path / "small"
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_llmprune.LlmpruneLlamaForCausalLM"}
    assert config["intermediate_sizes"] == report.structured["keep_channels"]
    assert "modeling_llmprune.py" in json.loads((folder / "llmprune.json").read_text())["files"]
    ids = _windows(1, 16, seed=3)
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = model(ids).logits
    done = _plain_transformers_logits(folder, tmp_path / "ids.pt", tmp_path / "out.pt", tmp_path)
    assert done.returncode == 0, done.stderr
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)
    # without trust_remote_code transformers builds its uniform class and refuses the tensors
    refused = _plain_transformers_logits(folder, tmp_path / "ids.pt", tmp_path / "no.pt", tmp_path,
                                         trust=False)
    assert refused.returncode != 0 and not (tmp_path / "no.pt").exists()
    loaded, _ = load_model(str(folder), dtype="float32")  # llmprune's own class, not the folder's code
    assert type(loaded).__module__ == "llmprune.nonuniform_modeling"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    # saved again from the loaded model: the same checkpoint
    save_pruned(loaded, make_tokenizer(), tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["auto_map"] == config["auto_map"]


@pytest.mark.parametrize("save_format", ["compressed"])
def test_compressed_checkpoint_of_per_block_widths_loads(save_format, tmp_path):
    from llmprune import export

    model = _model(layers=2)
    _prune(model, "wanda-sp", 0.3, widths="owl", quantize="int8")
    export.save(model, make_tokenizer(), tmp_path / "c", {}, save_format=save_format, quantize="int8")
    loaded, _ = load_model(str(tmp_path / "c"), dtype="float32")
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# ---- uniform stays exactly as it was -------------------------------------------------------------

UNIFORM_KEYS = {"structure", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "keep_channels",
                "keep_groups", "block_params", "removed_params", "bias", "removed_fraction",
                "block_params_before", "block_params_after", "removed_fraction_achieved"}


def test_uniform_is_unchanged(tmp_path):
    a, b = _model(), _model()
    ra = _prune(a, "flap", 0.3, widths="uniform", multiple=8)
    config = PruneConfig(method="flap", sparsity=0.3, structure="both", channel_multiple=8,
                         calib=CalibConfig(nsamples=4, seqlen=32, batch_size=2))  # the default
    rb = prune(b, None, config, windows=_windows(), progress=False)
    assert set(ra.structured) == set(rb.structured) == UNIFORM_KEYS
    assert isinstance(ra.structured["keep_channels"], int)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not hasattr(a.config, "intermediate_sizes") and not hasattr(a.config, "llmprune_blocks")
    save_pruned(a, make_tokenizer(), tmp_path / "u")
    assert not (tmp_path / "u" / "modeling_llmprune.py").exists()
    assert "auto_map" not in json.loads((tmp_path / "u" / "config.json").read_text())


def test_offloaded_run_gives_the_in_memory_widths(tmp_path):
    expected = _model()
    model = copy.deepcopy(expected)
    _prune(expected, "wanda-sp", 0.3, widths="global")
    report = _prune(model, "wanda-sp", 0.3, widths="global", offload="disk", offload_dir=str(tmp_path))
    ours, theirs = expected.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert report.offload["peak_blocks"] == 1


# ---- bad input: one line, before calibration -----------------------------------------------------

def test_bad_width_options_are_refused_before_calibration():
    with pytest.raises(LlmpruneError, match="unknown width allocation 'best'"):
        PruneConfig(method="flap", sparsity=0.3, width_allocation="best")
    with pytest.raises(LlmpruneError, match="--owl-lambda .* --width-allocation owl"):
        PruneConfig(method="wanda-sp", sparsity=0.3, owl_lambda=0.1)
    with pytest.raises(LlmpruneError, match="owl_lambda 0.4 is outside"):
        PruneConfig(method="wanda-sp", sparsity=0.3, width_allocation="owl", owl_lambda=0.4)
    with pytest.raises(LlmpruneError, match="--width-allocation global\\|owl"):
        PruneConfig(method="wanda-sp", sparsity=0.3, allocation="owl")
    with pytest.raises(LlmpruneError, match="more than --structure mlp --width-allocation global can remove"):
        _prune(_model(), "flap", 0.7, structure="mlp")
    with pytest.raises(LlmpruneError, match="more than --structure heads --width-allocation owl"):
        _prune(_model(), "flap", 0.3, structure="heads", widths="owl")
    with pytest.raises(LlmpruneError, match="removes nothing"):
        _prune(_model(), "flap", 0.001, structure="mlp", multiple=32)


def test_cli_prunes_saves_and_refuses_in_one_line(tmp_path, capsys):
    root = write_local_setup(tmp_path)
    base = ["prune", "--model", str(root / "model"), "--calib", str(root / "calib.jsonl"), "--nsamples", "4",
            "--seqlen", "32", "--eval", str(root / "eval.txt"), "--no-progress", "--skip-dense"]
    assert main(base + ["--method", "flap", "--sparsity", "0.3", "--structure", "both", "--width-allocation",
                        "global", "--channel-multiple", "8", "--save", str(root / "s"),
                        "--json", str(root / "r.json")]) == 0
    record = json.loads((root / "r.json").read_text())
    assert isinstance(record["prune"]["structured"]["keep_channels"], list)
    assert record["prune"]["config"]["width_allocation"] == "global"
    load_model(str(root / "s"), dtype="float32")
    capsys.readouterr()
    for bad, needle in [(["--method", "wanda-sp", "--width-allocation", "best"], "unknown width allocation"),
                        (["--method", "wanda-sp", "--owl-lambda", "0.1"], "--width-allocation owl"),
                        (["--method", "flap", "--width-allocation", "global", "--sparsity", "0.7"],
                         "lower --sparsity")]:
        assert main(base + bad) == 2, bad
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (bad, err)
