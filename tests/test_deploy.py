"""Deployable output (issue 9): structured pruning that shrinks the model, int8 weights, the
compressed checkpoint, GGUF export, and one clear line for each bad input."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import dense_means, make_model, make_tokenizer
from llmprune.blocks import hook_count
from llmprune.cli import main
from llmprune.config import CalibConfig, PruneConfig
from llmprune.engine import prune
from llmprune.errors import LlmpruneError
from llmprune.export.compressed import (
    WEIGHTS_FILE,
    compressed_metadata,
    pack_bitmask,
    unpack_bitmask,
    write_compressed,
)
from llmprune.export.gguf import export_gguf, permute_qk, unpermute_qk
from llmprune.io import save_pruned
from llmprune.math.channels import group_scores, keep_top
from llmprune.math.quantize import dequantize_int8, fake_quantize_, quantize_int8
from llmprune.models import load_model

WORDS = ("the quick brown fox jumps over the lazy dog a stitch in time saves nine "
         "pruning removes weights from a network without retraining it ").split()


def _gqa_model(**overrides):
    """8 query heads in 4 KV groups, so head pruning has whole groups to remove."""
    sizes = dict(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4)
    sizes.update(overrides)
    return make_model("llama", **sizes)


def _windows(n=4, seqlen=32, seed=0):
    return torch.randint(0, 400, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _prune(model, method, sparsity, structure="mlp", quantize=None, multiple=1):
    config = PruneConfig(method=method, sparsity=sparsity, structure=structure, channel_multiple=multiple,
                         quantize=quantize, calib=CalibConfig(nsamples=4, seqlen=32, batch_size=2))
    return prune(model, make_tokenizer(), config, windows=_windows(), progress=False)


# ---- pure math -----------------------------------------------------------------------------------

def test_int8_is_per_row_symmetric_and_keeps_zeros():
    w = torch.tensor([[0.0, 1.27, -0.635, 0.01], [2.54, 0.0, 0.0, -2.54], [0.0, 0.0, 0.0, 0.0]])
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (3,)
    assert scale[0].item() == pytest.approx(0.01, rel=1e-4)
    assert scale[1].item() == pytest.approx(0.02, rel=1e-4)
    # round(-63.5) = -64 (even)
    assert q[0].tolist() == [0, 127, -64, 1] and q[1].tolist() == [127, 0, 0, -127]
    assert scale[2].item() == 1.0 and not q[2].any()
    back = dequantize_int8(q, scale)
    assert ((back == 0) == (w == 0)).all()  # zeros stay exactly zero
    # idempotent: quantizing a quantized float32 weight gives back the very same q and scale
    q2, scale2 = quantize_int8(back)
    assert torch.equal(q, q2) and torch.equal(scale, scale2)
    weight = w.clone()
    info = fake_quantize_(weight)
    assert torch.equal(weight, back) and info["zeros_after"] == info["zeros_before"] == 7


def test_bitmask_packs_row_major_little_endian():
    mask = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    packed = pack_bitmask(mask)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0b10000001, 1, 0b10]
    assert torch.equal(unpack_bitmask(packed, mask.numel()).reshape(mask.shape), mask)


def test_head_scores_group_query_heads_with_their_kv_head():
    # 4 query heads, 2 KV heads, head_dim 2: heads 0,1 -> group 0; heads 2,3 -> group 1
    channel = torch.tensor([1.0, 1.0, 2.0, 0.0, 3.0, 0.0, 0.0, 0.0])
    assert group_scores(channel, 4, 2, 2, power=1).tolist() == [4.0, 3.0]
    assert group_scores(channel, 4, 2, 2, power=2).tolist() == [6.0, 9.0]  # FLAP squares before summing
    assert keep_top(torch.tensor([1.0, 3.0, 3.0, 0.5]), 2).tolist() == [1, 2]
    assert keep_top(torch.tensor([2.0, 1.0, 2.0]), 1).tolist() == [0]  # ties: the lower index


def test_qk_permutation_is_llama_cpp_s_and_inverts():
    w = torch.arange(8.0)[:, None]  # one head of dim 8: rotate-half halves (0..3 | 4..7)
    assert permute_qk(w, 1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]  # interleaved pairs
    x = torch.randn(24, 5)
    assert torch.equal(unpermute_qk(permute_qk(x, 3), 3), x)


# ---- structured: the small model computes what the zeroed big one does ---------------------------

def _kept_rows(new: torch.Tensor, old: torch.Tensor) -> list[int]:
    """Which rows of ``old`` the rows of ``new`` are (random rows are unique)."""
    return [int(torch.nonzero((old == row).all(dim=1)).flatten()[0]) for row in new]


@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
@pytest.mark.parametrize("structure, sparsity", [("mlp", 0.3), ("heads", 0.15), ("both", 0.35)])
def test_shrunk_model_equals_zeroed_model_plus_biases(method, structure, sparsity):
    dense = _gqa_model()
    model = copy.deepcopy(dense)
    report = _prune(model, method, sparsity, structure)
    assert hook_count(model) == 0
    cfg = model.config
    assert report.structured["removed_fraction_achieved"] == pytest.approx(sparsity, abs=0.06)
    windows = _windows()
    mlp_means = dense_means(dense, windows, lambda b: b.mlp.down_proj)
    attn_means = dense_means(dense, windows, lambda b: b.self_attn.o_proj)
    zeroed = copy.deepcopy(dense)
    hd = cfg.head_dim
    for i, (small, big) in enumerate(zip(model.model.layers, zeroed.model.layers)):
        inter = big.mlp.gate_proj.out_features
        kept = _kept_rows(small.mlp.gate_proj.weight, big.mlp.gate_proj.weight)
        removed = sorted(set(range(inter)) - set(kept))
        heads_kept = sorted({r // hd for r in _kept_rows(small.self_attn.q_proj.weight,
                                                         big.self_attn.q_proj.weight)})
        cols = [h * hd + d for h in range(8) if h not in heads_kept for d in range(hd)]
        kv_kept = {h // 2 for h in heads_kept}
        kv_rows = _kept_rows(small.self_attn.k_proj.weight, big.self_attn.k_proj.weight)
        assert {r // hd for r in kv_rows} == kv_kept
        assert len(heads_kept) == 2 * len(kv_kept)  # a KV head goes with both its query heads
        biases = {}
        if method == "flap":  # the removed inputs' dense mean contribution, computed here independently
            biases["mlp"] = big.mlp.down_proj.weight[:, removed] @ mlp_means[i][removed]
            biases["attn"] = big.self_attn.o_proj.weight[:, cols] @ attn_means[i][cols]
        with torch.no_grad():
            big.mlp.gate_proj.weight[removed] = 0
            big.mlp.up_proj.weight[removed] = 0
            big.mlp.down_proj.weight[:, removed] = 0
            big.self_attn.q_proj.weight[cols] = 0
            big.self_attn.o_proj.weight[:, cols] = 0
            for proj in (big.self_attn.k_proj, big.self_attn.v_proj):
                proj.weight[[g * hd + d for g in range(4) if g not in kv_kept for d in range(hd)]] = 0
        if biases:
            big.mlp.down_proj.register_forward_hook(lambda _m, _a, out, b=biases["mlp"]: out + b)
            big.self_attn.o_proj.register_forward_hook(lambda _m, _a, out, b=biases["attn"]: out + b)
    ids = _windows(2, 24, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, zeroed(ids).logits, atol=2e-5, rtol=1e-4)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in dense.parameters())
    expect_bias = method == "flap"
    assert bool(getattr(cfg, "mlp_bias", False)) == (expect_bias and structure != "heads")
    assert bool(cfg.attention_bias) == (expect_bias and structure != "mlp")


def test_structured_checkpoint_loads_without_llmprune(tmp_path):
    model = _gqa_model()
    _prune(model, "flap", 0.35, "both", multiple=8)
    assert model.config.intermediate_size % 8 == 0
    save_pruned(model, make_tokenizer(), tmp_path / "small", {"method": "flap"})
    dense_dir = tmp_path / "dense"
    _gqa_model().save_pretrained(dense_dir)
    ids = _windows(1, 16, seed=3)
    torch.save(ids, tmp_path / "ids.pt")
    expected = model(ids).logits
    script = (f"import sys; sys.modules['llmprune'] = None\n"  # plain transformers, no llmprune
              f"import torch; from transformers import AutoModelForCausalLM\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'small')!r}, dtype=torch.float32)\n"
              f"torch.save(m(torch.load({str(tmp_path / 'ids.pt')!r})).logits, "
              f"{str(tmp_path / 'out.pt')!r})\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=1e-5, rtol=1e-5)
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "small") < size(dense_dir)


def test_structured_bad_input_is_one_clear_error():
    with pytest.raises(LlmpruneError, match="outside \\(0, 1\\)"):
        _prune(_gqa_model(), "wanda-sp", 0.0)
    with pytest.raises(LlmpruneError, match="leave no KV group"):
        _prune(_gqa_model(), "wanda-sp", 0.3, "heads")
    with pytest.raises(LlmpruneError, match="every MLP channel"):
        _prune(_gqa_model(), "flap", 0.95, "mlp")
    with pytest.raises(LlmpruneError, match="does not apply"):
        prune(_gqa_model(), None, PruneConfig(method="flap", pattern="2:4"), windows=_windows())
    with pytest.raises(LlmpruneError, match="unknown quantization type"):
        PruneConfig(quantize="int4")


# ---- compressed checkpoint -----------------------------------------------------------------------

def _save_compressed(model, path, quantize=None, dtype=None):
    counts = {}
    save_pruned(model, make_tokenizer(), path, {"model": "tiny"},
                write_weights=lambda m, f: counts.update(write_compressed(m, f, quantize=quantize,
                                                                          dtype=dtype)))
    return counts


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_compressed_checkpoint_restores_identical_weights(quantize, tmp_path):
    model = make_model("llama", hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=400)
    prune(model, make_tokenizer(), PruneConfig(method="wanda", sparsity=0.5, quantize=quantize,
                                               calib=CalibConfig(nsamples=2, seqlen=32)), windows=_windows(2),
          progress=False)
    counts = _save_compressed(model, tmp_path / "c", quantize)
    assert not (tmp_path / "c" / "model.safetensors").exists()  # plain from_pretrained must refuse, not guess
    loaded, _ = load_model(str(tmp_path / "c"), dtype="auto")
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the targets, counted over the pruned Linear weights (fp16 values for the unquantized one)
    half = _save_compressed(model, tmp_path / "h", quantize, dtype="float16")
    ratio = half["encoded_bytes"] / half["encoded_fp16_bytes"]
    assert ratio <= (0.32 if quantize else 0.57), ratio
    assert counts["layers"] == 14


def test_compressed_structured_and_cli_model_dir(tmp_path, capsys):
    model = _gqa_model()
    _prune(model, "wanda-sp", 0.3, "both", quantize="int8")
    _save_compressed(model, tmp_path / "c", "int8")
    loaded, _ = load_model(str(tmp_path / "c"), dtype="float32")
    ids = _windows(1, 16, seed=2)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    data = tmp_path / "eval.txt"
    data.write_text(" ".join(WORDS * 20))
    assert main(["eval", "--model", str(tmp_path / "c"), "--dataset", str(data), "--seqlen", "16",
                 "--no-progress"]) == 0


@pytest.mark.parametrize("tag, needle", [
    ({}, "no llmprune compressed-format version tag"),
    ({"format": "llmprune.compressed", "version": "99"}, "version '99'")])
def test_compressed_version_tag_is_checked(tag, needle, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    _save_compressed(_gqa_model(), tmp_path / "c")
    weights = tmp_path / "c" / WEIGHTS_FILE
    save_file(load_file(str(weights)), str(weights), metadata=tag or None)
    with pytest.raises(LlmpruneError, match=needle):
        compressed_metadata(tmp_path / "c")
    assert main(["eval", "--model", str(tmp_path / "c"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle.split("'")[0] in err


# ---- GGUF ----------------------------------------------------------------------------------------

def _gguf_roundtrip(model, tmp_path, kind="f16"):
    from transformers import AutoModelForCausalLM

    out = tmp_path / f"m-{kind}.gguf"
    export_gguf(model, make_tokenizer(), out, kind)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    ids = _windows(2, 24, seed=7)
    with torch.no_grad():
        return model(ids).logits, back(ids).logits, back


def test_gguf_f16_roundtrip_matches_to_fp16_tolerance(tmp_path):
    model = make_model("llama", vocab_size=400)
    ours, theirs, _ = _gguf_roundtrip(model, tmp_path)
    torch.testing.assert_close(theirs, ours, atol=2e-3, rtol=1e-2)
    ours, theirs, _ = _gguf_roundtrip(model, tmp_path, "q8_0")
    assert (theirs - ours).abs().max() < 0.05


def test_gguf_export_of_a_head_pruned_model_keeps_its_smaller_shapes(tmp_path):
    model = _gqa_model(vocab_size=400)
    _prune(model, "wanda-sp", 0.35, "both", multiple=32)
    assert model.config.num_attention_heads < 8 and model.config.head_dim == 8
    ours, theirs, back = _gguf_roundtrip(model, tmp_path)
    assert back.config.intermediate_size == model.config.intermediate_size
    assert (back.config.num_attention_heads, back.config.num_key_value_heads) == (
        model.config.num_attention_heads, model.config.num_key_value_heads)
    torch.testing.assert_close(theirs, ours, atol=2e-3, rtol=1e-2)


def test_gguf_writes_bias_compensation_and_drops_zero_biases(tmp_path):
    import gguf

    model = _gqa_model(vocab_size=400)
    _prune(model, "flap", 0.35, "both", multiple=32)
    out = tmp_path / "flap.gguf"
    export_gguf(model, make_tokenizer(), out)
    reader = gguf.GGUFReader(str(out))
    names = {t.name: t for t in reader.tensors}
    assert "blk.0.attn_output.bias" in names and "blk.0.ffn_down.bias" in names
    assert "blk.0.attn_q.bias" not in names and "blk.0.ffn_gate.bias" not in names  # zeros left out
    bias = torch.from_numpy(names["blk.1.ffn_down.bias"].data.copy())
    torch.testing.assert_close(bias, model.model.layers[1].mlp.down_proj.bias.detach())
    q = torch.from_numpy(gguf.dequantize(names["blk.1.attn_q.weight"].data,
                                         names["blk.1.attn_q.weight"].tensor_type))
    torch.testing.assert_close(unpermute_qk(q.reshape(-1, 64), model.config.num_attention_heads),
                               model.model.layers[1].self_attn.q_proj.weight.detach(), atol=1e-3, rtol=1e-3)


def _model_dir(path: Path, family: str = "llama") -> Path:
    make_model(family, vocab_size=400).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_export_cli_and_bad_inputs(tmp_path, capsys):
    src = _model_dir(tmp_path / "model")
    assert main(["export", str(src), str(tmp_path / "m.gguf"), "--type", "q8_0"]) == 0
    assert "Q8_0" in capsys.readouterr().out
    assert main(["export", str(src), str(tmp_path / "m.gguf")]) == 2  # exists: never replaced silently
    assert "exists" in capsys.readouterr().err
    other = _model_dir(tmp_path / "qwen", "qwen2")
    assert main(["export", str(other), str(tmp_path / "q.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not describe model type 'qwen2'" in err
    assert main(["export", str(src), str(tmp_path / "m.bin")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "model", "qwen"]  # nothing half-written


def test_prune_cli_structured_int8_compressed_then_compress_and_export(tmp_path, capsys):
    root = tmp_path
    model_dir = root / "model"
    _gqa_model(vocab_size=400).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    docs = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(120 + 10 * i)) for i in range(8)]
    (root / "calib.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (root / "eval.txt").write_text(" ".join(docs))
    base = ["prune", "--model", str(model_dir), "--calib", str(root / "calib.jsonl"), "--nsamples", "4",
            "--seqlen", "32", "--eval", str(root / "eval.txt"), "--no-progress", "--skip-dense"]
    assert main(base + ["--method", "flap", "--sparsity", "0.3", "--structure", "both",
                        "--channel-multiple", "8", "--quantize", "int8", "--save", str(root / "c"),
                        "--save-format", "compressed", "--json", str(root / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "compressed checkpoint" in out
    record = json.loads((root / "r.json").read_text())
    assert record["prune"]["structured"]["keep_groups"] < 4
    assert record["prune"]["quantization"]["type"] == "int8"
    assert json.loads((root / "c" / "llmprune.json").read_text())["checkpoint_format"] == "compressed"
    # a dense pruned checkpoint, then `compress` and `export` of it
    assert main(base + ["--method", "wanda", "--save", str(root / "d")]) == 0
    assert main(["compress", str(root / "d"), str(root / "dc"), "--quantize", "int8"]) == 0
    loaded, _ = load_model(str(root / "dc"), dtype="float32")
    assert json.loads((root / "dc" / "llmprune.json").read_text())["compressed_from"] == str(root / "d")
    assert main(["export", str(root / "dc"), str(root / "dc.gguf")]) == 0
    capsys.readouterr()
    for bad, needle in [(["--method", "flap", "--sparsity", "0"], "outside (0, 1)"),
                        (["--method", "flap", "--structure", "heads", "--sparsity", "0.5"], "no KV group"),
                        (["--quantize", "int4"], "unknown quantization type"),
                        (["--save-format", "compressed"], "give --save DIR"),
                        (["--method", "wanda-sp", "--structure", "rows"], "unknown structure")]:
        assert main([a for a in base + bad if a != "--skip-dense"]) == 2, bad  # before any evaluation
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, (bad, err)
    assert main(["compress", str(root / "d"), str(root / "dc")]) == 2  # not empty: needs --overwrite
    assert "already exists" in capsys.readouterr().err


# ---- the real model ------------------------------------------------------------------------------

def test_smollm2_gguf_export_keeps_the_bundled_metadata(smollm2, tmp_path):
    import gguf

    from llmprune.models import bundled_model_path

    model, tokenizer = smollm2
    out = tmp_path / "smollm2.gguf"
    export_gguf(model, tokenizer, out, "q8_0", bundled_model_path())
    source = gguf.GGUFReader(str(bundled_model_path()))
    exported = gguf.GGUFReader(str(out))
    describing = [k for k in source.fields if not k.startswith("GGUF.")
                  and k not in ("general.file_type", "general.quantization_version")]
    missing = [k for k in describing if k not in exported.fields]
    assert not missing, missing
    for key in ("llama.feed_forward_length", "llama.attention.head_count_kv", "tokenizer.ggml.pre"):
        assert exported.fields[key].contents() == source.fields[key].contents()


# ---- compressed-tensors (optional package) ----------------------------------------------------------

def test_compressed_tensors_int8_roundtrip_through_transformers(tmp_path):
    pytest.importorskip("compressed_tensors", reason="the compressed-tensors extra is not installed")
    from transformers import AutoModelForCausalLM

    from llmprune.export.compressed_tensors import write_compressed_tensors

    model = _gqa_model(vocab_size=400)
    prune(model, make_tokenizer(), PruneConfig(method="wanda", sparsity=0.5, quantize="int8",
                                               calib=CalibConfig(nsamples=2, seqlen=32)), windows=_windows(2),
          progress=False)
    counts = {}
    save_pruned(model, make_tokenizer(), tmp_path / "ct", {"model": "tiny"},
                write_weights=lambda m, f: counts.update(write_compressed_tensors(m, f, "int8")))
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
    ids = _windows(1, 16, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    assert counts["encoded_bytes"] / counts["encoded_fp16_bytes"] < 0.55  # int8 + scales, no sparse storage
    assert hook_count(model) == 0 and model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32


def test_compressed_tensors_needs_int8(tmp_path, capsys):
    src = _model_dir(tmp_path / "model")
    assert main(["compress", str(src), str(tmp_path / "ct"), "--format", "compressed-tensors"]) == 2
    assert "--quantize int8" in capsys.readouterr().err
    assert not (tmp_path / "ct").exists()


def test_the_format_registry_saves_gguf_and_keeps_an_existing_file(tmp_path):
    """save(..., "gguf") through the registry writes what `llmprune export` writes, and refuses to
    replace a file without overwrite."""
    from transformers import AutoModelForCausalLM

    from llmprune.errors import LlmpruneError
    from llmprune.export import save

    model = make_model("llama", vocab_size=400)
    out = tmp_path / "m.gguf"
    line = save(model, make_tokenizer(), out, {}, False, "gguf")
    assert out.is_file() and str(out) in line
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    assert back.config.num_hidden_layers == model.config.num_hidden_layers
    before = out.read_bytes()
    with pytest.raises(LlmpruneError, match="exists"):
        save(model, make_tokenizer(), out, {}, False, "gguf")
    assert out.read_bytes() == before
    save(model, make_tokenizer(), out, {}, True, "gguf", gguf_type="q8_0")
    assert out.read_bytes() != before
