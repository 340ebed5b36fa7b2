"""The Python API as a newcomer meets it: dir() and help(), a docstring with an example and type hints
on every public name, prune_model end to end (the CLI's checks, in the CLI's order), save_pruned
without metadata, and one preflight shared by the command line and the library."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import json
import pydoc
import re
import subprocess
import sys

import pytest
import torch

import llmprune
from conftest import ROOT, make_model, make_tokenizer, write_local_setup
from llmprune import pipeline
from llmprune.cli import build_parser, main
from llmprune.config import CalibConfig, EvalConfig, PruneConfig, RecoverConfig
from llmprune.errors import LlmpruneError
from llmprune.models import get_blocks, prunable_linears
from llmprune.registry import METHODS, MethodSpec

PUBLIC = sorted(llmprune.__all__)


def _public(name: str):
    """The object behind ``llmprune.<name>`` (``llmprune.recover`` may be its callable module)."""
    return getattr(importlib.import_module(llmprune._EXPORTS[name]), name)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_local_setup(tmp_path_factory.mktemp("api"), docs=6)


def _config(root, **kw) -> PruneConfig:
    calib = CalibConfig(dataset=str(root / "calib.jsonl"), nsamples=2, seqlen=32)
    return PruneConfig(**{"method": "wanda", "calib": calib, **kw})


def _weights(model) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": m.weight.detach().clone() for i in range(len(get_blocks(model)))
            for n, m in prunable_linears(model, i).items()}


# ---- dir(), help(), docstrings, type hints ------------------------------------------------------

def test_dir_lists_the_api_and_its_docstring_the_methods_without_torch():
    code = ("import sys\n"
            "for name in ('torch', 'transformers', 'lm_eval'):\n"
            "    sys.modules[name] = None\n"  # any import of them fails
            "import llmprune, llmprune.methods as m\n"
            "missing = [n for n in llmprune.__all__ if n not in dir(llmprune)]\n"
            "assert not missing and 'prune_model' in llmprune.__all__, missing\n"
            "doc = llmprune.__doc__\n"
            "assert all(n in doc for n in m.METHODS.names() + m.ALLOCATIONS.names() + m.REFINERS.names())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr


def test_help_shows_every_public_name_and_a_five_line_example():
    text = pydoc.render_doc(llmprune, renderer=pydoc.plaintext)
    head = text.split("PACKAGE CONTENTS")[0]  # the module docstring, before pydoc's listings
    for name in PUBLIC:
        assert re.search(rf"^\s+{name}\b", head, re.MULTILINE), f"{name} has no line in help(llmprune)"
    example = head.split("Example::")[1]
    assert len(re.findall(r"^\s+(>>>|\.\.\.) ", example, re.MULTILINE)) == 5
    assert "{components}" not in head and "wanda" in head and "sparsegpt" in head
    assert "prune_model(" in text.split("PACKAGE CONTENTS")[1]  # pydoc documents the lazy names too


def test_a_newly_registered_method_shows_in_help_and_the_cli_description():
    """The method lists are asked of the registry, never typed."""
    spec = MethodSpec(name="zz-test-method", label="ZZ", paper="none", code="none", summary="a test")
    METHODS.add(spec)
    try:
        assert "zz-test-method" in llmprune.__doc__
        assert "zz-test-method" in build_parser().description
    finally:
        METHODS.remove(spec.name)
    assert "zz-test-method" not in llmprune.__doc__


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_has_a_docstring_with_an_example(name):
    doc = inspect.getdoc(_public(name)) or ""
    assert "Example::" in doc, f"llmprune.{name} has no Example:: section"
    example = doc.split("Example::", 1)[1]
    assert re.search(r"^\s+>>> ", example, re.MULTILINE), f"llmprune.{name}'s example has no >>> line"
    assert "llmprune" in example


@pytest.mark.parametrize("name", [n for n in PUBLIC if inspect.isfunction(_public(n))])
def test_every_public_function_has_type_hints(name):
    signature = inspect.signature(_public(name))
    bare = [p.name for p in signature.parameters.values() if p.annotation is inspect.Parameter.empty]
    assert not bare, f"llmprune.{name}: parameters without a type hint: {bare}"
    assert signature.return_annotation is not inspect.Signature.empty, f"llmprune.{name} has no return hint"


def test_llmprune_recover_has_the_function_s_signature_and_docs_even_as_a_module():
    import llmprune.recover as module  # binds llmprune.recover to the (callable) module

    assert inspect.signature(llmprune.recover) == inspect.signature(module.recover)
    assert "Example::" in (llmprune.recover.__doc__ or "")


@pytest.mark.parametrize("cls", [PruneConfig, CalibConfig, EvalConfig, RecoverConfig, llmprune.ExportConfig,
                                 llmprune.PruneResult])
def test_every_config_field_is_documented(cls):
    doc = inspect.getdoc(cls)
    missing = [f.name for f in dataclasses.fields(cls) if f"``{f.name}``" not in doc]
    assert not missing, f"{cls.__name__} does not document {missing}"


def test_py_typed_ships_in_the_wheel():
    assert (ROOT / "llmprune" / "py.typed").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # (tomllib: Python 3.11+)
    package_data = pyproject.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^"llmprune" = \[.*"py\.typed".*\]$', package_data, re.MULTILINE), package_data


def test_no_module_of_the_api_draws_tqdm_bars_itself():
    """Progress goes through llmprune.progress: bars on a terminal, plain lines in a log."""
    for module in ("recover.py", "pipeline.py", "preflight.py", "engine/run.py", "io.py",
                   "evaluation/perplexity.py"):
        assert "tqdm" not in (ROOT / "llmprune" / module).read_text(encoding="utf-8"), module


def test_recover_reports_progress_as_plain_lines_off_a_terminal(tmp_path, capsys):
    teacher = make_model("llama")
    student = copy.deepcopy(teacher)
    tok = make_tokenizer()
    llmprune.prune(student, tok, PruneConfig(method="magnitude"), progress=False)
    data = tmp_path / "train.txt"
    data.write_text("pruning removes weights from a network without retraining it " * 60)
    llmprune.recover(student, teacher, tok, RecoverConfig(steps=2, seqlen=16, batch_size=1, data=str(data),
                                                          warmup_steps=0), progress=True)
    err = capsys.readouterr().err
    assert "recover kd: done, 2/2 step" in err and "\r" not in err


# ---- prune_model -----------------------------------------------------------------------------

def test_prune_model_end_to_end_saves_a_checkpoint_that_reloads(setup, tmp_path):
    out, ckpt = tmp_path / "r.json", tmp_path / "ckpt"
    lines: list[str] = []
    result = llmprune.prune_model(str(setup / "model"), _config(setup, pattern="2:4"),
                                  evaluate=str(setup / "eval.txt"), save=ckpt, json=out, progress=False,
                                  echo=lines.append)
    name = str(setup / "eval.txt")
    assert result.report.overall_sparsity == pytest.approx(0.5)
    dense, pruned = result.dense_perplexity[name].ppl, result.perplexity[name].ppl
    assert dense > 1 and pruned > 1 and dense != pruned
    assert result.saved == ckpt.resolve() and result.json_path == out and not result.errors
    record = json.loads(out.read_text())
    assert record["perplexity"][name]["ppl"] == pytest.approx(pruned)
    assert record["dense"]["perplexity"][name]["ppl"] == pytest.approx(dense)
    assert record["model"] == str(setup / "model") and record["pattern"] == "2:4"
    assert json.loads((ckpt / "llmprune.json").read_text())["perplexity"] == record["perplexity"]
    assert f"{pruned:.3f}" in "\n".join(lines)
    assert any(line.startswith("saved the pruned model") for line in lines)
    back, _ = llmprune.load_model(ckpt, dtype="float32")
    for key, weight in _weights(result.model).items():
        assert torch.equal(_weights(back)[key], weight), key


def test_prune_model_and_the_cli_write_the_same_record(setup, tmp_path):
    """``llmprune prune`` is prune_model plus printing: same settings, same numbers."""
    cli_json = tmp_path / "cli.json"
    assert main(["prune", "--model", str(setup / "model"), "--calib", str(setup / "calib.jsonl"),
                 "--nsamples", "2", "--seqlen", "32", "--eval", str(setup / "eval.txt"), "--skip-dense",
                 "--no-progress", "--json", str(cli_json)]) == 0
    result = llmprune.prune_model(str(setup / "model"), _config(setup), evaluate=str(setup / "eval.txt"),
                                  dense=False, progress=False)
    cli = json.loads(cli_json.read_text())
    ours = json.loads(json.dumps(result.record))
    for key in ("name", "model", "method", "sparsity", "pattern", "config", "eval", "perplexity"):
        if key == "perplexity":
            for dataset, entry in cli[key].items():
                assert ours[key][dataset]["ppl"] == pytest.approx(entry["ppl"], rel=1e-6)
        else:
            assert ours[key] == cli[key], key


def test_prune_model_prunes_a_loaded_pair_in_place(setup):
    model, tok = make_model("llama"), make_tokenizer()
    result = llmprune.prune_model((model, tok), {"method": "magnitude", "sparsity": 0.25},
                                  evaluate=EvalConfig(datasets=(str(setup / "eval.txt"),), seqlen=32),
                                  dense=False, progress=False)
    assert result.model is model and result.tokenizer is tok
    assert result.report.overall_sparsity == pytest.approx(0.25)
    assert not result.dense_perplexity and str(setup / "eval.txt") in result.perplexity


@pytest.fixture
def nothing_slow_runs(monkeypatch):
    """Loading, evaluation, calibration and pruning all fail the test if they start."""
    import llmprune.data
    import llmprune.engine
    import llmprune.evaluation
    import llmprune.models

    def never(what):
        def fail(*_a, **_k):
            raise AssertionError(f"{what} started before the input was refused")
        return fail

    monkeypatch.setattr(llmprune.models, "load_model", never("the model load"))
    monkeypatch.setattr(llmprune.evaluation, "evaluate", never("an evaluation"))
    monkeypatch.setattr(llmprune.engine, "run", never("the pruning run"))
    monkeypatch.setattr(llmprune.data, "calibration_windows", never("calibration"))


def test_missing_evaluation_data_is_refused_before_loading_or_calibrating(setup, tmp_path, nothing_slow_runs):
    missing = tmp_path / "no-such-eval.txt"
    with pytest.raises(LlmpruneError, match="no-such-eval"):
        llmprune.prune_model(str(setup / "model"), _config(setup), evaluate=str(missing), progress=False)
    with pytest.raises(LlmpruneError, match="no-such-eval"):  # a model already loaded: the same
        llmprune.prune_model((make_model("llama"), make_tokenizer()), _config(setup), evaluate=str(missing))


def test_missing_calibration_data_and_bad_outputs_are_refused_first(setup, tmp_path, nothing_slow_runs):
    pair = (make_model("llama"), make_tokenizer())
    config = PruneConfig(method="wanda", calib=CalibConfig(dataset=str(tmp_path / "no-calib.jsonl")))
    with pytest.raises(LlmpruneError, match="no-calib"):
        llmprune.prune_model(pair, config)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    with pytest.raises(LlmpruneError, match="--overwrite"):
        llmprune.prune_model(pair, _config(setup), save=tmp_path / "taken")
    with pytest.raises(LlmpruneError, match="is a folder"):
        llmprune.prune_model(pair, _config(setup), json=tmp_path)


def test_a_layer_selection_matching_nothing_is_refused_before_the_weights_load(setup, nothing_slow_runs):
    """The shape checks run on the model's config alone, in a separate process."""
    with pytest.raises(LlmpruneError, match="no prunable layer matches"):
        llmprune.prune_model(str(setup / "model"), _config(setup, include=("layers.*.nothing",)))


