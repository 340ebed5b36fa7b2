"""Out-of-core pruning (offload.py): blocks kept in CPU memory or on disk, one block materialised
at a time, the same weights as in-memory pruning, and a checkpoint saved one block at a time."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import llmprune.models as models_module
import llmprune.offload as offload_module
from conftest import make_model, make_tokenizer, write_local_setup
from llmprune.blocks import hook_count
from llmprune.cli import main
from llmprune.config import CalibConfig, PruneConfig
from llmprune.engine import prune
from llmprune.errors import LlmpruneError
from llmprune.io import save_pruned
from llmprune.models import get_blocks, load_model
from llmprune.offload import BlockStore, load_for_offload, save_offloaded

LAYERS = 3


def _windows(n=6, seqlen=32, vocab=512, seed=3):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _config(method="wanda", **kw):
    return PruneConfig(method=method, calib=CalibConfig(nsamples=6, seqlen=32, batch_size=4), **kw)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def _materialised(blocks) -> int:
    """Blocks holding real weights now (disk: the others are meta tensors)."""
    return sum(any(p.device.type != "meta" for p in block.parameters()) for block in blocks)


def _one_at_a_time(events: list, blocks: int) -> None:
    """Each block loaded, then released, before the next one is loaded."""
    moves = [e for e in events if e[0] in ("load", "release")]
    assert moves == [(kind, i) for i in range(blocks) for kind in ("load", "release")]


@pytest.fixture(scope="module")
def base():
    return make_model("llama", layers=LAYERS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny LLaMA with tied embeddings (as SmolLM2) saved as an HF directory, and its tokenizer."""
    root = tmp_path_factory.mktemp("ckpt")
    make_model("llama", layers=LAYERS, tie_word_embeddings=True).save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    return root / "model"


# ------------------------------------------------------------ the library: same weights, one block at a time

