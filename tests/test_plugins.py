"""A third-party method, installed as a package with an entry point in the group ``llmprune.methods``
(tests/plugins/llmprune-random, installed by `make install-test`), appears in `llmprune prune
--method`, `--help`, recipes and report tables without any edit to llmprune."""

from __future__ import annotations

import json
from importlib import metadata

import pytest
import torch

from conftest import make_model, write_local_setup
from llmprune.cli import build_parser
from llmprune.cli import main as cli_main
from llmprune.config import PruneConfig
from llmprune.engine import prune
from llmprune.methods import METHODS, load_plugins
from llmprune.report import write_report

INSTALLED = any(ep.name == "random" for ep in metadata.entry_points(group="llmprune.methods"))
pytestmark = pytest.mark.skipif(not INSTALLED, reason="the llmprune-random test plugin is not installed: "
                                                      "`make install-test` installs it")


def test_the_plugin_is_loaded_and_registered():
    assert load_plugins().get("random") == "ok"
    spec = METHODS.get("random")
    assert spec.label == "Random" and spec.select.__module__ == "llmprune_random"


def test_its_method_and_option_are_flags():
    text = build_parser()._subparsers._group_actions[0].choices["prune"].format_help()
    assert "--random-seed" in text and "random" in text


def test_it_prunes_with_exact_counts_and_its_option_changes_the_mask():
    torch.manual_seed(0)
    masks = []
    for seed in (0, 0, 1):
        model = make_model(layers=1)
        report = prune(model, None, PruneConfig(method="random", sparsity=0.25, random_seed=seed),
                       progress=False)
        weight = model.model.layers[0].mlp.down_proj.weight
        assert ((weight == 0).sum(dim=1) == weight.shape[1] // 4).all()  # per row, exact
        assert report.overall_sparsity == pytest.approx(0.25)
        masks.append(weight == 0)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


def test_it_runs_from_the_cli_and_the_report_labels_it(tmp_path):
    root = write_local_setup(tmp_path)
    out = tmp_path / "res"
    out.mkdir()
    code = cli_main(["prune", "--model", str(root / "model"), "--method", "random", "--sparsity", "0.5",
                     "--random-seed", "3", "--eval", str(root / "eval.txt"), "--seqlen", "16",
                     "--max-windows", "1", "--no-progress", "--json", str(out / "random.json")])
    assert code == 0
    record = json.loads((out / "random.json").read_text())
    assert record["method"] == "random" and record["config"]["random_seed"] == 3
    md = write_report(out)["summary.md"].read_text()
    assert "| Random |" in md


def test_it_runs_in_a_recipe(tmp_path):
    from llmprune.recipes import parse_recipe

    recipe = parse_recipe({"name": "r", "dense": False, "defaults": {"model": "m"},
                           "runs": [{"name": "rnd", "prune": {"method": "random", "random_seed": 2}}]})
    assert recipe.runs[0].prune.random_seed == 2