def test_plain_prune_checks_the_calibration_data_before_anything_slow(tmp_path, monkeypatch):
    run_module = sys.modules["llmprune.engine.run"]

    def never(*_a, **_k):
        raise AssertionError("the block loop started before the calibration data was checked")

    monkeypatch.setattr(run_module, "run", never)
    calib = CalibConfig(dataset=str(tmp_path / "absent.jsonl"), nsamples=2, seqlen=32)
    with pytest.raises(LlmpruneError, match="absent.jsonl"):
        llmprune.prune(make_model("llama"), make_tokenizer(), PruneConfig(method="wanda", calib=calib))


def test_a_late_write_failure_is_raised_after_the_other_outputs_with_the_result(setup, tmp_path, monkeypatch):
    import transformers

    from llmprune.errors import OutputError

    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", disk_full)
    with pytest.raises(OutputError) as info:
        llmprune.prune_model((make_model("llama"), make_tokenizer()), _config(setup), save=tmp_path / "ckpt",
                             json=tmp_path / "r.json", progress=False)
    assert isinstance(info.value, OSError) and "No space left" in info.value.errors[0]
    assert json.loads((tmp_path / "r.json").read_text())["method"] == "wanda"
    assert info.value.result.report.overall_sparsity == pytest.approx(0.5)


