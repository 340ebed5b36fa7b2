"""The distances to the dense model from the CLI, the Python API and recipes (issue 22), checked
against a brute-force computation on the tiny model; bad requests are one line before any work."""

from __future__ import annotations

import json

import pytest
import torch

import llmprune
from conftest import make_model, make_tokenizer, write_local_setup
from llmprune.cli import main
from llmprune.config import EvalConfig, PruneConfig
from llmprune.data import eval_tokens
from llmprune.errors import LlmpruneError


@pytest.fixture(scope="module")
def local_setup(tmp_path_factory):
    return write_local_setup(tmp_path_factory.mktemp("kl"))


def _brute_kl(dense, pruned, tokens, seqlen, windows):
    """Mean KL(dense || pruned) and top-1 agreement over the perplexity's positions, float64."""
    data = tokens[: windows * seqlen].view(windows, seqlen)
    with torch.no_grad():
        p = torch.log_softmax(dense(data).logits[:, :-1].double(), -1)
        q = torch.log_softmax(pruned(data).logits[:, :-1].double(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    return kl.mean().item(), (p.argmax(-1) == q.argmax(-1)).double().mean().item()


def test_prune_model_kl_matches_brute_force(local_setup, tmp_path):
    model, tok = make_model("llama"), make_tokenizer()
    dense = make_model("llama")  # the same seed: the same weights
    ev = EvalConfig(datasets=(str(local_setup / "eval.txt"),), seqlen=32, max_windows=4, kl=True, kl_topk=8,
                    kl_exact=True, kl_cache=str(tmp_path / "cache"))
    config = PruneConfig(method="magnitude", sparsity=0.6)
    result = llmprune.prune_model((model, tok), config, ev)
    d = result.perplexity[str(local_setup / "eval.txt")].distance
    tokens = eval_tokens(str(local_setup / "eval.txt"), tok, 32)
    kl, top1 = _brute_kl(dense, result.model, tokens, 32, 4)
    assert d.exact and d.kl_mean == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert d.top1_agreement == pytest.approx(top1)
    assert d.approx["kl_mean"] <= d.kl_mean + 1e-6  # the top-k coarsening is a lower bound
    assert result.record["perplexity"][str(local_setup / "eval.txt")]["distance"]["kl_mean"] == d.kl_mean
    assert "KL(dense || pruned)" in result.summary()


def test_cli_prune_then_eval_with_dense_give_the_same_distance(local_setup, tmp_path, capsys, monkeypatch):
    cache, out = tmp_path / "cache", tmp_path / "prune.json"
    name = str(local_setup / "eval.txt")
    code = main(["prune", "--model", str(local_setup / "model"), "--method", "magnitude", "--sparsity", "0.6",
                 "--seqlen", "32", "--eval", name, "--max-windows", "4", "--eval-kl", "--kl-topk", "8",
                 "--kl-cache", str(cache), "--save", str(tmp_path / "pruned"), "--json", str(out),
                 "--no-progress"])
    assert code == 0
    assert "top-1 agreement" in capsys.readouterr().out
    from_prune = json.loads(out.read_text())["perplexity"][name]["distance"]
    assert from_prune["kl_mean"] > 0 and not from_prune["exact"]
    out2 = tmp_path / "eval.json"
    code = main(["eval", "--model", str(tmp_path / "pruned"), "--dense", str(local_setup / "model"),
                 "--dataset", name, "--seqlen", "32", "--max-windows", "4", "--eval-kl", "--kl-topk", "8",
                 "--kl-cache", str(cache), "--json", str(out2), "--no-progress"])
    assert code == 0
    record = json.loads(out2.read_text())
    from_eval = record["perplexity"][name]["distance"]
    # the saved checkpoint is the pruned model bit for bit: the same numbers by another path
    assert from_eval["kl_mean"] == pytest.approx(from_prune["kl_mean"], rel=1e-6)
    assert from_eval["top1_agreement"] == from_prune["top1_agreement"]
    assert record["dense_model"] == str(local_setup / "model")
    # the caches the prune wrote are reused: no dense pass this time (evaluate runs once, on the model)
    import llmprune.cli as cli

    calls = []
    real = cli.evaluate
    monkeypatch.setattr(cli, "evaluate", lambda *a, **k: calls.append(k.get("dense")) or real(*a, **k))
    assert main(["eval", "--model", str(tmp_path / "pruned"), "--dense", str(local_setup / "model"),
                 "--dataset", name, "--seqlen", "32", "--max-windows", "4", "--eval-kl", "--kl-topk", "8",
                 "--kl-cache", str(cache), "--no-progress"]) == 0
    assert len(calls) == 1 and not calls[0].record


@pytest.mark.parametrize("argv, message", [
    (["eval", "--eval-kl"], "give that model with --dense"),
    (["eval", "--generate", "2"], "give that model with --dense"),
    (["eval", "--dense", "smollm2-135m"], "add one of them"),
    (["eval", "--dense", "smollm2-135m", "--zeroshot", "rte", "--eval-kl"], "none is given"),
    (["prune", "--eval-kl", "--offload", "cpu"], "drop --offload"),
    (["eval", "--eval-kl", "--dense", "smollm2-135m", "--kl-topk", "0"], "kl_topk must be a positive"),
    (["eval", "--generate", "-1", "--dense", "smollm2-135m"], "generate must be a number"),
])
def test_bad_distance_requests_are_one_line_before_loading(monkeypatch, capsys, argv, message):
    import llmprune.models.load as load

    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_recover_refuses_distance_requests_before_loading(capsys, tmp_path):
    code = main(["recover", "--model", str(tmp_path), "--teacher", "smollm2-135m", "--eval-kl",
                 "--no-progress"])
    assert code == 2
    assert "does not measure --eval-kl" in capsys.readouterr().err


def test_evaluate_without_dense_reference_is_refused():
    model, tok = make_model("llama"), make_tokenizer()
    with pytest.raises(LlmpruneError, match="dense model"):
        llmprune.evaluation.evaluate(model, tok, EvalConfig(datasets=("x.txt",), kl=True))


def test_recipe_runs_measure_distance_and_rebuild_missing_caches(local_setup, tmp_path):
    from llmprune.runner import run_recipe

    name = str(local_setup / "eval.txt")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: kl\n"
        "defaults:\n  model: tiny\n  prune: {calib: {dataset: " + str(local_setup / "calib.jsonl") +
        ", nsamples: 2, seqlen: 32}}\n"
        "  eval: {datasets: [" + name + "], seqlen: 32, max_windows: 2, kl: true, kl_topk: 4, kl_cache: "
        + str(tmp_path / "cache") + "}\n"
        "runs:\n  - {name: wanda-50, prune: {method: wanda}}\n"
        "  - {name: magnitude-50, prune: {method: magnitude}}\n")
    calls = []

    def loader(model_name, dtype=None, device=None):
        calls.append(model_name)
        return make_model("llama"), make_tokenizer()

    out = tmp_path / "out"
    run_recipe(recipe, out, loader=loader, progress=False, report=False)
    records = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json") if p.name != "recipe.json"}
    dense = [r for r in records.values() if r["method"] == "dense"]
    assert len(dense) == 1 and dense[0]["perplexity"][name].get("distance") is None
    first = records["wanda-50"]["perplexity"][name]["distance"]["kl_mean"]
    assert first > 0 and records["magnitude-50"]["perplexity"][name]["distance"]["kl_mean"] > 0
    # the caches are gone and the dense run is done: the runner rebuilds them before the next run
    for path in (tmp_path / "cache").rglob("*"):
        if path.is_file():
            path.unlink()
    (out / "wanda-50.json").unlink()
    run_recipe(recipe, out, loader=loader, progress=False, report=False)
    again = json.loads((out / "wanda-50.json").read_text())["perplexity"][name]["distance"]["kl_mean"]
    assert again == pytest.approx(first, rel=1e-6)
    assert any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_an_already_pruned_checkpoint_is_never_the_dense_reference(local_setup, tmp_path, capsys,
                                                                   monkeypatch):
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(local_setup / "model"), "--method", "magnitude", "--sparsity", "0.5",
                 "--eval", "", "--save", str(pruned), "--no-progress"]) == 0
    capsys.readouterr()
    import llmprune.models.load as load

    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    name = str(local_setup / "eval.txt")
    for argv in (["prune", "--model", str(pruned), "--method", "magnitude", "--eval", name, "--eval-kl"],
                 ["eval", "--model", str(local_setup / "model"), "--dense", str(pruned), "--dataset", name,
                  "--eval-kl"]):
        assert main([*argv, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert "is already pruned (magnitude 50%" in err and len(err.splitlines()) == 1
