"""`llmprune run RECIPE --list`: every run and dense baseline with what it is, and with --out the state
of its result there (done / stale / missing), from the recipe and the folder's JSON alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmprune.cli import main
from llmprune.jobs import list_runs, plan
from llmprune.recipes import load_recipe
from llmprune.results import result_record

ROOT = Path(__file__).resolve().parents[1]

GRID = """\
name: grid
description: a grid and one hand-written run
defaults:
  model: org/tiny
  device: cpu
  prune:
    calib: {dataset: c4, nsamples: 4, seqlen: 64}
  eval: {datasets: [wikitext2], seqlen: 64, max_windows: 2}
grid:
  name: "{method}-{pattern}"
  axes:
    prune.method: [magnitude, wanda]
    prune.pattern: [unstructured, "2:4"]
runs:
  - name: owl-wanda-60
    prune: {method: wanda, sparsity: 0.6, allocation: owl, reconstruct: true}
    eval: {zeroshot: [rte], limit: 3}
"""


@pytest.fixture
def grid(tmp_path) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(GRID)
    return path


def _write_result(out: Path, job, **config_changes) -> None:
    """A result record as the runner writes it (numbers made up); ``config_changes``: the settings
    it was made with instead of the job's, for a stale result."""
    config = job.prune.derived(**config_changes) if config_changes else job.prune
    record = result_record(name=job.name, model=job.model, config=config, eval_config=job.eval,
                           perplexity={"wikitext2": {"ppl": 30.0}}, recipe="grid")
    (out / job.filename).write_text(json.dumps(record))