# ---- one preflight for the command line and the library -------------------------------------------

@pytest.mark.parametrize("case", ["missing eval", "json is a folder", "nothing selected",
                                  "M does not divide"])
def test_the_cli_and_the_library_refuse_the_same_inputs_in_the_same_words(case, setup, tmp_path, capsys):
    flags, kwargs = {
        "missing eval": (["--eval", str(tmp_path / "nope.txt")], {"evaluate": str(tmp_path / "nope.txt")}),
        "json is a folder": (["--json", str(tmp_path)], {"json": tmp_path}),
        "nothing selected": (["--include", "layers.*.nothing"],
                             {"config": {"include": ("layers.*.nothing",)}}),
        "M does not divide": (["--pattern", "1:3"], {"config": {"pattern": "1:3"}}),
    }[case]
    args = ["prune", "--model", str(setup / "model"), "--calib", str(setup / "calib.jsonl"),
            "--nsamples", "2", "--seqlen", "32", "--no-progress", "--skip-dense"]
    if "--eval" not in flags:
        args += ["--eval", str(setup / "eval.txt")]
    assert main(args + flags) == 2
    cli_error = capsys.readouterr().err.strip().removeprefix("llmprune: error: ")
    config = _config(setup, **kwargs.pop("config", {}))
    kwargs.setdefault("evaluate", EvalConfig(datasets=(str(setup / "eval.txt"),), seqlen=32))
    with pytest.raises(LlmpruneError) as info:
        llmprune.prune_model(str(setup / "model"), config, progress=False, dense=False, **kwargs)
    assert " ".join(str(info.value).split()) == cli_error


