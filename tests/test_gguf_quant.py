"""Quantized GGUF (the edge path: prune -> quantize -> GGUF -> llama.cpp): q8_0 / q5_0 / q4_0 by
gguf-py, q4_k by llama.cpp's own quantizer; zeros that stay zero; widths the blocks cannot hold;
per-block widths (arrays under llama.cpp's ``deci`` architecture); a depth-pruned model's block
count; nothing left behind by an interrupted export."""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import os
import shutil
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_model, make_tokenizer
from llmprune.cli import main
from llmprune.config import GGUF_TYPES, ExportConfig
from llmprune.errors import LlmpruneError
from llmprune.export.gguf import (
    TYPES,
    block_shapes,
    check_widths,
    config_widths,
    export_gguf,
    unpermute_qk,
)

gguf = pytest.importorskip("gguf", reason="the gguf package (a dependency of llmprune) is missing")
HEAD_DIM = 16  # make_model's 64 hidden / 4 heads


def _read(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


def _weight(tensors, name) -> np.ndarray:
    """A tensor of the file, dequantized to float32 in its (rows, row length) shape."""
    t = tensors[name]
    return gguf.dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))


def _sparse_model():
    """The tiny model with half of every block Linear's weights zeroed (smallest |w| per row)."""
    model = make_model("llama", vocab_size=400)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".layers." in name:
                w = module.weight
                cut = w.abs().kthvalue(w.shape[1] // 2, dim=1, keepdim=True).values
                w[w.abs() <= cut] = 0.0
    return model


def _block_linears(model):
    """(gguf name, torch weight as the file stores it: q/k rows unpermuted by the reader) per block Linear."""
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i, block in enumerate(model.model.layers):
        for path, short in names.items():
            yield f"blk.{i}.{short}.weight", path, block.get_submodule(path).weight.detach().numpy()


def q4_0_reference(row: np.ndarray) -> np.ndarray:
    """llama.cpp's Q4_0 of one row, written here from its rule: blocks of 32 weights, d = the
    weight of largest magnitude / -8 (stored as f16), q = min(15, floor(x * (1/d) + 8.5)) in 0..15,
    dequantized as d * (q - 8). Symmetric: x = 0 gives q = 8, exactly 0."""
    blocks = row.astype(np.float32).reshape(-1, 32)
    out = np.empty_like(blocks)
    for b, x in enumerate(blocks):
        extreme = x[np.argmax(np.abs(x))]
        d = np.float32(extreme / np.float32(-8))
        inverse = np.float32(1) / d if d != 0 else np.float32(0)
        q = np.clip(np.floor(x * inverse + np.float32(8.5)), 0, 15)
        out[b] = np.float32(np.float16(d)) * (q - 8).astype(np.float32)
    return out.reshape(-1)


# ---- types ----------------------------------------------------------------------------------------

def test_the_config_and_the_writer_know_the_same_types():
    assert set(GGUF_TYPES) == set(TYPES)
    assert ExportConfig(gguf_type="q4_0").gguf_type == "q4_0"
    with pytest.raises(LlmpruneError, match="GGUF type"):
        ExportConfig(gguf_type="q4_1")  # asymmetric: would move the zeros


@pytest.mark.parametrize("kind", ["q8_0", "q5_0", "q4_0"])
def test_quantized_export_keeps_every_pruned_zero_and_records_its_type(tmp_path, kind):
    model = _sparse_model()
    out = tmp_path / f"m-{kind}.gguf"
    info = export_gguf(model, make_tokenizer(), out, kind)
    reader, tensors = _read(out)
    assert info["bytes"] == out.stat().st_size and sum(info["tensor_types"].values()) == len(tensors)
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType[TYPES[kind].file_type])
    assert reader.fields["general.quantization_version"].contents() == gguf.GGML_QUANT_VERSION
    heads = model.config.num_attention_heads, model.config.num_key_value_heads
    for name, path, weight in _block_linears(model):
        assert tensors[name].tensor_type.name == kind.upper()
        back = _weight(tensors, name)
        if path.endswith(("q_proj", "k_proj")):
            back = unpermute_qk(torch.from_numpy(back), heads[path.endswith("k_proj")]).numpy()
        zeros = weight == 0
        assert zeros.mean() >= 0.5 and (back[zeros] == 0).all(), name  # exactly zero, every one
    assert tensors["output.weight"].tensor_type.name == TYPES[kind].output  # lm_head kept at 8 bits


