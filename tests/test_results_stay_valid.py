"""Results must not move: every committed recipe's results are still its results (0 stale runs; a
recipe may hold only part of its runs), and
every results folder the report made regenerates byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llmprune.recipes import load_recipe
from llmprune.report import write_report
from llmprune.runner import prepare

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(ROOT.glob("recipes/*.yaml"))
# the committed results of a recipe live in eval/results/<recipe name>
COMMITTED = [(r, ROOT / "eval" / "results" / load_recipe(r).name) for r in RECIPES
             if (ROOT / "eval" / "results" / load_recipe(r).name / "recipe.json").is_file()]


def test_some_recipes_have_committed_results():
    assert {folder.name for _, folder in COMMITTED} >= {"smollm2_cpu", "frontier_smollm2"}


@pytest.mark.parametrize("recipe, folder", COMMITTED, ids=[f.name for _, f in COMMITTED])
def test_llmprune_run_finds_no_stale_run(recipe, folder, tmp_path):
    out = tmp_path / folder.name
    shutil.copytree(folder, out)
    _, _, selected, pending = prepare(recipe, out, check_models=False)
    assert selected and not list(out.glob("*.stale"))
    # a run still to do is one whose result was never made (the frontier recipe is ~10 CPU hours and
    # holds what was made so far), never one whose committed result no longer matches
    made = {path.name for path in folder.glob("*.json")}
    assert [job.name for job in pending if job.filename in made] == []


@pytest.mark.parametrize("recipe, folder", COMMITTED, ids=[f.name for _, f in COMMITTED])
def test_the_report_regenerates_byte_for_byte(recipe, folder, tmp_path):
    out = tmp_path / folder.name
    shutil.copytree(folder, out)
    written = write_report(out)
    for name in ("summary.md", "summary.csv"):
        assert written[name].read_bytes() == (folder / name).read_bytes(), name