def test_the_cli_calls_the_library_s_preflight(setup, monkeypatch):
    """``llmprune prune`` goes through prune_model, whose checks are llmprune.preflight's."""
    import llmprune.cli
    import llmprune.preflight

    assert llmprune.cli.prune_model is pipeline.prune_model
    assert llmprune.cli.check_inputs is llmprune.preflight.check_inputs is pipeline.check_inputs
    assert llmprune.cli.check_shapes_early is llmprune.preflight.check_shapes_early
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        raise LlmpruneError("stopped by the spy")

    monkeypatch.setattr(pipeline, "check_inputs", spy)
    assert main(["prune", "--model", str(setup / "model"), "--calib", str(setup / "calib.jsonl"),
                 "--json", "r.json", "--no-progress"]) == 2
    assert calls and calls[0]["json_path"] == "r.json" and calls[0]["calib"] == str(setup / "calib.jsonl")


# ---- save_pruned without metadata --------------------------------------------------------------

def test_save_pruned_without_metadata_records_the_gguf_source_for_export(tmp_path, capsys):
    from llmprune.export.gguf import export_gguf
    from llmprune.models import source_gguf

    gguf = tmp_path / "tiny.gguf"
    export_gguf(make_model("llama", vocab_size=400), make_tokenizer(), gguf)
    model, tok = llmprune.load_model(gguf, dtype="float32")
    assert model.llmprune_source == str(gguf.resolve())
    saved = llmprune.save_pruned(model, tok, tmp_path / "ckpt")  # the newcomer's last line: no metadata
    assert json.loads((saved / "llmprune.json").read_text())["model"] == str(gguf.resolve())
    assert source_gguf(str(saved)) == gguf.resolve()

    again, tok2 = llmprune.load_model(saved, dtype="float32")  # a checkpoint of a checkpoint, and in place
    llmprune.save_pruned(again, tok2, tmp_path / "ckpt2")
    llmprune.save_pruned(again, tok2, saved, overwrite=True)
    assert source_gguf(str(tmp_path / "ckpt2")) == gguf.resolve() == source_gguf(str(saved))

    assert main(["export", str(saved), str(tmp_path / "out.gguf")]) == 0
    assert f"tokenizer copied from {gguf.resolve()}" in capsys.readouterr().out


def test_save_pruned_keeps_a_given_model_key(tmp_path):
    model = make_model("llama")
    model.llmprune_source = "org/the-loaded-one"
    llmprune.save_pruned(model, make_tokenizer(), tmp_path / "a", {"model": "org/the-named-one"})
    llmprune.save_pruned(model, make_tokenizer(), tmp_path / "b")
    assert json.loads((tmp_path / "a" / "llmprune.json").read_text())["model"] == "org/the-named-one"
    assert json.loads((tmp_path / "b" / "llmprune.json").read_text())["model"] == "org/the-loaded-one"
