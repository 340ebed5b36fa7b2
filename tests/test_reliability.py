"""Nothing lost at the last step (issue 20): every case a hostile probe of the eight subcommands
found, reproduced on a tiny model. Each ends in one line on stderr, exit code 2 for bad input
and 1 for a failure of the machine (full disk, file-size limit, read-only folder), with nothing
lost: earlier results and what was computed stay on disk.

The full-disk cases run the command in a subprocess under a small file-size limit
(RLIMIT_FSIZE, with SIGXFSZ ignored, so a write fails with EFBIG as on a full disk)."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_outputs import _one_line_error, _prune  # noqa: F401  (one copy of the CLI helpers)

from conftest import ROOT, make_model, make_tokenizer, write_local_setup
from llmprune.cli import main
from llmprune.errors import LlmpruneError
from llmprune.io import as_os_error, save_pruned
from llmprune.recipes import load_recipe, parse_recipe


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_local_setup(tmp_path_factory.mktemp("reliability"), docs=6)


@pytest.fixture
def no_load(monkeypatch):
    """The command must answer before any weight is read."""
    import llmprune.models
    import llmprune.offload

    def refuse(*_, **__):
        raise AssertionError("the weights were loaded before the input was refused")

    monkeypatch.setattr(llmprune.models, "load_model", refuse)
    monkeypatch.setattr(llmprune.offload, "load_for_offload", refuse)




def _file_size_limit(nbytes: int):
    def limit():  # in the child, before exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


def _llmprune(args, limit: int | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "llmprune", *map(str, args)], capture_output=True, text=True,
                          check=False, timeout=timeout, env=env,
                          preexec_fn=_file_size_limit(limit) if limit else None, **kw)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    """The one line a failed command printed, apart from progress bars (export draws the load's)."""
    lines = [line for line in proc.stderr.strip().splitlines() if "%|" not in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# ---- 1. recipes: every file a recipe writes has a name of its own ---------------------------------

def _recipe(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("name", ["_dense", ".dense", "/dense", "dense/", "Dense"])
def test_a_run_whose_file_is_the_dense_baselines_is_refused_up_front(name, tmp_path, capsys):
    recipe = _recipe(tmp_path, f"""
        defaults: {{model: smollm2-135m, prune: {{method: magnitude}}}}
        runs: [{{name: "{name}"}}, {{name: wanda, prune: {{method: wanda}}}}]
    """)
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert "dense.json" in err.lower() and "the dense baseline 'dense'" in err and repr(name) in err
    assert not out.exists()  # refused before the folder is claimed or any model loads


@pytest.mark.parametrize("names, clash", [
    (["recipe", "wanda"], "recipe.json"),  # the folder's own record of the recipe
    (["Wanda", "wanda"], "wanda.json"),  # one file where case does not count (macOS, Windows)
])
def test_a_run_whose_file_is_taken_otherwise_is_refused(names, clash, tmp_path):
    from llmprune.runner import plan

    runs = ", ".join(f'{{name: "{n}"}}' for n in names)
    recipe = load_recipe(_recipe(tmp_path, f"""
        defaults: {{model: m/x, prune: {{method: magnitude}}}}
        dense: false
        runs: [{runs}]
    """))
    with pytest.raises(LlmpruneError, match=clash):
        plan(recipe)


def test_a_run_name_too_long_for_a_file_name_is_refused(tmp_path):
    with pytest.raises(LlmpruneError, match="characters long"):
        parse_recipe({"defaults": {"model": "m/x"}, "runs": [{"name": "w" * 300}]})


# ---- 2. a finished prune is never lost at its last step ------------------------------------------

@pytest.mark.parametrize("paths, needle", [
    (("--json", "{t}/X", "--save", "{t}/X"), "are the same path"),
    (("--json", "{t}/ckpt/r.json", "--save", "{t}/ckpt"), "is inside --save"),
    (("--offload", "disk", "--offload-dir", "{t}/X", "--save", "{t}/X"), "are the same path"),
    (("--offload", "disk", "--offload-dir", "{t}/ckpt/off", "--save", "{t}/ckpt"), "is inside --save"),
    (("--json", "{t}/X", "--offload", "disk", "--offload-dir", "{t}/X"), "are the same path"),
    (("--save", "{model}", "--overwrite"), "are the same path"),
    (("--json", "{calib}",), "are the same path"),
])
def test_outputs_that_would_collide_are_refused_before_the_model_loads(paths, needle, setup, tmp_path, capsys,
                                                                       no_load):
    args = [a.format(t=tmp_path, model=setup / "model", calib=setup / "calib.jsonl") for a in paths]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(_prune(setup, *args)) == 2
    assert needle in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.fixture
def mount_point(monkeypatch):
    """Simulate ``--save MNT`` on an empty mount point: renaming onto it, or it away, is EBUSY."""
    import llmprune.io

    target: dict = {}
    real_rename = os.rename

    def rename(src, dst, *a, **k):
        if Path(dst) == target.get("path") or Path(src) == target.get("path"):
            raise OSError(errno.EBUSY, "Device or resource busy", str(dst))
        return real_rename(src, dst, *a, **k)

    def exchange(a, b):
        raise OSError(errno.EBUSY, "Device or resource busy", str(b))

    monkeypatch.setattr(llmprune.io.os, "rename", rename)
    monkeypatch.setattr(llmprune.io, "_exchange", exchange)
    return target


def test_a_save_onto_a_mount_point_copies_the_checkpoint_into_place(tmp_path, mount_point):
    from transformers import AutoModelForCausalLM

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_point["path"] = mnt.resolve()
    model, tok = make_model("llama"), make_tokenizer()
    save_pruned(model, tok, mnt, {"run": 1})
    meta = json.loads((mnt / "llmprune.json").read_text())
    assert meta["run"] == 1 and "incomplete" not in meta
    assert set(meta["files"]) == {p.name for p in mnt.iterdir()}
    again = AutoModelForCausalLM.from_pretrained(mnt)
    assert all((a == b).all() for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    # and over an earlier checkpoint of ours there: replaced file by file, nothing of the old one left over
    (mnt / "model.safetensors").rename(mnt / "old-extra.safetensors")
    meta["files"] = sorted(set(meta["files"]) - {"model.safetensors"} | {"old-extra.safetensors"})
    (mnt / "llmprune.json").write_text(json.dumps(meta))
    save_pruned(model, tok, mnt, {"run": 2}, overwrite=True)
    assert json.loads((mnt / "llmprune.json").read_text())["run"] == 2
    assert not (mnt / "old-extra.safetensors").exists() and (mnt / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["mnt"]  # no temporary left beside it


def test_a_save_that_can_neither_rename_nor_copy_keeps_the_checkpoint_and_says_where(
        setup, tmp_path, capsys, mount_point, monkeypatch):
    from transformers import AutoModelForCausalLM

    import llmprune.io

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_point["path"] = mnt.resolve()

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(llmprune.io.shutil, "copyfile", full)
    out = tmp_path / "r.json"
    assert main(_prune(setup, "--json", str(out), "--save", str(mnt))) == 1
    err = _one_line_error(capsys)
    kept = tmp_path / "mnt.llmprune-saved"
    assert "No space left" in err and str(kept) in err
    assert json.loads(out.read_text())["prune"]["overall_sparsity"] == pytest.approx(0.5)  # the JSON is there
    AutoModelForCausalLM.from_pretrained(kept)  # and the whole checkpoint, where the message says


# ---- 3. a recipe cannot expand without bound --------------------------------------------------------

def _bomb(levels: int) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\nruns: [{{name: x, model: m/x, prune: {{sparsity: *a{levels}}}}}]\n"


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(_bomb(9))  # 9^10 values once expanded; about 500 bytes
    started = time.perf_counter()
    assert main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = _one_line_error(capsys)
    assert time.perf_counter() - started < 10
    assert "expands to more than" in err and len(err) < 400


def test_a_recipe_that_contains_itself_is_refused(tmp_path):
    recipe = tmp_path / "loop.yaml"
    recipe.write_text("x: &x [*x]\nruns: [{name: a, model: m/x}]\n")
    with pytest.raises(LlmpruneError, match="contain itself"):
        load_recipe(recipe)


def test_a_recipe_with_a_python_tag_runs_nothing(tmp_path):
    marker = tmp_path / "planted-code-ran"
    recipe = tmp_path / "tag.yaml"
    recipe.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\nruns: [{{name: a, "
                      "model: m/x}]\n")
    with pytest.raises(LlmpruneError, match="invalid YAML"):
        load_recipe(recipe)
    assert not marker.exists()


def test_a_large_value_is_shown_short_in_the_message(tmp_path):
    recipe = tmp_path / "big.yaml"
    recipe.write_text("runs: [{name: a, model: m/x, prune: {sparsity: ["
                      + ", ".join(["0.5"] * 20000) + "]}}]\n")
    with pytest.raises(LlmpruneError) as info:
        load_recipe(recipe)
    assert "sparsity" in str(info.value) and len(str(info.value)) < 400


def test_a_grid_of_too_many_runs_is_refused():
    axes = {f"prune.{k}": list(range(1, 11))
            for k in ("calib.nsamples", "calib.seed", "blocksize", "owl_nsamples", "dsnot_cycles")}
    with pytest.raises(LlmpruneError, match="100,000 runs"):
        parse_recipe({"defaults": {"model": "m/x"}, "grid": {"name": "r{nsamples}", "axes": axes}})


# ---- 4. a full disk or a file-size limit is one line, exit 1 ----------------------------------------

def test_safetensors_and_tokenizers_write_errors_are_os_errors():
    class SafetensorError(Exception):
        pass

    err = as_os_error(SafetensorError('Error while serializing: IoError(Os { code: 27, kind: FileTooLarge, '
                                      'message: "File too large" })'))
    assert isinstance(err, OSError) and err.errno == errno.EFBIG and "File too large" in str(err)
    err = as_os_error(Exception("No space left on device (os error 28)"))
    assert err.errno == errno.ENOSPC
    assert as_os_error(ValueError("a bug")) is None  # anything else keeps its traceback


def test_a_save_hitting_the_file_size_limit_is_one_line_and_keeps_the_json(setup, tmp_path):
    out, ckpt = tmp_path / "r.json", tmp_path / "ckpt"
    proc = _llmprune(_prune(setup, "--json", out, "--save", ckpt), limit=100_000)  # the weights are ~600 kB
    assert proc.returncode == 1, proc.stderr
    err = _one_line(proc)
    assert "could not write the checkpoint" in err and "File too large" in err
    assert json.loads(out.read_text())["prune"]["overall_sparsity"] == pytest.approx(0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no half-written checkpoint or temporary


def test_run_on_a_full_disk_is_one_line(setup, tmp_path):
    model, data = setup / "model", setup / "eval.txt"
    recipe = _recipe(tmp_path, f"""
        defaults: {{model: {model}, prune: {{method: magnitude}}, eval: {{datasets: [{data}]}}}}
        runs: [{{name: m50}}]
    """)
    proc = _llmprune(["run", recipe, "--out", tmp_path / "out", "--no-progress"], limit=200)
    assert proc.returncode == 1, proc.stderr
    assert "recipe.json" in _one_line(proc)


def test_export_on_a_full_disk_is_one_line_and_keeps_the_old_file(setup, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"earlier export")
    proc = _llmprune(["export", setup / "model", out, "--overwrite"], limit=50_000)
    assert proc.returncode == 1, proc.stderr
    err = _one_line(proc)
    assert f"could not write {out}" in err and ("File too large" in err or "file-size limit" in err)
    assert out.read_bytes() == b"earlier export" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def _result(label: str, **fields) -> dict:
    record = {"schema": "llmprune.result/1", "name": label, "model": "m", "method": "wanda", "sparsity": 0.5,
              "pattern": "unstructured", "perplexity": {"ptb": {"ppl": 20.0}}, "eval": {"seqlen": 32}}
    record.update(fields)
    return record


def test_report_into_a_read_only_folder_is_one_line(tmp_path, capsys, monkeypatch):
    import llmprune.io

    (tmp_path / "a.json").write_text(json.dumps(_result("a")))

    def read_only(*_a, **_k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(llmprune.io.tempfile, "mkstemp", read_only)
    assert main(["report", str(tmp_path)]) == 1
    assert "Read-only file system" in _one_line_error(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


# ---- 5. one damaged result file does not block the report ------------------------------------------

@pytest.mark.parametrize("fields, field", [
    ({"pattern": "x:y"}, "pattern"),
    ({"pattern": "2:" + "9" * 5000}, "pattern"),
    ({"sparsity": "abc"}, "sparsity"),
    ({"config": "str"}, "config"),
    ({"nsamples": "many"}, "nsamples"),
    ({"eval": {"seqlen": [1]}}, "eval.seqlen"),
    ({"name": {"a": 1}}, "name"),
])
def test_report_leaves_out_a_damaged_file_naming_it_and_the_field(fields, field, tmp_path, capsys):
    (tmp_path / "good.json").write_text(json.dumps(_result("good", nsamples=8)))
    (tmp_path / "bad.json").write_text(json.dumps(_result("bad", **fields)))
    assert main(["report", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    warning = captured.err.strip()
    assert len(warning.splitlines()) == 1 and "bad.json" in warning and repr(field) in warning, warning
    assert len(warning) < 400
    summary = (tmp_path / "summary.md").read_text()
    assert "| good |" in summary and "| bad |" not in summary and "Left out" in summary


def test_report_leaves_out_a_file_that_is_not_json(tmp_path, capsys):
    (tmp_path / "good.json").write_text(json.dumps(_result("good")))
    (tmp_path / "bad.json").write_bytes(b"\xff{")
    assert main(["report", str(tmp_path)]) == 0
    assert "bad.json" in capsys.readouterr().err


# ---- 6. grid name templates name axes, nothing else --------------------------------------------------

@pytest.mark.parametrize("template, needle", [
    ("{method.nonexistent}", "{method.nonexistent}"),
    ("{method.__init__.__globals__[RECIPE_SCHEMA]}", "{method.__init__.__globals__[RECIPE_SCHEMA]}"),
    ("{method[0]}", "{method[0]}"),
    ("{0}", "{0}"),
    ("{method!r}", "!r"),
    ("{sparsity:>999999999}", "format spec"),
])
def test_grid_name_templates_allow_plain_axis_names_only(template, needle):
    grid = {"name": template, "axes": {"prune.method": ["wanda"], "prune.sparsity": [0.5]}}
    with pytest.raises(LlmpruneError) as info:
        parse_recipe({"defaults": {"model": "m/x"}, "grid": grid})
    assert needle in str(info.value) and "only name axes" in str(info.value)
    assert "llmprune.recipe" not in str(info.value)


def test_grid_name_templates_keep_their_format_specs():
    grid = {"name": "{method}-{sparsity:.2f}-{sparsity:.0%}", "axes": {"prune.method": ["wanda"],
                                                                       "prune.sparsity": [0.5]}}
    recipe = parse_recipe({"defaults": {"model": "m/x"}, "grid": grid})
    assert recipe.names == ["wanda-0.50-50%"]


# ---- 7. a planted recovery state is refused in one line ----------------------------------------------

class _Planted:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_recover_state_is_refused_in_one_line(setup, tmp_path, capsys):
    import torch

    from llmprune.config import RecoverConfig
    from llmprune.recover import STATE_FILE, fingerprint

    data = str(setup / "eval.txt")
    args = ["--steps", "4", "--seqlen", "16", "--batch-size", "2", "--data", data, "--eval", "",
            "--skip-dense", "--no-progress", "--device", "cpu"]
    config = RecoverConfig(steps=4, seqlen=16, batch_size=2, data=data)
    ckpt, marker = tmp_path / "ckpt", tmp_path / "planted-code-ran"

    def planted(model, folder):  # a checkpoint of ours in every way but its state file
        model.save_pretrained(folder)
        torch.save({"report": _Planted(str(marker))}, folder / STATE_FILE)

    save_pruned(make_model("llama"), make_tokenizer(), ckpt, {"recover": {
        "complete": False, "steps_done": 2, "steps": 4,
        "fingerprint": fingerprint(config)}}, write_weights=planted)
    capsys.readouterr()
    code = main(["recover", "--model", str(setup / "model"), "--teacher", str(setup / "model"),
                 "--save", str(ckpt), "--resume", *args])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()  # (a warning first: this tiny model has no zeros)
    assert "Traceback" not in "\n".join(err) and "is not a recovery state llmprune wrote" in err[-1]
    assert "weights_only" not in err[-1]  # torch's advice to load it unsafely is not passed on
    assert not marker.exists()


# ---- 8. signals, names and odd inputs ------------------------------------------------------------------

# in a command; at the CLI's own first import
@pytest.mark.parametrize("module", ["torch", "llmprune.config"])
def test_ctrl_c_while_torch_imports_is_one_line_exit_130(module, tmp_path):
    # a Ctrl-C that lands while `import torch` runs (seconds on a busy machine), made deterministic
    script = textwrap.dedent("""
        import sys, runpy
        class Interrupt:
            def find_spec(self, name, path=None, target=None):
                if name in (MODULE, "transformers"):
                    raise KeyboardInterrupt
        sys.meta_path.insert(0, Interrupt())
        sys.argv = ["llmprune", "eval", "--model", "smollm2-135m"]
        runpy.run_module("llmprune", run_name="__main__")
    """).replace("MODULE", repr(module))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, check=False)
    assert proc.returncode == 130
    assert _one_line(proc) == "llmprune: interrupted"


@pytest.mark.parametrize("during", ["save", "pruning"])
def test_sigterm_exits_143_with_one_line_and_leaves_no_temporary(during, setup, tmp_path):
    target = (("transformers.PreTrainedModel", "save_pretrained") if during == "save"
              else ("llmprune.engine", "run"))
    argv = list(map(str, _prune(setup, "--json", tmp_path / "r.json", "--save", tmp_path / "ckpt")))
    script = textwrap.dedent(f"""
        import importlib, sys, time
        module, attr = {target!r}
        owner = importlib.import_module(module) if "." not in module or module.startswith("llmprune") \\
            else getattr(importlib.import_module(module.rsplit(".", 1)[0]), module.rsplit(".", 1)[1])
        real = getattr(owner, attr)
        def slow(*a, **k):
            out = real(*a, **k)
            print("busy", flush=True)
            time.sleep(60)
            return out
        setattr(owner, attr, slow)
        from llmprune.cli import main
        sys.exit(main({argv!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    while proc.stdout.readline().strip() != "busy":
        assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err.strip().splitlines()[-1] == "llmprune: stopped by signal 15" and "Traceback" not in err
    # no temporary, no half checkpoint
    assert [p.name for p in tmp_path.iterdir() if p.name != "r.json"] == []


def test_compress_names_its_destination_dst(setup, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["compress", str(setup / "model"), str(tmp_path / "afile")]) == 2
    err = _one_line_error(capsys)
    assert err.startswith("llmprune: error: DST ") and "--save" not in err


def test_compress_into_its_own_source_is_refused(tmp_path, capsys, no_load):
    src = tmp_path / "ckpt"
    save_pruned(make_model("llama"), make_tokenizer(), src, {"name": "x"})
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    assert main(["compress", str(src), str(src), "--overwrite"]) == 2
    assert "SRC" in _one_line_error(capsys)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_export_over_its_own_source_is_refused(tmp_path, capsys):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF" + b"\0" * 64)
    assert main(["export", str(source), str(source), "--overwrite"]) == 2
    assert "are the same path" in _one_line_error(capsys)
    assert source.read_bytes() == b"GGUF" + b"\0" * 64


@pytest.mark.parametrize("flag", ["--calib", "--eval"])
def test_a_fifo_as_data_is_named_a_pipe_not_missing(flag, setup, tmp_path, capsys, no_load):
    fifo = tmp_path / "x.txt"
    os.mkfifo(fifo)
    args = _prune(setup)
    args[args.index(flag) + 1] = str(fifo)
    assert main(args) == 2
    err = _one_line_error(capsys)
    assert f"{flag} {fifo} is not a regular file" in err


# ---- 9. what the config decides is refused before the weights load ------------------------------------

@pytest.mark.parametrize("extra, needle", [
    (["--seqlen", "100000"], "maximum positions (256)"),
    (["--nsamples", "2000000000"], "--nsamples"),
    (["--include", "layers.*.nothing"], "no prunable layer matches"),
    (["--pattern", "1:3"], "not a multiple of M=3"),
    (["--method", "flap", "--sparsity", "0.99"], "sparsity"),
    (["--method", "flap", "--sparsity", "0.6", "--structure", "heads"], "would leave no KV group"),
])
def test_refusals_the_config_file_decides_come_before_the_weights_load(extra, needle, setup, capsys, no_load):
    args = _prune(setup)
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 2
    assert needle in _one_line_error(capsys)


@pytest.mark.parametrize("args, needle", [
    (["prune", "--sparsity", "1.5"], "sparsity 1.5 is outside"),
    (["prune", "--pattern", "4:2"], "1 <= N < M"),
    (["prune", "--nsamples", "0"], "nsamples"),
    (["eval", "--seqlen", "-5"], "seqlen"),
])
def test_what_the_flags_alone_decide_is_refused_before_torch_imports(args, needle):
    script = textwrap.dedent(f"""
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError("torch imported before the flags were checked")
        sys.meta_path.insert(0, NoTorch())
        from llmprune.cli import main
        sys.exit(main({args!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, check=False)
    assert proc.returncode == 2, proc.stderr
    assert needle in _one_line(proc)


def test_eval_refuses_a_seqlen_past_the_positions_before_the_weights_load(setup, capsys, no_load):
    assert main(["eval", "--model", str(setup / "model"), "--seqlen", "100000", "--dataset",
                 str(setup / "eval.txt"), "--no-progress"]) == 2
    assert "maximum positions (256)" in _one_line_error(capsys)


def test_offloaded_prune_refuses_before_the_weights_load(setup, tmp_path, capsys, no_load):
    assert main(_prune(setup, "--offload", "disk", "--offload-dir", str(tmp_path / "off"), "--include",
                       "layers.*.nothing")) == 2
    assert "no prunable layer matches" in _one_line_error(capsys)
    assert not (tmp_path / "off").exists()


# ---- docs/reliability.md lists these guarantees, each with its test --------------------------------------

def test_the_reliability_page_names_only_tests_that_exist():
    import re

    section = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(test_\w+)`", section))
    assert len(named) >= 8
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), re.MULTILINE))
    assert named <= defined, sorted(named - defined)


def test_a_small_local_model_skips_the_early_child_and_is_refused_after_its_load(setup, capsys, monkeypatch):
    """The early shape check costs a fresh interpreter; below $LLMPRUNE_EARLY_CHECK_BYTES the model
    loads faster than that, so the same refusal comes right after the load instead."""
    import subprocess

    import llmprune.preflight as preflight

    calls = []
    real = subprocess.run
    monkeypatch.setattr(preflight.subprocess, "run", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setenv("LLMPRUNE_EARLY_CHECK_BYTES", str(2**40))
    assert not preflight.worth_checking_early(setup / "model")
    assert main(_prune(setup, "--include", "layers.*.nothing")) == 2
    assert "no prunable layer matches" in _one_line_error(capsys) and calls == []
    monkeypatch.setenv("LLMPRUNE_EARLY_CHECK_BYTES", "0")
    assert preflight.worth_checking_early(setup / "model")
    assert preflight.worth_checking_early("some-org/a-hub-model")  # a download: always checked first


def test_a_forked_worker_ended_by_sigterm_dies_instead_of_raising():
    """lm-eval's bootstrap pool forks workers inside llmprune's run and ends them with SIGTERM: a worker
    that raised Interrupted instead of dying left the pool's join, and the run, hanging (measured)."""
    from llmprune.io import Interrupted, signals_raise

    with signals_raise():
        pid = os.fork()
        if pid == 0:  # the child: wait for the parent's SIGTERM; reaching the end would mean it was caught
            try:
                time.sleep(30)
            except BaseException:  # noqa: BLE001
                os._exit(3)
            os._exit(4)
        time.sleep(0.3)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        with pytest.raises(Interrupted):  # the process that installed the handler still gets the exception
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
