"""Sweeps through submitit: each run a separate process, results and report as with the local runner."""

from __future__ import annotations

import json

import pytest

from conftest import write_local_setup
from llmprune.cli import main
from llmprune.config import SlurmConfig
from llmprune.errors import LlmpruneError
from llmprune.executors import check_executor, run_recipe_submitit, slurm_parameters
from llmprune.recipes import load_recipe


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A tiny model on disk (jobs are fresh processes: they load it by path) and a two-run recipe."""
    root = write_local_setup(tmp_path_factory.mktemp("sweep"), docs=6)
    recipe = root / "tiny.yaml"
    recipe.write_text(f"""
name: tiny
defaults:
  model: "{root / 'model'}"
  device: cpu
  prune: {{calib: {{dataset: "{root / 'calib.jsonl'}", nsamples: 2, seqlen: 32}}}}
  eval: {{datasets: ["{root / 'eval.txt'}"], seqlen: 32}}
slurm: {{partition: gpu, time: 30, mem_gb: 16}}
runs:
  - {{name: magnitude-50, prune: {{method: magnitude}}}}
  - {{name: wanda-2:4, prune: {{method: wanda, pattern: "2:4"}}}}
""")
    return root, recipe


def test_each_run_is_a_separate_process_and_the_report_builds(sweep, tmp_path):
    root, recipe = sweep
    out = tmp_path / "out"
    written = run_recipe_submitit(recipe, out, executor="submitit-local", progress=False)
    assert [p.name for p in written] == ["dense.json", "magnitude-50.json", "wanda-2_4.json"]
    records = [json.loads(p.read_text()) for p in written]
    assert [r["method"] for r in records] == ["dense", "magnitude", "wanda"]
    assert records[2]["prune"]["overall_sparsity"] == pytest.approx(0.5)
    summary = (out / "summary.md").read_text()
    assert "Magnitude" in summary and "Wanda" in summary
    logs = sorted((out / ".submitit").glob("*_log.out"))
    assert len(logs) == 3  # one job per run

    # resumable: a lost result is the only one resubmitted
    (out / "magnitude-50.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in written if p.exists()}
    run_recipe_submitit(recipe, out, executor="submitit-local", progress=False)
    assert len(sorted((out / ".submitit").glob("*_log.out"))) == 4
    assert {p.name: p.stat().st_mtime_ns for p in written if p.name in before} == before
    assert json.loads((out / "magnitude-50.json").read_text())["method"] == "magnitude"


def test_slurm_parameters_come_from_the_recipe_block(sweep):
    slurm = load_recipe(sweep[1]).slurm
    assert slurm == SlurmConfig(partition="gpu", time=30, mem_gb=16)
    params = slurm_parameters(slurm, "slurm", "tiny")
    assert params == {"name": "llmprune-tiny", "timeout_min": 30, "gpus_per_node": 1,
                      "slurm_array_parallelism": 64, "slurm_partition": "gpu", "mem_gb": 16}
    assert "slurm_partition" not in slurm_parameters(slurm, "local", "tiny")


def test_slurm_block_does_not_make_the_results_another_recipes(sweep, tmp_path):
    """Editing the job sizes must not refuse the folder the sweep already wrote into."""
    from llmprune.runner import comparable_recipe

    root, recipe = sweep
    changed = root / "changed.yaml"
    changed.write_text(recipe.read_text().replace("time: 30", "time: 90"))
    a, b = load_recipe(recipe).to_dict(), load_recipe(changed).to_dict()
    assert a != b and comparable_recipe(a) == comparable_recipe(b)


@pytest.mark.parametrize("args, needle", [
    (["--partition", "gpu"], "need --executor slurm"),
    (["--executor", "submitit-local", "--mem-gb", "8"], "need --executor slurm"),
    (["--executor", "slurm"], "sbatch"),
    (["--executor", "nope"], "invalid choice"),
])
def test_bad_executor_input_is_one_line(sweep, args, needle, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch here
    assert main(["run", str(sweep[1]), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


@pytest.fixture
def no_submitit(monkeypatch):
    """``import submitit`` fails, as where it is not installed."""
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "submitit":
            raise ImportError("No module named 'submitit'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_missing_submitit_names_the_install_command(no_submitit):
    with pytest.raises(LlmpruneError, match="pip install submitit"):
        check_executor("submitit-local")


def test_missing_submitit_is_one_line_through_the_cli(sweep, no_submitit, capsys):
    assert main(["run", str(sweep[1]), "--executor", "slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "`pip install submitit`" in err and len(err.splitlines()) == 1


def test_bad_slurm_block_is_named(tmp_path, sweep):
    bad = tmp_path / "bad.yaml"
    bad.write_text(sweep[1].read_text().replace("time: 30", "time: -5"))
    with pytest.raises(LlmpruneError, match="slurm"):
        load_recipe(bad)
