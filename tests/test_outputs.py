"""Outputs tried as a hostile user would: bad paths fail first, nothing of theirs is replaced or
deleted, interrupted saves leave nothing behind, late failures keep the other results, and every
bad model, device or size is one line with exit code 2."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, make_model, make_tokenizer, write_local_setup
from llmprune.cli import build_parser, main
from llmprune.config import CalibConfig, EvalConfig, PruneConfig
from llmprune.errors import LlmpruneError
from llmprune.io import check_output_file, check_save_dir, save_pruned, write_json_atomic


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_local_setup(tmp_path_factory.mktemp("outputs"), docs=6)


def _prune(root, *extra):
    return ["prune", "--model", str(root / "model"), "--calib", str(root / "calib.jsonl"), "--nsamples", "2",
            "--seqlen", "32", "--eval", str(root / "eval.txt"), "--skip-dense", "--no-progress", *extra]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---- output paths are validated before the model loads ----------------------------------------

@pytest.mark.parametrize("make, needle", [
    (lambda t: t.mkdir(), "is a folder"),
    (lambda t: t.symlink_to(t.parent / "elsewhere.json"), "symbolic link"),
    (lambda t: (t.parent / "afile").write_text("x"), "not a folder"),
])
def test_bad_json_path_fails_before_the_model_loads(make, needle, tmp_path, capsys):
    target = tmp_path / "out.json"
    make(target)
    json_path = tmp_path / "afile" / "out.json" if needle == "not a folder" else target
    # a model that does not exist on the hub: it would fail much later if the path were not checked first
    assert main(["eval", "--model", "nobody/never-loaded", "--json", str(json_path)]) == 2
    assert needle in _one_line_error(capsys)


def test_device_json_path_is_refused():
    with pytest.raises(LlmpruneError, match="not a regular file"):
        check_output_file("/dev/null")


def test_unwritable_parent_is_refused(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere; the check is then the parent being a folder
        (tmp_path / "file").write_text("x")
        with pytest.raises(LlmpruneError, match="not a folder"):
            check_output_file(tmp_path / "file" / "sub" / "r.json")
        return
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(LlmpruneError, match="not writable"):
        check_output_file(locked / "r.json")


def test_atomic_write_never_renames_over_a_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "r.json"
    link.symlink_to(victim)
    with pytest.raises(LlmpruneError, match="symbolic link"):
        write_json_atomic(link, {"a": 1})
    assert link.is_symlink() and victim.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "victim.txt"]  # no temporary left


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = write_json_atomic(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


# ---- checkpoints: never delete what is not ours -------------------------------------------------

def test_overwrite_refuses_a_folder_with_foreign_files(setup, tmp_path, capsys):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "llmprune.json").write_text("{}")
    assert main(_prune(setup, "--save", str(target), "--overwrite")) == 2
    assert "notes.txt" in _one_line_error(capsys)
    assert (target / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_a_folder_that_is_no_checkpoint(tmp_path):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(LlmpruneError, match="not an llmprune checkpoint"):
        check_save_dir(target, overwrite=True)


def test_overwrite_replaces_our_checkpoint_and_only_it(tmp_path):
    model, tok = make_model("llama"), make_tokenizer()
    target = tmp_path / "ckpt"
    save_pruned(model, tok, target, {"run": 1})
    listed = json.loads((target / "llmprune.json").read_text())["files"]
    assert set(listed) == {p.name for p in target.iterdir()}
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()
    save_pruned(model, tok, target, {"run": 2}, overwrite=True)
    assert json.loads((target / "llmprune.json").read_text())["run"] == 2
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(target)
    assert torch.count_nonzero(again.model.layers[0].mlp.down_proj.weight) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary or old copy left


@pytest.mark.parametrize("where", [".", ".."])
def test_save_to_the_current_folder_is_refused(where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LlmpruneError, match="current folder"):
        check_save_dir(where, overwrite=True)


def test_save_into_a_file_or_symlink_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(LlmpruneError, match="is a file"):
        check_save_dir(tmp_path / "f")
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "d")
    with pytest.raises(LlmpruneError, match="symbolic link"):
        check_save_dir(tmp_path / "link")


def test_sigterm_during_save_leaves_no_temporary(tmp_path):
    """A save killed by SIGTERM removes its full-size temporary folder on the way out."""
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from conftest import make_model, make_tokenizer
        from llmprune.io import save_pruned
        model = make_model("llama")
        original = model.save_pretrained
        def slow_save(path, **kw):
            original(path, **kw)
            print("saving", flush=True)
            time.sleep(30)
        model.save_pretrained = slow_save
        save_pruned(model, make_tokenizer(), {str(tmp_path / 'ckpt')!r}, {{}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_ours_are_removed_on_the_next_save(tmp_path):
    dead = tmp_path / ".ckpt.llmprune-tmp-999999999.abc"  # no such pid
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 100)
    foreign = tmp_path / ".ckpt.something-else"
    foreign.mkdir()
    save_pruned(make_model("llama"), make_tokenizer(), tmp_path / "ckpt", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.something-else", "ckpt"]


def test_a_late_write_failure_keeps_the_other_results(setup, tmp_path, capsys, monkeypatch):
    """The checkpoint cannot be written at the end (disk full): the JSON is still written."""
    import transformers

    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", disk_full)
    out = tmp_path / "r.json"
    code = main(_prune(setup, "--json", str(out), "--save", str(tmp_path / "ckpt")))
    assert code == 1
    assert "No space left" in _one_line_error(capsys)
    assert json.loads(out.read_text())["prune"]["overall_sparsity"] == pytest.approx(0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no half-written checkpoint


# ---- model loading, devices and sizes -----------------------------------------------------------

def test_model_loading_failures_are_one_line(setup, tmp_path, capsys):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("hello")
    truncated = tmp_path / "trunc.gguf"
    from llmprune.models import bundled_model_path

    truncated.write_bytes(bundled_model_path().read_bytes()[:4096])
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "frobnitz", "architectures": ["X"]}))
    for model, needle in ((not_gguf, "not a GGUF file"), (truncated, "could not load"),
                          (unknown, "could not load"), (setup / "eval.txt", "is a file")):
        assert main(["eval", "--model", str(model), "--dataset",
                     str(setup / "eval.txt"), "--no-progress"]) == 2
        assert needle in _one_line_error(capsys), model


@pytest.mark.parametrize("device, needle", [("warp9", "unknown device"),
                                            ("cuda:7", "CUDA"), ("tpu", "device")])
def test_unknown_device_is_one_line(setup, device, needle, capsys):
    assert main(["eval", "--model", str(setup / "model"), "--device", device, "--dataset",
                 str(setup / "eval.txt")]) == 2
    assert needle in _one_line_error(capsys)


def test_seqlen_beyond_max_positions_is_refused(setup, capsys):
    # the tiny model has 256 positions
    assert main(["eval", "--model", str(setup / "model"), "--seqlen", "512", "--dataset",
                 str(setup / "eval.txt"), "--no-progress"]) == 2
    assert "maximum positions (256)" in _one_line_error(capsys)


def test_calibration_that_cannot_fit_is_refused_naming_the_limit(setup, capsys):
    code = main(_prune(setup, "--nsamples", "2000000000"))
    assert code == 2
    err = _one_line_error(capsys)
    assert "nsamples 2000000000" in err and "--nsamples" in err and "GiB" in err


def test_eval_batch_that_cannot_fit_is_refused(setup, capsys):
    assert main(["eval", "--model", str(setup / "model"), "--seqlen", "256", "--batch-size", "1000000000",
                 "--dataset", str(setup / "eval.txt"), "--no-progress"]) == 2
    assert "--batch-size" in _one_line_error(capsys)


def test_shape_checks_run_right_after_loading_before_evaluation(setup, capsys, monkeypatch):
    """An include matching nothing, or an M not dividing a layer, fails before the dense evaluation."""
    import llmprune.evaluation

    def never(*_a, **_k):
        raise AssertionError("evaluation ran before the shape checks")

    # the function llmprune.pipeline.prune_model (which the command calls) evaluates with
    monkeypatch.setattr(llmprune.evaluation, "evaluate", never)
    args = [a for a in _prune(setup) if a != "--skip-dense"]
    assert main(args + ["--include", "layers.*.nothing"]) == 2
    assert "no prunable layer matches" in _one_line_error(capsys)
    assert main(args + ["--pattern", "1:3"]) == 2
    assert "not a multiple of M=3" in _one_line_error(capsys)


def test_perplexity_data_is_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """Offline, without a local copy, eval fails in a second: the model is never loaded."""
    import llmprune.models

    monkeypatch.setattr(llmprune.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.delenv("LLMPRUNE_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)  # no ../shared/data next to it
    assert main(["eval", "--model", "smollm2-135m", "--dataset", "wikitext2"]) == 2
    assert "--data-dir" in _one_line_error(capsys)


# ---- the command line itself ------------------------------------------------------------------

def test_flag_defaults_are_the_config_defaults():
    args = build_parser().parse_args(["prune"])
    prune, calib, evaluation = PruneConfig(), CalibConfig(), EvalConfig()
    assert (args.method, args.group, args.metric, args.use_variant, args.true_sequential) == \
        (prune.method, prune.group, prune.metric, prune.use_variant, prune.true_sequential)
    assert args.pattern == str(prune.pattern) and args.sparsity is None
    assert (tuple(args.include), tuple(args.exclude), args.percdamp, args.blocksize) == \
        (prune.include, prune.exclude, prune.percdamp, prune.blocksize)
    assert (args.calib, args.nsamples, args.seed, args.calib_batch_size, args.seqlen) == \
        (calib.dataset, calib.nsamples, calib.seed, calib.batch_size, calib.seqlen)
    assert (args.batch_size, args.max_windows, tuple(args.zeroshot), args.limit) == \
        (evaluation.batch_size, evaluation.max_windows, evaluation.zeroshot, evaluation.limit)
    text = build_parser()._subparsers._group_actions[0].choices["prune"].format_help()
    assert f"(default: {calib.nsamples})" in text and f"(default: {prune.percdamp})" in text


def test_version_and_python_dash_m(capsys):
    import llmprune

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"llmprune {llmprune.__version__}"
    proc = subprocess.run([sys.executable, "-m", "llmprune", "prune", "--pattern", "2:2"],
                          capture_output=True, text=True, cwd=ROOT)
    assert (proc.returncode == 2 and proc.stderr.startswith("llmprune: error:")
            and "Traceback" not in proc.stderr)
