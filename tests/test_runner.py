"""The sweep runner end to end on a tiny model: results, resume, restore, dense baselines, refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import llmprune.engine as pipeline_module
import llmprune.evaluation.perplexity as perplexity_module
from conftest import make_model, make_tokenizer
from llmprune.blocks import hook_count
from llmprune.errors import LlmpruneError
from llmprune.models import get_blocks, prunable_linears
from llmprune.recipes import load_recipe
from llmprune.results import DENSE, RESULT_SCHEMA
from llmprune.runner import plan, restore_weights, run_recipe, snapshot_weights

WORDS = ("the quick brown fox jumps over the lazy dog a stitch in time saves nine "
         "pruning removes weights from a network without retraining it ").split()


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A calibration jsonl (c4-style documents) and an evaluation text file."""
    root = tmp_path_factory.mktemp("data")
    docs = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(120 + 10 * i)) for i in range(8)]
    (root / "calib.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (root / "eval.txt").write_text(" ".join(reversed(docs)))
    return root


class Loader:
    """Loads the same tiny model for any name and counts the loads."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, name, dtype=None, device=None):
        self.calls.append((name, dtype, device))
        return make_model("llama", seed=0), self.tokenizer


def write_recipe(folder: Path, data: Path, runs: str, name: str = "tiny", extra: str = "") -> Path:
    path = folder / f"{name}.yaml"
    calib = data / "calib.jsonl"
    path.write_text(f"""
name: {name}
description: a tiny test recipe
defaults:
  model: tiny-llama
  device: cpu
  prune: {{sparsity: 0.5, calib: {{dataset: "{calib}", nsamples: 4, seqlen: 32, batch_size: 2}}}}
  eval: {{datasets: ["{data / 'eval.txt'}"], seqlen: 32}}
{extra}
runs:
{runs}
""")
    return path


TWO_RUNS = """
  - {name: magnitude-50, prune: {method: magnitude}}
  - {name: wanda-2:4, prune: {method: wanda, pattern: "2:4"}}
"""


def ppl_of(path: Path) -> float:
    record = json.loads(path.read_text())
    (value,) = record["perplexity"].values()
    return value["ppl"]


@pytest.fixture
def count_prunes(monkeypatch):
    """Counts pipeline.prune calls; ``fail_on`` makes the n-th call raise (a simulated crash)."""
    state = {"calls": [], "fail_on": None}
    real = pipeline_module.prune

    def counting(model, tokenizer, config, **kwargs):
        state["calls"].append(config.method)
        if state["fail_on"] == len(state["calls"]):
            raise KeyboardInterrupt("simulated Ctrl-C")
        return real(model, tokenizer, config, **kwargs)

    monkeypatch.setattr(pipeline_module, "prune", counting)
    return state


def test_run_writes_results_dense_baseline_recipe_and_report(tmp_path, data, tokenizer):
    recipe = write_recipe(tmp_path, data, TWO_RUNS)
    out = tmp_path / "out"
    loader = Loader(tokenizer)
    paths = run_recipe(recipe, out, loader=loader, progress=False)
    assert [p.name for p in paths] == ["dense.json", "magnitude-50.json", "wanda-2_4.json"]
    assert len(loader.calls) == 1  # one load for the model, restored between runs
    dense, magnitude, wanda = (json.loads(p.read_text()) for p in paths)
    assert dense["method"] == DENSE and dense["sparsity"] == 0.0 and dense["config"] is None
    assert dense["prune"] is None and dense["prune_seconds"] is None
    assert magnitude["method"] == "magnitude"
    assert (magnitude["group"], magnitude["metric"]) == ("layer", "weight")
    assert magnitude["nsamples"] is None  # magnitude uses no calibration data
    assert wanda["pattern"] == "2:4" and wanda["metric"] == "wanda" and wanda["nsamples"] == 4
    assert wanda["prune"]["overall_sparsity"] == pytest.approx(0.5)
    for record in (magnitude, wanda):  # the record shows the group/metric every layer was pruned with
        layers = record["prune"]["layers"]
        assert {(la["info"]["group"], la["info"]["metric"]) for la in layers} == \
            {(record["group"], record["metric"])}
    for record in (dense, magnitude, wanda):
        assert record["schema"] == RESULT_SCHEMA and record["recipe"] == "tiny"
        assert record["eval"]["seqlen"] == 32 and record["model"] == "tiny-llama"
        assert set(record) >= {"versions", "machine", "zeroshot", "perplexity", "prune_seconds", "config"}
    assert ppl_of(paths[0]) < ppl_of(paths[1]) or ppl_of(paths[0]) < ppl_of(paths[2])
    saved = json.loads((out / "recipe.json").read_text())
    assert saved["name"] == "tiny" and [r["name"] for r in saved["runs"]] == ["magnitude-50", "wanda-2:4"]
    md = (out / "summary.md").read_text()
    assert "| Method | 50% | 2:4 |" in md and "wanda-2:4" in md
    assert len((out / "summary.csv").read_text().splitlines()) == 4
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_crash_then_rerun_resumes_without_recomputing(tmp_path, data, tokenizer, count_prunes, monkeypatch):
    recipe = write_recipe(tmp_path, data, TWO_RUNS)
    out = tmp_path / "out"
    count_prunes["fail_on"] = 2  # the second pruning run dies
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, out, loader=Loader(tokenizer), progress=False)
    assert sorted(p.name for p in out.glob("*.json")) == ["dense.json", "magnitude-50.json", "recipe.json"]
    assert not list(out.glob(".*"))
    stamps = {name: (out / name).stat().st_mtime_ns for name in ("dense.json", "magnitude-50.json")}

    evaluated = []
    real_eval = perplexity_module.evaluate_perplexity
    monkeypatch.setattr(perplexity_module, "evaluate_perplexity",
                        lambda *a, **k: evaluated.append(a[2]) or real_eval(*a, **k))
    count_prunes["calls"].clear()
    count_prunes["fail_on"] = None
    paths = run_recipe(recipe, out, loader=Loader(tokenizer), progress=False)
    assert count_prunes["calls"] == ["wanda"]  # only the unfinished run is pruned ...
    assert len(evaluated) == 1  # ... and evaluated; the dense baseline is not redone
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == stamps
    assert all(p.exists() for p in paths) and len(paths) == 3

    # a third run has nothing left to do and does not even load the model
    loader = Loader(tokenizer)
    count_prunes["calls"].clear()
    run_recipe(recipe, out, loader=loader, progress=False)
    assert loader.calls == [] and count_prunes["calls"] == []


def test_restored_weights_give_the_numbers_of_a_fresh_load(tmp_path, data, tokenizer):
    recipe = write_recipe(tmp_path, data, TWO_RUNS)
    # wanda runs after a restore
    shared = run_recipe(recipe, tmp_path / "a", loader=Loader(tokenizer), progress=False)
    fresh_loader = Loader(tokenizer)
    fresh = run_recipe(recipe, tmp_path / "b", only="wanda-2:4", loader=fresh_loader, progress=False)
    assert [p.name for p in fresh] == ["wanda-2_4.json"] and len(fresh_loader.calls) == 1
    assert not (tmp_path / "b" / "dense.json").exists()  # --only runs exactly the named runs
    assert ppl_of(shared[2]) == pytest.approx(ppl_of(fresh[0]), rel=1e-6, abs=0)
    a, b = (json.loads(p.read_text())["prune"]["layers"] for p in (shared[2], fresh[0]))
    assert [layer["zeros"] for layer in a] == [layer["zeros"] for layer in b]


def test_snapshot_and_restore_undo_pruning_in_place(tokenizer):
    from llmprune.config import CalibConfig, PruneConfig
    from llmprune.engine import prune

    model, reference = make_model("llama", seed=0), make_model("llama", seed=0)
    saved = snapshot_weights(model)
    windows = torch.randint(0, 400, (4, 32), generator=torch.Generator().manual_seed(0))
    prune(model, None, PruneConfig(method="sparsegpt", calib=CalibConfig(nsamples=4, seqlen=32)),
          windows=windows, progress=False)
    changed = any(not torch.equal(m.weight, reference.get_submodule(n).weight)
                  for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    assert changed
    restore_weights(model, saved)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert hook_count(model) == 0
    assert all(t.device.type == "cpu" for t in saved.values())
    assert len(saved) == sum(len(prunable_linears(model, i)) for i in range(len(get_blocks(model))))


def test_different_recipe_in_the_same_out_dir_is_refused_unless_forced(tmp_path,
                                                                       data, tokenizer, count_prunes):
    out = tmp_path / "out"
    first = write_recipe(tmp_path, data, TWO_RUNS)
    run_recipe(first, out, loader=Loader(tokenizer), progress=False)
    other = write_recipe(tmp_path, data, """
  - {name: magnitude-50, prune: {method: magnitude}}
  - {name: sparsegpt-50, prune: {method: sparsegpt}}
""", name="other")
    count_prunes["calls"].clear()
    with pytest.raises(LlmpruneError,
                       match=r"refusing to write into .*different recipe.*runs added: sparsegpt-50.*--force"):
        run_recipe(other, out, loader=Loader(tokenizer), progress=False)
    assert count_prunes["calls"] == []
    assert json.loads((out / "recipe.json").read_text())["name"] == "tiny"

    run_recipe(other, out, loader=Loader(tokenizer), force=True, progress=False)
    # magnitude-50 has the same settings in both recipes and is kept; wanda-2:4 is set aside
    assert count_prunes["calls"] == ["sparsegpt"]
    assert json.loads((out / "recipe.json").read_text())["name"] == "other"
    assert (out / "wanda-2_4.json.stale").exists() and not (out / "wanda-2_4.json").exists()
    assert "wanda-2:4" not in (out / "summary.md").read_text()


def test_folder_of_loose_results_is_refused(tmp_path, data, tokenizer):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.json").write_text(json.dumps({"schema": RESULT_SCHEMA, "name": "x"}))
    with pytest.raises(LlmpruneError, match="no recipe.json"):
        run_recipe(write_recipe(tmp_path, data, TWO_RUNS), out, loader=Loader(tokenizer), progress=False)


def test_unknown_only_name_is_a_user_error(tmp_path, data, tokenizer):
    with pytest.raises(LlmpruneError,
                       match="'nope' is not a run of this recipe: runs are dense, magnitude-50"):
        run_recipe(write_recipe(tmp_path, data, TWO_RUNS), tmp_path / "out", only="nope",
                   loader=Loader(tokenizer), progress=False)


def test_unknown_only_name_points_to_list_and_the_close_name(tmp_path, data, tokenizer, capsys):
    from llmprune.cli import main

    recipe = write_recipe(tmp_path, data, TWO_RUNS)
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--only", "dense,wanda-2_4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--only 'wanda-2_4' is not a run of this recipe (did you mean 'wanda-2:4'?): runs are dense, " \
           "magnitude-50, wanda-2:4" in err
    assert f"`llmprune run {recipe} --list` lists them" in err
    assert not (tmp_path / "out").exists()


def test_only_help_says_it_takes_the_names_list_prints():
    from llmprune.cli import build_parser

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    helps = {action.dest: action.help for action in run._actions}
    assert "comma-separated list of run names as --list prints them" in helps["only"]
    assert "loads no model" in helps["list"]


def test_dense_baselines_once_per_model_and_eval_settings(tmp_path, data):
    path = write_recipe(tmp_path, data, """
  - {name: a1, model: org/a}
  - {name: a2, model: org/a, prune: {method: magnitude}}
  - {name: a3, model: org/a, eval: {seqlen: 16}}
  - {name: b1, model: org/b}
""")
    jobs = plan(load_recipe(path))
    assert [(j.name, j.prune is None) for j in jobs] == [
        ("dense-a-eval0", True), ("dense-a-eval1", True), ("a1", False), ("a2", False), ("a3", False),
        ("dense-b", True), ("b1", False)]
    assert jobs[1].eval.seqlen == 16
    no_dense = write_recipe(tmp_path, data, "  - {name: a1}\n", name="nodense", extra="dense: false")
    assert [j.name for j in plan(load_recipe(no_dense))] == ["a1"]


def test_zeroshot_results_reach_the_record_and_the_report(tmp_path, data, tokenizer, data_dir):
    recipe = write_recipe(tmp_path, data, "  - {name: wanda-50, eval: {zeroshot: [rte], limit: 4}}\n")
    paths = run_recipe(recipe, tmp_path / "out", data_dir=data_dir, loader=Loader(tokenizer), progress=False)
    for path in paths:
        zeroshot = json.loads(path.read_text())["zeroshot"]
        assert zeroshot["tasks"]["rte"]["n"] == 4 and 0.0 <= zeroshot["mean_acc"] <= 1.0
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "## Mean zero-shot accuracy (%): tiny-llama" in md
    assert "Tasks: rte; first 4 documents per task." in md


def test_every_run_is_checked_before_the_first_model_loads(tmp_path, data, tokenizer):
    """A missing data file in the last run fails the sweep at once, not after the first runs."""
    gone = tmp_path / "gone.txt"
    runs = TWO_RUNS + f'  - {{name: late, prune: {{method: wanda}}, eval: {{datasets: ["{gone}"]}}}}\n'
    loader = Loader(tokenizer)
    with pytest.raises(LlmpruneError, match="gone.txt"):
        run_recipe(write_recipe(tmp_path, data, runs), tmp_path / "out", loader=loader, progress=False)
    assert loader.calls == [] and not (tmp_path / "out").exists()


def test_shape_errors_of_a_later_run_fail_before_the_first_run(tmp_path, data, tokenizer):
    runs = TWO_RUNS + "  - {name: bad-include, prune: {method: wanda, include: ['*.nothing']}}\n"
    with pytest.raises(LlmpruneError, match="bad-include.*no prunable layer"):
        run_recipe(write_recipe(tmp_path, data, runs), tmp_path / "out",
                   loader=Loader(tokenizer), progress=False)
    assert not list((tmp_path / "out").glob("magnitude*.json"))
    assert not list((tmp_path / "out").glob("dense*.json"))


def test_out_that_cannot_be_made_is_refused_first(tmp_path, data, tokenizer):
    (tmp_path / "file").write_text("x")
    loader = Loader(tokenizer)
    with pytest.raises(LlmpruneError, match="not a folder"):
        run_recipe(write_recipe(tmp_path, data, TWO_RUNS), tmp_path / "file" / "out",
                   loader=loader, progress=False)
    assert loader.calls == []


def test_results_written_before_a_new_config_option_still_match(tmp_path, data, tokenizer):
    """A PruneConfig field added later (its default applies) must not make every earlier result stale."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, data, TWO_RUNS)
    run_recipe(recipe, out, loader=Loader(tokenizer), progress=False)
    for path in [out / "recipe.json", *out.glob("magnitude*.json")]:  # as an older llmprune wrote them
        record = json.loads(path.read_text())
        configs = [run["prune"] for run in record["runs"]] if "runs" in record else [record["config"]]
        for config in configs:
            config.pop("true_sequential")
        path.write_text(json.dumps(record))
    loader = Loader(tokenizer)
    run_recipe(recipe, out, loader=loader, progress=False)
    assert loader.calls == []  # nothing re-ran


def test_progress_off_a_terminal_is_plain_lines(tmp_path, data, tokenizer, capsys):
    """The sweep's bar goes through llmprune.progress: in a log file, whole lines, no \\r."""
    run_recipe(write_recipe(tmp_path, data, TWO_RUNS), tmp_path / "out", loader=Loader(tokenizer),
               progress=True, report=False)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b[" not in err
    assert "tiny: done, 3/3 run in " in err
