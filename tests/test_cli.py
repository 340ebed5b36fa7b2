"""The command line: end to end on a tiny local model, and one clear line for each bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import write_local_setup
from llmprune.cli import main


@pytest.fixture(scope="module")
def local_setup(tmp_path_factory):
    """A tiny model saved as an HF directory, a calibration jsonl and an evaluation text."""
    return write_local_setup(tmp_path_factory.mktemp("cli"))


def _prune_args(root, *extra):
    return ["prune", "--model", str(root / "model"), "--calib", str(root / "calib.jsonl"), "--nsamples", "4",
            "--seqlen", "32", "--eval", str(root / "eval.txt"), "--no-progress", *extra]


def test_prune_end_to_end_writes_json_and_checkpoint(local_setup, tmp_path, capsys):
    out_json, save = tmp_path / "r.json", tmp_path / "ckpt"
    code = main(_prune_args(local_setup, "--pattern", "2:4", "--json", str(out_json), "--save", str(save)))
    assert code == 0
    printed = capsys.readouterr().out
    record = json.loads(out_json.read_text())
    assert record["method"] == "wanda" and record["pattern"] == "2:4" and record["sparsity"] == 0.5
    name = str(local_setup / "eval.txt")
    dense, pruned = record["dense"]["perplexity"][name]["ppl"], record["perplexity"][name]["ppl"]
    assert dense > 1 and pruned > 1 and dense != pruned
    assert f"{pruned:.3f}" in printed and f"{dense:.3f}" in printed
    assert record["prune"]["overall_sparsity"] == pytest.approx(0.5)
    assert record["prune_seconds"] > 0
    assert json.loads((save / "llmprune.json").read_text())["pattern"] == "2:4"


def test_eval_prints_the_hand_computed_perplexity(local_setup, tmp_path, capsys):
    """The printed and stored perplexity equal exp(mean CE) of a plain forward over the windows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(local_setup / "model"), "--dataset", str(local_setup / "eval.txt"),
                 "--seqlen", "32", "--no-progress", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(local_setup / "model").eval()
    tok = AutoTokenizer.from_pretrained(local_setup / "model")
    ids = tok((local_setup / "eval.txt").read_text(), return_tensors="pt").input_ids[0]
    windows = ids[: ids.numel() // 32 * 32].view(-1, 32)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    expected = float(torch.exp(nll))
    stored = json.loads(out.read_text())["perplexity"][str(local_setup / "eval.txt")]
    assert stored["windows"] == windows.shape[0]
    assert stored["ppl"] == pytest.approx(expected, rel=1e-5)
    assert f"{stored['ppl']:.3f}" in printed


@pytest.mark.parametrize("args, needle", [
    (["prune", "--model", "no-such-model"], "unknown model"),
    (["prune", "--method", "pruneit"], "unknown pruning method"),
    (["prune", "--sparsity", "1.5"], "outside [0, 1)"),
    (["prune", "--sparsity", "-0.1"], "outside [0, 1)"),
    (["prune", "--pattern", "4:4"], "1 <= N < M"),
    (["prune", "--pattern", "5:4"], "1 <= N < M"),
    (["prune", "--pattern", "2:4", "--sparsity", "0.7"], "disagrees with pattern"),
    (["prune", "--nsamples", "0"], "nsamples"),
    (["eval", "--dataset", "imagenet"], "unknown dataset"),
    (["eval", "--data-dir", "/nonexistent/data"], "does not exist"),
    (["prune", "--frobnicate"], "unrecognized arguments"),
    (["eval", "--zeroshot", "nosuchtask"], "unknown task"),
    (["prune", "--method", "wanda", "--use-variant", "--pattern", "2:4"], "variant"),
])
def test_bad_input_one_line_exit_2(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_save_into_nonempty_dir_refused_before_work(local_setup, tmp_path, capsys):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert main(_prune_args(local_setup, "--save", str(target))) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_missing_data_file_lists_searched_paths(local_setup, tmp_path, capsys):
    json_out = tmp_path / "never.json"
    code = main(["prune", "--model", str(local_setup / "model"), "--calib", "c4", "--data-dir", str(tmp_path),
                 "--nsamples", "2", "--seqlen", "32", "--eval", str(local_setup / "eval.txt"), "--skip-dense",
                 "--json", str(json_out), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert str(tmp_path) in err and len(err.splitlines()) == 1
    assert not json_out.exists()


def test_missing_task_file_fails_before_model_load(tmp_path, capsys):
    (tmp_path / "tasks").mkdir()
    assert main(["eval", "--model", "nobody/no-such-model", "--zeroshot",
                 "boolq", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "boolq" in err and str(tmp_path) in err and len(err.splitlines()) == 1


def test_console_script_exit_code():
    proc = subprocess.run([sys.executable, "-m", "llmprune.cli", "prune", "--pattern", "2:2"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("llmprune: error:") and "Traceback" not in proc.stderr


def test_prune_with_an_accelerate_device_map(local_setup, tmp_path):
    """The device-map path (multi-GPU / offload on a GPU machine) runs each block where it lives."""
    out = tmp_path / "r.json"
    assert main(_prune_args(local_setup, "--device-map", "cpu", "--skip-dense", "--json", str(out))) == 0
    assert json.loads(out.read_text())["prune"]["overall_sparsity"] == pytest.approx(0.5)