@pytest.mark.parametrize("mode", ["cpu", "disk"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_offloaded_pruning_gives_the_in_memory_weights_bit_for_bit(base, mode, method, pattern, tmp_path):
    expected = copy.deepcopy(base)
    prune(expected, None, _config(method, pattern=pattern), windows=_windows(), progress=False)
    model = copy.deepcopy(base)
    folder = {"offload_dir": str(tmp_path)} if mode == "disk" else {}
    report = prune(model, None, _config(method, pattern=pattern, offload=mode, **folder), windows=_windows(),
                   progress=False)
    _assert_same_weights(expected.state_dict(), model.state_dict())
    assert report.offload["mode"] == mode and report.offload["peak_blocks"] == 1
    assert report.offload["loads"] == report.offload["writes"] == LAYERS
    assert hook_count(model) == 0
    assert list(tmp_path.iterdir()) == []  # the private folder is gone; the blocks are back in memory


@pytest.mark.parametrize("extra", [{"allocation": "owl", "quantize": "int8"},
                                   {"method": "wanda-sp", "sparsity": 0.3},
                                   {"true_sequential": True, "activations": "cpu"}, {"method": "magnitude"}])
def test_allocation_structured_and_quantized_runs_are_offloaded_too(base, extra, tmp_path):
    extra = dict(extra)
    method = extra.pop("method", "wanda")
    expected = copy.deepcopy(base)
    prune(expected, None, _config(method, **extra), windows=_windows(), progress=False)
    model = copy.deepcopy(base)
    report = prune(model, None, _config(method, offload="disk", offload_dir=str(tmp_path), **extra),
                   windows=_windows(), progress=False)
    _assert_same_weights(expected.state_dict(), model.state_dict())
    assert report.offload["peak_blocks"] == 1
    if extra.get("allocation") == "owl":  # the dense statistics pass reads every block once, writes none
        assert report.offload["loads"] == 2 * LAYERS and report.offload["writes"] == LAYERS
        assert report.quantization["layers"] == 7 * LAYERS


def test_activations_on_the_cpu_give_the_same_weights(base):
    """On a CPU-only machine --activations cpu changes nothing but must run through the same code."""
    expected, model = copy.deepcopy(base), copy.deepcopy(base)
    prune(expected, None, _config("sparsegpt"), windows=_windows(), progress=False)
    prune(model, None, _config("sparsegpt", activations="cpu"), windows=_windows(), progress=False,
          device="cpu")
    _assert_same_weights(expected.state_dict(), model.state_dict())


def test_at_most_one_block_holds_weights_while_pruning_from_a_checkpoint(checkpoint, tmp_path, monkeypatch):
    """Instrumented: every forward of a block and every load counts the blocks with real weights."""
    model, tokenizer, store = load_for_offload(str(checkpoint), "disk", dtype="float32", device="cpu",
                                               folder=tmp_path)
    blocks = get_blocks(model)
    assert _materialised(blocks) == 0 and store.source.startswith("checkpoint")
    seen = []
    real = BlockStore.materialise

    def counting(self, index, device=None):
        block = real(self, index, device)
        seen.append(_materialised(blocks))
        return block

    monkeypatch.setattr(BlockStore, "materialise", counting)
    handles = [b.register_forward_pre_hook(lambda *_: seen.append(_materialised(blocks))) for b in blocks]
    try:
        report = prune(model, tokenizer, _config("sparsegpt", pattern="2:4",
                                                 offload="disk", offload_dir=str(tmp_path)),
                       windows=_windows(), progress=False, store=store)
    finally:
        for handle in handles:
            handle.remove()
    assert seen and max(seen) == 1
    _one_at_a_time(store.events, LAYERS)
    assert report.offload["peak_blocks"] == 1 and report.offload["source"].startswith("checkpoint")
    assert _materialised(blocks) == 0  # pruned, and back on disk
    store.close()


def test_a_skeleton_load_is_the_model_from_pretrained(checkpoint, tmp_path):
    """Only the parts outside the blocks are read; materialised, it is from_pretrained's model."""
    reference, _ = load_model(str(checkpoint), dtype="float32")
    model, _, store = load_for_offload(str(checkpoint), "disk", dtype="float32",
                                       device="cpu", folder=tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as loaded
    assert model.model.embed_tokens.weight.device.type == "cpu"
    with store.whole():
        _assert_same_weights(reference.state_dict(), model.state_dict())
        for (name, a), (_, b) in zip(reference.named_buffers(), model.named_buffers()):
            assert torch.equal(a, b), name
        ids = _windows(2)
        assert torch.equal(reference(ids).logits, model(ids).logits)
    assert _materialised(get_blocks(model)) == 0
    store.close()


def test_a_source_with_other_names_is_loaded_once_then_spilled(tmp_path):
    """A checkpoint whose tensors are not the model's by name (here llmprune's compressed format)
    is loaded in full once, then its blocks go to the offload folder; the weights are the same."""
    from llmprune.export.compressed import write_compressed

    source = make_model("llama", layers=2)
    save_pruned(source, make_tokenizer(), tmp_path / "packed", {},
                write_weights=lambda m, f: write_compressed(m, f))
    expected, _ = load_model(str(tmp_path / "packed"), dtype="float32")
    model, _, store = load_for_offload(str(tmp_path / "packed"), "disk", dtype="float32", device="cpu",
                                       folder=tmp_path / "off")
    assert store.source == "spilled from memory" and _materialised(get_blocks(model)) == 0
    with store.whole():
        _assert_same_weights(expected.state_dict(), model.state_dict())
    store.close()
    assert list((tmp_path / "off").iterdir()) == []


def test_a_failed_run_leaves_no_block_files_and_a_usable_model(base, tmp_path, monkeypatch):
    import llmprune.engine.mask as pipeline_module

    model = copy.deepcopy(base)
    real, calls = pipeline_module.prune_layer, []

    def failing(name, *args, **kwargs):
        calls.append(name)
        if name.startswith("layers.1."):
            raise RuntimeError("simulated failure in block 1")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "prune_layer", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        prune(model, None, _config(offload="disk", offload_dir=str(tmp_path)),
              windows=_windows(), progress=False)
    assert list(tmp_path.iterdir()) == [] and _materialised(get_blocks(model)) == LAYERS
    expected = copy.deepcopy(base)  # block 0 pruned, the others as they were
    monkeypatch.setattr(pipeline_module, "prune_layer", real)
    prune(expected, None, _config(include=("layers.0.*",)), windows=_windows(), progress=False)
    _assert_same_weights(expected.state_dict(), model.state_dict())


def test_only_this_machines_dead_offload_folders_are_removed(base, tmp_path):
    import os
    import socket

    host = socket.gethostname()
    dead = tmp_path / f".llmprune-offload-{host}+999999999.abc"
    alive = tmp_path / f".llmprune-offload-{host}+{os.getpid()}.x"
    elsewhere, theirs = tmp_path / ".llmprune-offload-othernode+999999999.abc", tmp_path / "user-data"
    for folder in (dead, alive, elsewhere, theirs):
        folder.mkdir()
    store = BlockStore.spill(copy.deepcopy(base), "disk", folder=tmp_path)
    assert not dead.exists() and alive.exists() and elsewhere.exists() and theirs.exists()
    assert store.folder.parent == tmp_path
    assert store.folder.name.startswith(f".llmprune-offload-{host}+{os.getpid()}.")
    store.close()
    assert not store.folder.exists()


# ---------------------------------------------------------------- saving one block at a time

def _checkpoint_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return dict(sorted(tensors.items()))


@pytest.mark.parametrize("link", [True, False])
def test_blockwise_save_is_the_in_memory_checkpoint(checkpoint, tmp_path, monkeypatch, link):
    config = _config("wanda", pattern="2:4")
    expected, tokenizer = load_model(str(checkpoint), dtype="float32")
    prune(expected, tokenizer, config, windows=_windows(), progress=False)
    save_pruned(expected, tokenizer, tmp_path / "memory", {"how": "in memory"})

    offloaded = dataclass_replace(config, offload="disk", offload_dir=str(tmp_path / "off"))
    model, tokenizer, store = load_for_offload(str(checkpoint), "disk", dtype="float32", device="cpu",
                                               folder=tmp_path / "off")
    prune(model, tokenizer, offloaded, windows=_windows(), progress=False, store=store)
    if not link:  # the path for blocks whose names transformers converts: read, convert, write
        monkeypatch.setattr(offload_module, "_link_block", lambda *a, **k: False)
    live = []
    real = BlockStore.read_block

    def watching(self, index):
        live.append(len(self.live))
        out = real(self, index)
        live.append(_materialised(self.blocks))
        return out

    monkeypatch.setattr(BlockStore, "read_block", watching)
    save_offloaded(model, store, tokenizer, tmp_path / "blocks", {"how": "block by block"})
    store.close()

    ours, theirs = _checkpoint_tensors(tmp_path / "blocks"), _checkpoint_tensors(tmp_path / "memory")
    _assert_same_weights(theirs, ours)
    assert "lm_head.weight" not in ours  # tied: stored once, as save_pretrained does
    assert len(list((tmp_path / "blocks").glob("model-*.safetensors"))) == LAYERS + 1
    assert (live == []) if link else (live and max(live) == 0)
    assert _materialised(get_blocks(model)) == 0
    for name in ("config.json", "generation_config.json"):
        a, b = (json.loads((tmp_path / d / name).read_text()) for d in ("memory", "blocks"))
        assert a == b, name
    listed = json.loads((tmp_path / "blocks" / "llmprune.json").read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in (tmp_path / "blocks").iterdir())

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "blocks")
    _assert_same_weights(expected.state_dict(), loaded.state_dict())


def dataclass_replace(config, **kw):
    import dataclasses

    return dataclasses.replace(config, **kw)


# ---------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def local_setup(tmp_path_factory):
    return write_local_setup(tmp_path_factory.mktemp("offload-cli"))


def _prune_args(root, *extra, dense: bool = False):
    return ["prune", "--model", str(root / "model"), "--calib", str(root / "calib.jsonl"), "--nsamples", "4",
            "--seqlen", "32", "--eval", str(root / "eval.txt"), "--no-progress",
            *([] if dense else ["--skip-dense"]), *extra]


def test_cli_offload_disk_prunes_evaluates_and_saves_as_in_memory(local_setup, tmp_path, capsys):
    """Dense and pruned evaluation materialise the whole model (it fits here); the pruning and
    the save go one block at a time; every number and weight is the in-memory run's."""
    assert main(_prune_args(local_setup, "--method", "sparsegpt", "--json", str(tmp_path / "memory.json"),
                            "--save", str(tmp_path / "memory"), dense=True)) == 0
    assert main(_prune_args(local_setup, "--method", "sparsegpt", "--offload", "disk", "--offload-dir",
                            str(tmp_path / "off"), "--json", str(tmp_path / "disk.json"),
                            "--save", str(tmp_path / "disk"), dense=True)) == 0
    printed = capsys.readouterr().out
    assert "offload disk" in printed and "at most 1 block(s) materialised at once" in printed
    memory, disk = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("memory", "disk"))
    for key in ("perplexity", "dense"):  # the dense model and the pruned one evaluate the same
        ppl = [{k: v["ppl"] for k, v in (r[key] if key == "perplexity" else r[key]["perplexity"]).items()}
               for r in (memory, disk)]
        assert ppl[0] == ppl[1] and ppl[0], key
    assert disk["config"]["offload"] == "disk" and disk["prune"]["offload"]["peak_blocks"] == 1
    _assert_same_weights(_checkpoint_tensors(tmp_path / "memory"), _checkpoint_tensors(tmp_path / "disk"))
    assert list((tmp_path / "off").iterdir()) == []  # the blocks' folder is removed at the end


def test_cli_prunes_and_saves_a_model_it_never_holds_whole(local_setup, tmp_path, monkeypatch):
    """No evaluation: from load to save, no more than one block ever holds its weights."""
    counts = []
    real = BlockStore.materialise

    def counting(self, index, device=None):
        block = real(self, index, device)
        counts.append(_materialised(self.blocks))
        return block

    def never(*_, **__):
        raise AssertionError("the whole model was materialised")

    monkeypatch.setattr(BlockStore, "materialise", counting)
    monkeypatch.setattr(BlockStore, "whole", never)
    assert main(_prune_args(local_setup, "--offload", "disk", "--offload-dir", str(tmp_path / "off"),
                            "--eval", "", "--pattern", "2:4", "--save", str(tmp_path / "pruned"))) == 0
    assert counts and max(counts) == 1
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    weight = loaded.model.layers[1].mlp.down_proj.weight
    assert (weight.view(-1, 4) != 0).sum(dim=1).eq(2).all()  # 2:4, as saved block by block


def test_cli_offload_cpu_with_activations_on_the_cpu(local_setup, tmp_path):
    out = tmp_path / "r.json"
    assert main(_prune_args(local_setup, "--offload", "cpu", "--activations", "cpu", "--device", "cpu",
                            "--json", str(out))) == 0
    record = json.loads(out.read_text())
    assert record["config"]["activations"] == "cpu" and record["prune"]["offload"]["mode"] == "cpu"
    assert record["prune"]["overall_sparsity"] == pytest.approx(0.5)


@pytest.fixture
def no_load(monkeypatch):
    """Bad input must fail before any model loads."""
    def refuse(*_, **__):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(models_module, "load_model", refuse)
    monkeypatch.setattr(offload_module, "load_for_offload", refuse)


@pytest.mark.parametrize("args, needle", [
    (["--offload", "disk"], "give --offload-dir DIR"),
    (["--offload", "gpu"], "unknown offload mode 'gpu': use cpu, disk"),
    (["--activations", "gpu"], "unknown activations place 'gpu'"),
    (["--offload-dir", "{tmp}/off"], "add --offload disk"),
    (["--offload", "disk", "--offload-dir", "{tmp}/file"], "file is a file"),
    (["--offload", "disk", "--offload-dir", "{tmp}/file/sub"], "file is not a folder"),
    (["--offload", "disk", "--offload-dir", "{tmp}/link"], "link is a symbolic link"),
    (["--offload", "cpu", "--device-map", "auto"], "drop --device-map"),
    (["--offload", "disk", "--offload-dir", "{tmp}/off", "--save", "{tmp}/s", "--save-format", "compressed"],
     "llmprune compress"),
])
def test_bad_offload_input_is_one_line_before_the_model_loads(local_setup, tmp_path,
                                                              args, needle, capsys, no_load):
    (tmp_path / "file").write_text("x")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(_prune_args(local_setup, *args)) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    if "folder" in needle or "file" in needle or "link" in needle:
        assert str(tmp_path) in err  # the folder is named


def test_unwritable_offload_dir_is_named(tmp_path, monkeypatch):
    import os

    (tmp_path / "ro").mkdir()
    # root may write anywhere
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path / "ro")
    with pytest.raises(LlmpruneError,
                       match=r"--offload-dir .*ro is not writable: .*give a folder you can write to"):
        offload_module.check_offload_dir(tmp_path / "ro")


