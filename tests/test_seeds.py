"""Calibration seeds in recipes (issue 22): ``seeds: [0, 1, 2]`` makes one run per seed, the tables show
mean ± sample standard deviation (checked against the statistics module) and the plots error bars;
a folder with one seed per setting reports exactly as before."""

from __future__ import annotations

import statistics

import pytest

from llmprune.config import CalibConfig, EvalConfig, PruneConfig
from llmprune.errors import LlmpruneError
from llmprune.evaluation.perplexity import PerplexityResult
from llmprune.jobs import plan, select
from llmprune.recipes import parse_recipe
from llmprune.report import plots, tables
from llmprune.results import parse_result, result_record


def _recipe(extra_defaults="", runs=None):
    import yaml

    text = ("name: s\ndefaults:\n  model: tiny\n" + extra_defaults +
            "runs:\n" + (runs or "  - {name: wanda-50, prune: {method: wanda}}\n"
                                 "  - {name: magnitude-50, prune: {method: magnitude}}\n"))
    return parse_recipe(yaml.safe_load(text))


def test_seeds_make_one_run_per_seed_and_magnitude_once():
    recipe = _recipe("  seeds: [0, 1, 2]\n")
    names = [run.name for run in recipe.runs]
    assert names == ["wanda-50-seed0", "wanda-50-seed1", "wanda-50-seed2", "magnitude-50"]
    assert [run.prune.calib.seed for run in recipe.runs[:3]] == [0, 1, 2]
    jobs = plan(recipe)
    assert [job.name for job in jobs].count("dense") == 1  # the dense baseline runs once
    assert [job.name for job in select(jobs, "wanda-50")] == names[:3]  # the recipe's name selects its seeds


def test_a_recipe_without_seeds_gives_the_runs_it_gave_before():
    recipe = _recipe()
    assert [run.name for run in recipe.runs] == ["wanda-50", "magnitude-50"]
    assert recipe.runs[0].prune.calib.seed == CalibConfig().seed
    off = _recipe("  seeds: [0, 1]\n", "  - {name: wanda-50, prune: {method: wanda}, seeds: null}\n")
    assert [run.name for run in off.runs] == ["wanda-50"]


@pytest.mark.parametrize("defaults, runs, message", [
    ("  seeds: [0, 0]\n", None, "lists seed 0 twice"),
    ("  seeds: []\n", None, "non-empty list"),
    ("  seeds: [a]\n", None, "integers from 0"),
    ("  seeds: [-1]\n", None, "integers from 0"),
    ("  seeds: [0, 1]\n", "  - {name: w, prune: {method: wanda, calib: {seed: 3}}}\n",
     "sets its own calibration seed"),
    ("  seeds: [0, 1]\n", "  - {name: w-seed0, prune: {method: wanda}}\n"
                          "  - {name: w, prune: {method: wanda}}\n", "rename one"),
])
def test_bad_seeds_are_one_clear_error(defaults, runs, message):
    with pytest.raises(LlmpruneError, match=message):
        _recipe(defaults, runs)


def test_seeds_at_the_top_level_or_as_an_axis_are_refused():
    import yaml

    with pytest.raises(LlmpruneError, match="seeds is a run key"):
        parse_recipe(yaml.safe_load("name: s\nseeds: [0]\nruns:\n  - {name: w, prune: {method: wanda}}\n"))
    with pytest.raises(LlmpruneError, match="cannot be an axis"):
        parse_recipe(yaml.safe_load("name: s\ngrid:\n  - name: '{seeds}'\n    axes: {seeds: [[0], [1]]}\n"))


def _result(method, seed, ppl, pattern="unstructured", name=None):
    config = PruneConfig(method=method, sparsity=0.5, pattern=pattern, calib=CalibConfig(seed=seed))
    ev = EvalConfig(datasets=("wikitext2",), seqlen=64)
    record = result_record(name=name or f"{method}-seed{seed}", model="tiny", config=config, eval_config=ev,
                           perplexity={"wikitext2": PerplexityResult("wikitext2", ppl, 1, 64, 64, 1.0, 64.0)})
    return parse_result(record, f"{name or method}-{seed}.json")


def test_table_cell_is_mean_and_sample_std_over_seeds():
    values = [30.125, 31.5, 29.875]
    results = [_result("wanda", s, v) for s, v in enumerate(values)] + [_result("sparsegpt", 0, 28.0)]
    text = "\n".join(tables.pivot(results, lambda r: r.ppl.get("wikitext2")))
    want = f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
    assert want in text and "28.00" in text and "28.00 ±" not in text
    assert "ddof=1" in text and "n = 3 calibration seeds (0, 1, 2)" in text


def test_one_seed_per_setting_reports_as_before():
    results = [_result("wanda", 0, 30.0), _result("sparsegpt", 0, 28.0)]
    text = "\n".join(tables.pivot(results, lambda r: r.ppl.get("wikitext2")))
    assert "±" not in text and "seed" not in text


def test_plots_draw_error_bars_for_seed_means(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn = []
    real = Axes.bar

    def bar(self, x, height, *args, **kwargs):
        drawn.append(kwargs.get("yerr"))
        return real(self, x, height, *args, **kwargs)

    monkeypatch.setattr(Axes, "bar", bar)
    values = [200.0, 230.0, 215.0]
    results = [_result("wanda", s, v, pattern="2:4") for s, v in enumerate(values)]
    results += [_result("wanda", s, 40.0 + s, name=f"wanda-u-seed{s}") for s in range(3)]
    results += [_result("magnitude", 0, 400.0, pattern="2:4")]
    assert plots.plot_pattern(results, "wikitext2", "t", tmp_path / "p.png") is not None
    errs = sorted(e for bars in drawn if bars is not None for e in bars)
    assert errs == pytest.approx(sorted([statistics.stdev([40.0, 41.0, 42.0]), statistics.stdev(values)]))