def test_q4_0_rows_match_an_independent_reimplementation(tmp_path):
    model = _sparse_model()
    out = tmp_path / "m.gguf"
    export_gguf(model, make_tokenizer(), out, "q4_0")
    _, tensors = _read(out)
    weight = model.model.layers[1].mlp.down_proj.weight.detach().numpy()  # not permuted
    back = _weight(tensors, "blk.1.ffn_down.weight")
    for row in (0, 17, 63):
        np.testing.assert_array_equal(back[row], q4_0_reference(weight[row]))
    # the rule itself, on a hand-made block: the extreme -1.6 gives d = 0.2
    x = np.zeros(32, dtype=np.float32)
    x[:4] = [-1.6, 0.5, 1.0, 0.31]
    expected = np.float32(np.float16(0.2)) * np.array([-8, 3, 5, 2], dtype=np.float32)
    np.testing.assert_allclose(q4_0_reference(x)[:4], expected, rtol=0, atol=0)
    assert not q4_0_reference(x)[4:].any()


# ---- widths ---------------------------------------------------------------------------------------

def test_the_dense_smollm2_widths_pass_every_type(smollm2):
    model, _ = smollm2
    widths = [w for shape in block_shapes(model) for w in shape["widths"]]
    assert {w for _, w, _ in widths} == {576, 1536}  # 576 is no multiple of 256: still no refusal
    for kind in TYPES:
        check_widths(widths, kind)
        check_widths(config_widths(model.config), kind)


def _model_dir(tmp_path, capsys, **sizes):
    """A saved tiny model (its save's progress bars read off, so stderr holds only the command's)."""
    src = tmp_path / "model"
    make_model("llama", vocab_size=400, **sizes).save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    capsys.readouterr()
    return src