def _listing(capsys, *args: str) -> str:
    assert main(["run", *map(str, args), "--list"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def test_list_names_every_run_and_says_what_it_is(grid, capsys):
    out = _listing(capsys, grid)
    lines = out.splitlines()
    assert lines[0] == f"grid ({grid}): 5 runs and 2 dense baselines"
    rows = {line.split()[0]: line for line in lines if line.startswith("  ") and not line.startswith("   ")}
    # runs: first, then the grid's runs; before them the dense baselines, numbered in order of first use
    assert list(rows) == ["run", "dense-eval0", "dense-eval1", "owl-wanda-60", "magnitude-unstructured",
                          "magnitude-2:4", "wanda-unstructured", "wanda-2:4"]
    assert [job.name for job in plan(load_recipe(grid))] == list(rows)[1:]  # the runner's own order
    assert "wanda (Wanda), 2:4 (50%); calib c4 4×64 seed 0; eval wikitext2 (first 2 windows of 64 tokens)" \
        in rows["wanda-2:4"]
    assert "org/tiny (float32, cpu); magnitude (Magnitude), 50% unstructured; no calibration" \
        in rows["magnitude-unstructured"]
    assert "wanda (Wanda), 60% unstructured, allocation owl, reconstruct obs;" in rows["owl-wanda-60"]
    assert "zero-shot rte (first 3 documents each)" in rows["owl-wanda-60"]
    # the dense baselines say what they are and which runs share them
    assert "dense baseline: the unpruned org/tiny" in rows["dense-eval1"]
    assert "shared by the 4 runs with this evaluation (magnitude-unstructured, magnitude-2:4, " \
           "wanda-unstructured, …)" in rows["dense-eval1"]
    assert "used by owl-wanda-60, the one run with this evaluation" in rows["dense-eval0"]
    assert "add --out DIR" in out and "done" not in out


def test_list_with_out_tells_done_stale_and_missing(grid, tmp_path, capsys):
    recipe = load_recipe(grid)
    jobs = {job.name: job for job in plan(recipe)}
    out = tmp_path / "results"
    out.mkdir()
    (out / "recipe.json").write_text(json.dumps(recipe.to_dict()))
    _write_result(out, jobs["wanda-2:4"])  # valid
    _write_result(out, jobs["magnitude-unstructured"], sparsity=0.7)  # made with other settings
    text = _listing(capsys, grid, "--out", out)
    states = {line.split()[0]: line.split()[1] for line in text.splitlines() if line.startswith("  ")}
    assert states == {"run": "result", "dense-eval0": "missing", "dense-eval1": "missing",
                      "magnitude-unstructured": "stale", "magnitude-2:4": "missing",
                      "wanda-unstructured": "missing", "wanda-2:4": "done", "owl-wanda-60": "missing"}
    assert f"results in {out}: 1 done, 1 stale, 5 missing" in text
    assert "magnitude-unstructured is stale: prune.sparsity is 0.7 in the result, 0.5 in the recipe" in text
    assert "refuses" not in text  # the folder is this recipe's
    # the runner agrees: exactly the runs --list calls done are skipped
    from llmprune.runner import prepare

    _, _, _, pending = prepare(grid, out, check_models=False)
    assert "wanda-2:4" not in [job.name for job in pending] and len(pending) == 6


def test_list_says_when_the_folder_holds_another_recipe(grid, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    other = load_recipe(grid).to_dict()
    other["runs"] = other["runs"][:2]
    (out / "recipe.json").write_text(json.dumps(other))
    text = _listing(capsys, grid, "--out", out)
    assert "note: `llmprune run` refuses" in text
    assert "runs added: magnitude-2:4, wanda-unstructured, wanda-2:4" in text
    assert "--force" in text


def test_list_of_a_folder_not_made_yet_and_only(grid, tmp_path, capsys):
    text = _listing(capsys, grid, "--out", tmp_path / "new", "--only", "wanda-2:4,dense-eval0")
    assert f"results in {tmp_path / 'new'} (not made yet): 2 missing" in text
    assert "wanda-2:4" in text and "magnitude-2:4" not in text
    assert not (tmp_path / "new").exists()  # --list writes nothing


@pytest.mark.parametrize("args, needle", [
    (["--only", "wanda-2_4"], "--only 'wanda-2_4' is not a run of this recipe (did you mean 'wanda-2:4'?)"),
    (["--out", "FILE"], "is a file"),
])
def test_list_bad_input_is_one_line_exit_2(grid, tmp_path, capsys, args, needle):
    (tmp_path / "FILE").write_text("x")
    args = [str(tmp_path / "FILE") if a == "FILE" else a for a in args]
    assert main(["run", str(grid), "--list", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and err.startswith("llmprune: error: ")


def test_list_of_a_bad_recipe_names_the_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(GRID.replace("    prune: {method: wanda, sparsity: 0.6",
                                 "    prune: {method: wanda, sparsity_: 0.6"))
    assert main(["run", str(path), "--list"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{path} line 16: unknown key runs[0].prune.sparsity_ (did you mean 'sparsity'?)" in err


def test_list_loads_nothing_heavy(tmp_path):
    """No torch, no transformers, no lm-eval: the listing reads YAML and JSON only."""
    code = ("import sys\n"
            "from llmprune.cli import main\n"
            f"code = main(['run', {str(ROOT / 'recipes' / 'smollm2_cpu.yaml')!r}, '--list', '--out', "
            f"{str(ROOT / 'eval' / 'results' / 'smollm2_cpu')!r}])\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'lm_eval', 'datasets', 'accelerate', 'llmprune.models'))\n"
            "heavy += [m for m in sys.modules if m.startswith(('llmprune.models', 'llmprune.engine', "
            "'llmprune.runner'))]\n"
            "print('HEAVY', heavy, file=sys.stderr)\n"
            "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # (transformers here: cli.main's _quiet_libraries must be skipped for `run --list`)
    assert "HEAVY []" in done.stderr, done.stderr
    assert "dense-eval0" in done.stdout and "wanda-unstructured" in done.stdout


def test_list_runs_of_every_shipped_recipe():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        lines = list_runs(path)
        recipe = load_recipe(path)
        assert all(any(line.startswith(f"  {name} ") for line in lines) for name in recipe.names), path