# ---------------------------------------------------------------- recipes

def test_recipe_offload_key_flows_into_the_runs_and_keeps_results_valid(local_setup, tmp_path):
    from llmprune.runner import run_recipe

    def recipe(extra: str) -> Path:
        path = tmp_path / "tiny.yaml"
        path.write_text(f"""
name: tiny
defaults:
  model: "{local_setup / 'model'}"
  device: cpu
  prune: {{calib: {{dataset: "{local_setup / 'calib.jsonl'}", nsamples: 2, seqlen: 32}}{extra}}}
  eval: {{datasets: ["{local_setup / 'eval.txt'}"], seqlen: 32}}
dense: false
runs:
  - {{name: wanda-2:4, prune: {{method: wanda, pattern: "2:4"}}}}
""")
        return path

    out = tmp_path / "out"
    (first,) = run_recipe(recipe(""), out, progress=False, report=False)
    before = json.loads(first.read_text())
    # where the blocks wait changes no result: the finished run is not redone
    run_recipe(recipe(f', offload: disk, offload_dir: "{tmp_path / "off"}"'),
               out, progress=False, report=False)
    assert json.loads(first.read_text()) == before
    (again,) = run_recipe(recipe(f', offload: disk, offload_dir: "{tmp_path / "off"}"'), tmp_path / "out2",
                          progress=False, report=False)
    record = json.loads(again.read_text())
    assert [v["ppl"] for v in record["perplexity"].values()] == \
        [v["ppl"] for v in before["perplexity"].values()]
    assert record["prune"]["offload"]["peak_blocks"] == 1
    with pytest.raises(LlmpruneError, match="run 'wanda-2:4': --offload-dir .* is a file"):
        (tmp_path / "afile").write_text("x")
        run_recipe(recipe(f', offload: disk, offload_dir: "{tmp_path / "afile"}"'), tmp_path / "out3",
                   progress=False, report=False)
    with pytest.raises(LlmpruneError, match="unknown offload mode"):
        run_recipe(recipe(", offload: tape"), tmp_path / "out4", progress=False, report=False)