def test_a_down_proj_width_the_blocks_cannot_hold_is_refused_before_the_load(tmp_path, capsys, monkeypatch):
    src = _model_dir(tmp_path, capsys, intermediate_size=100)
    import llmprune.models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    with monkeypatch.context() as patch:
        patch.setattr(llmprune.models, "load_model", no_load)
        assert main(["export", str(src), str(tmp_path / "m.gguf"), "--type", "q4_0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "down_proj" in err and "100" in err and "--channel-multiple 32" in err
    assert main(["export", str(src), str(tmp_path / "m.gguf")]) == 0  # f16 holds any width
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["m.gguf", "model"]


def test_per_block_widths_listed_in_the_config_are_checked_before_the_load():
    from transformers import LlamaConfig

    from llmprune.nonuniform_modeling import WIDTH_KEYS

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    for key, values in zip(WIDTH_KEYS, ([128, 40], [4, 2], [2, 1])):  # the dense counts stay, lists added
        setattr(config, key, values)
    widths = config_widths(config)
    assert ("model.layers.1.mlp.down_proj", 40, "mlp") in widths
    assert ("model.layers.1.self_attn.o_proj", 32, "heads") in widths
    check_widths(widths, "f16")
    with pytest.raises(LlmpruneError, match=r"model\.layers\.1\.mlp\.down_proj has input width 40"):
        check_widths(widths, "q8_0")


def _narrow(model, block: int, mlp: int | None = None, heads: tuple[int, int] | None = None):
    """Give one block its own MLP width and/or (query heads, KV heads), as per-block pruning does."""
    torch.manual_seed(block + 10)
    hidden = model.config.hidden_size
    layer = model.model.layers[block]
    if mlp is not None:
        layer.mlp.gate_proj, layer.mlp.up_proj = nn.Linear(hidden, mlp, bias=False), nn.Linear(hidden, mlp,
                                                                                               bias=False)
        layer.mlp.down_proj = nn.Linear(mlp, hidden, bias=False)
    if heads is not None:
        q, kv = heads[0] * HEAD_DIM, heads[1] * HEAD_DIM
        attn = layer.self_attn
        attn.q_proj, attn.o_proj = nn.Linear(hidden, q, bias=False), nn.Linear(q, hidden, bias=False)
        attn.k_proj, attn.v_proj = nn.Linear(hidden, kv, bias=False), nn.Linear(hidden, kv, bias=False)
        attn.num_key_value_groups = heads[0] // heads[1]
    return model.eval()


def test_per_block_widths_the_config_does_not_show_are_refused_before_writing(tmp_path):
    model = _narrow(make_model("llama", vocab_size=400), 1, mlp=48)
    with pytest.raises(LlmpruneError, match=r"model\.layers\.1\.mlp\.down_proj has input width 48.*"
                                            r"--channel-multiple 32"):
        export_gguf(model, make_tokenizer(), tmp_path / "m.gguf", "q8_0")
    model = _narrow(make_model("llama", vocab_size=400), 0, heads=(3, 1))  # 3 x 16 = 48
    with pytest.raises(LlmpruneError, match=r"layers\.0\.self_attn\.o_proj has input width 48.*head count"):
        export_gguf(model, make_tokenizer(), tmp_path / "m.gguf", "q4_0")
    assert not list(tmp_path.iterdir())
    export_gguf(model, make_tokenizer(), tmp_path / "m.gguf", "f16")  # f16: no blocks, no refusal


# ---- per-block widths and depth --------------------------------------------------------------------

def _nonuniform():
    """Block 0 with one KV group fewer (2 query heads, 1 KV head), block 1 with a 64-channel MLP."""
    return _narrow(_narrow(make_model("llama", vocab_size=400), 0, heads=(2, 1)), 1, mlp=64)


def test_per_block_widths_are_written_as_arrays_and_read_back(tmp_path):
    model = _nonuniform()
    out = tmp_path / "m.gguf"
    info = export_gguf(model, make_tokenizer(), out, "q8_0")
    reader, tensors = _read(out)
    fields = reader.fields
    assert info["architecture"] == fields["general.architecture"].contents() == "deci"
    assert fields["deci.block_count"].contents() == 2
    assert fields["deci.feed_forward_length"].contents() == [128, 64]
    assert fields["deci.attention.head_count"].contents() == [2, 4]
    assert fields["deci.attention.head_count_kv"].contents() == [1, 2]
    assert fields["deci.attention.key_length"].contents() == HEAD_DIM
    assert not any(key.startswith("llama.") for key in fields)
    for block, (heads, heads_kv) in enumerate([(2, 1), (4, 2)]):  # each block permuted with its own counts
        attn = model.model.layers[block].self_attn
        for name, proj, n in (("attn_q", attn.q_proj, heads), ("attn_k", attn.k_proj, heads_kv)):
            back = unpermute_qk(torch.from_numpy(_weight(tensors, f"blk.{block}.{name}.weight")), n)
            torch.testing.assert_close(back, proj.weight.detach(), atol=0.02, rtol=0.02)
    # equal widths stay scalars under "llama", the architecture transformers reads
    uniform = export_gguf(make_model("llama", vocab_size=400), make_tokenizer(), tmp_path / "u.gguf")
    fields = gguf.GGUFReader(str(tmp_path / "u.gguf")).fields
    assert uniform["architecture"] == "llama" and fields["llama.feed_forward_length"].contents() == 128
    assert fields["llama.attention.head_count"].contents() == 4


def test_block_count_comes_from_the_blocks_of_a_depth_pruned_model(tmp_path):
    model = make_model("llama", layers=3, vocab_size=400)
    del model.model.layers[1]  # the config still says 3: the modules decide
    info = export_gguf(model, make_tokenizer(), tmp_path / "m.gguf")
    reader, tensors = _read(tmp_path / "m.gguf")
    assert info["hparams"]["block_count"] == reader.fields["llama.block_count"].contents() == 2
    assert {name.split(".")[1] for name in tensors if name.startswith("blk.")} == {"0", "1"}
    torch.testing.assert_close(torch.from_numpy(_weight(tensors, "blk.1.ffn_down.weight")),
                               model.model.layers[1].mlp.down_proj.weight.detach(), atol=1e-3, rtol=1e-3)


# ---- interrupted exports leave nothing ----------------------------------------------------------------

def test_an_export_interrupted_while_writing_leaves_no_file(tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    for kind in ("f16", "q4_0"):
        with pytest.raises(RuntimeError, match="interrupted"):
            export_gguf(_sparse_model(), make_tokenizer(), tmp_path / "m.gguf", kind)
        assert not list(tmp_path.iterdir())


class _Params(ctypes.Structure):
    _fields_ = [("nthread", ctypes.c_int32), ("ftype", ctypes.c_int)]


def _fake_llama_cpp(monkeypatch, fail: bool = False) -> list:
    """A stand-in llama_cpp module: copies the f16 file (or fails, with a log line on fd 2), so the
    q4_k plumbing is tested where llama-cpp-python is not installed. Returns the calls' log."""
    calls = []
    module = types.ModuleType("llama_cpp")
    module.__spec__ = importlib.machinery.ModuleSpec("llama_cpp", None)
    module.LLAMA_FTYPE_MOSTLY_Q4_K_M = 15
    module.llama_model_quantize_default_params = lambda: _Params(0, 7)

    def quantize(source: bytes, target: bytes, params) -> int:
        calls.append((source.decode(), target.decode(), params._obj.ftype))
        if fail:
            os.write(2, b"llama_model_quantize: failed to quantize: disk on fire\n")
            return 1
        shutil.copyfile(source, target)
        return 0

    module.llama_model_quantize = quantize
    monkeypatch.setitem(sys.modules, "llama_cpp", module)
    return calls


def test_q4_k_goes_through_llama_cpp_and_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    calls = _fake_llama_cpp(monkeypatch)
    info = export_gguf(make_model("llama", vocab_size=400), make_tokenizer(), tmp_path / "m.gguf", "q4_k")
    (source, target, ftype), = calls
    assert ftype == 15 and source.endswith(".f16.tmp") and target != str(tmp_path / "m.gguf")
    assert info["tensor_types"] == {"F16": 16, "F32": 5}  # what the (fake) quantizer wrote
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    monkeypatch.undo()
    _fake_llama_cpp(monkeypatch, fail=True)
    src = _model_dir(tmp_path, capsys)
    assert main(["export", str(src), str(tmp_path / "k.gguf"), "--type", "q4_k"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "could not write" in err and "disk on fire" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "model"]


def test_q4_k_without_llama_cpp_is_one_line_before_the_load(tmp_path, capsys, monkeypatch):
    src = _model_dir(tmp_path, capsys)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    import llmprune.models

    monkeypatch.setattr(llmprune.models, "load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    assert main(["export", str(src), str(tmp_path / "m.gguf"), "--type", "q4_k"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "llmprune[llamacpp]" in err and "Traceback" not in err
    with pytest.raises(LlmpruneError, match=r"llmprune\[llamacpp\]"):
        export_gguf(make_model("llama", vocab_size=400), make_tokenizer(), tmp_path / "m.gguf", "q4_k")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# ---- llama.cpp itself (llama-cpp-python, when installed) ---------------------------------------------

def _llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()  # now, not at interpreter exit (when llama_cpp's library may be gone)


@pytest.mark.parametrize("kind,tolerance", [("f16", 3e-3), ("q4_k", 0.2)])
def test_llama_cpp_runs_the_per_block_export_like_torch(tmp_path, kind, tolerance):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    model = _nonuniform()
    out = tmp_path / f"m-{kind}.gguf"
    info = export_gguf(model, make_tokenizer(), out, kind)
    ids = torch.randint(0, 400, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(_llama_cpp_logits(out, ids) - ours).max() < tolerance
    if kind == "q4_k":  # llama.cpp's own rules: rows of 64/128 take its Q5_0 / Q8_0 fallbacks
        reader = gguf.GGUFReader(str(out))
        assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
        assert reader.fields["general.quantization_version"].contents() == gguf.GGML_QUANT_VERSION
        assert "F16" not in info["tensor_types"] and info["tensor_types"]["F32"] == 5
