"""The 2024-26 frontier in the engine: --reconstruct admm, --method admm / alps / sparsellm and
--block-reconstruct lunch / ro, against direct computations on tiny models; the refusals and a
solver that diverges. The solvers' arithmetic against the official procedures: test_admm.py,
test_alps.py, test_sparsellm.py, test_blockopt.py."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import make_family_model, make_model, write_local_setup
from llmprune import PruneConfig, prune
from llmprune.cli import build_parser, main
from llmprune.errors import LlmpruneError

ROOT = Path(__file__).resolve().parents[1]


def _windows(n=4, seqlen=32, seed=1, vocab=512):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _inputs_of(model, module, windows):
    """(tokens, in) float32: what ``module`` receives over ``windows``, from a forward hook."""
    seen = []
    handle = module.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(windows)
    handle.remove()
    return torch.cat(seen).float()


def _block0_io(model, windows):
    """Block 0's inputs and the block's own output for them (its kwargs captured by a hook)."""
    block = model.model.layers[0]
    got = {}

    def keep(_m, args, kwargs):
        got["x"], got["kwargs"] = args[0] if args else kwargs["hidden_states"], kwargs

    handle = block.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        model(windows)
    handle.remove()
    return got["x"], {k: v for k, v in got["kwargs"].items() if k != "hidden_states"}


# ---- the config and the flags ---------------------------------------------------------------------

def test_reconstruct_takes_a_name_and_true_still_means_obs():
    assert PruneConfig(reconstruct=True).reconstruct == "obs"
    assert PruneConfig(reconstruct=False).reconstruct is None
    assert PruneConfig(reconstruct="ADMM").reconstruct == "admm"
    assert PruneConfig(reconstruct="admm").to_dict()["reconstruct"] == "admm"
    assert PruneConfig(block_reconstruct="none").block_reconstruct is None
    with pytest.raises(LlmpruneError, match="unknown reconstruction 'lunch': use one of"):
        PruneConfig(reconstruct="lunch")
    with pytest.raises(LlmpruneError, match="unknown block reconstruction"):
        PruneConfig(block_reconstruct="admm")
    parse = build_parser().parse_args
    assert parse(["prune", "--reconstruct"]).reconstruct == "obs"
    assert parse(["prune", "--reconstruct", "admm"]).reconstruct == "admm"
    assert parse(["prune"]).reconstruct is None and parse(["prune"]).block_reconstruct is None
    assert parse(["prune", "--block-reconstruct", "ro"]).block_reconstruct == "ro"


# ---- the ADMM update and gradual ADMM inside the engine ---------------------------------------------

def test_wanda_then_admm_update_equals_the_solver_on_directly_computed_statistics():
    from llmprune.math.solvers.admm import admm_update

    model, windows = make_model("llama"), _windows()
    dense = copy.deepcopy(model)
    prune(model, None, PruneConfig(method="wanda", sparsity=0.6, reconstruct="admm"), windows=windows,
          progress=False)
    layer = dense.model.layers[0].self_attn.q_proj
    x = _inputs_of(dense, layer, windows)  # block 0 sees the dense inputs
    hessian = 2 * x.T @ x / x.shape[0]
    w = layer.weight.detach().float()
    score = w.abs() * x.square().sum(0).sqrt()  # Wanda, by direct sums
    k = int(0.6 * w.shape[1])
    mask = torch.zeros_like(w, dtype=torch.bool).scatter_(1, score.argsort(dim=1, stable=True)[:, :k], True)
    expected, _ = admm_update(w, hessian, mask)
    got = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(got == 0, mask)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_gradual_admm_counts_and_beats_wanda_on_block0_output():
    model, windows = make_model("llama"), _windows()
    dense = copy.deepcopy(model)
    report = prune(model, None, PruneConfig(method="admm", sparsity=0.6), windows=windows, progress=False)
    for layer in report.layers:  # one threshold over the whole matrix: exact counts per layer
        assert layer.zeros == int(0.6 * layer.numel)
    nm = copy.deepcopy(dense)
    prune(nm, None, PruneConfig(method="admm", pattern="1:4"), windows=windows, progress=False)
    w = nm.model.layers[1].mlp.down_proj.weight
    assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 1).all()  # exactly one kept in every 4


# ---- the block reconstructions ------------------------------------------------------------------------

@pytest.mark.parametrize("step,options", [("lunch", {"lunch_lr": 1e-3, "lunch_epochs": 4}),
                                          ("ro", {"ro_lr": 1e-4, "ro_rounds": 2, "ro_samples": 4})])
def test_block_reconstruction_keeps_the_mask_and_moves_toward_the_dense_block(step, options):
    windows = _windows()
    dense = make_model("llama")
    x, kwargs = _block0_io(dense, windows)
    with torch.no_grad():
        target = dense.model.layers[0](x, **kwargs)
    plain, stepped = copy.deepcopy(dense), copy.deepcopy(dense)
    prune(plain, None, PruneConfig(method="wanda", sparsity=0.6), windows=windows, progress=False)
    config = PruneConfig(method="wanda", sparsity=0.6, block_reconstruct=step, **options)
    report = prune(stepped, None, config, windows=windows, progress=False)
    errors = []
    for model in (plain, stepped):
        with torch.no_grad():
            out = model.model.layers[0](x, **kwargs)
        errors.append(float((out - target).square().mean()))
    for (name, p), q in zip(plain.model.layers[0].named_parameters(), stepped.model.layers[0].parameters()):
        if p.dim() == 2:
            assert torch.equal(p == 0, q == 0), name  # block 0's mask is the method's, zeros kept
    assert errors[1] < 0.9 * errors[0], errors
    assert report.layers[0].info["block_reconstruct"]["name"] == step
    assert report.phase_seconds["block_reconstruct"][0] > 0


def test_lunch_trains_a_block_that_does_not_split_in_two_as_one():
    model = make_family_model("phi")  # attention and MLP in parallel on one norm: no H between them
    report = prune(model, None, PruneConfig(method="wanda", sparsity=0.5, block_reconstruct="lunch"),
                   windows=_windows(), progress=False)
    info = report.layers[0].info["block_reconstruct"]
    assert info["halves"] is False and "whole" in info
    assert all(layer.zeros >= int(0.5 * layer.numel) - layer.shape[0] for layer in report.layers)


# ---- refusals and divergence --------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--method", "admm", "--admm-rho", "0"], "admm_rho 0.0 must be positive"),
    (["--method", "admm", "--admm-prune-iterations", "30"], "admm_prune_iterations 30"),
    (["--method", "wanda", "--block-reconstruct", "lunch", "--lunch-lr", "-1"], "lunch_lr"),
    (["--method", "wanda", "--block-reconstruct", "ro", "--ro-rounds", "0"], "ro_rounds"),
    (["--method", "flap", "--block-reconstruct", "lunch"], "--block-reconstruct"),
    (["--method", "wanda", "--reconstruct", "lunch"], "unknown reconstruction 'lunch'"),
    (["--method", "alps", "--alps-rho", "-1"], "alps_rho"),
    (["--method", "sparsellm", "--skip-mlp"], "sparsellm couples a gated MLP"),
    (["--method", "sparsellm", "--structure", "heads"], "does not apply"),
    (["--method", "sparsellm", "--sparsellm-gamma", "0"], "sparsellm_gamma"),
])
def test_bad_input_is_one_line_exit_2_before_calibration(tmp_path, capsys, monkeypatch, flags, message):
    import llmprune.engine.inputs as inputs

    monkeypatch.setattr(inputs, "calibration_windows", lambda *a, **k: pytest.fail("calibration started"))
    root = write_local_setup(tmp_path)
    capsys.readouterr()
    code = main(["prune", "--model", str(root / "model"), "--calib", str(root / "calib.jsonl"), "--nsamples",
                 "2", "--seqlen", "32", "--eval", str(root / "eval.txt"), "--no-progress", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_a_diverging_solver_names_the_layer_and_saves_nothing(tmp_path, capsys, monkeypatch):
    import llmprune.math.solvers.admm as admm

    def diverged(weight, hessian, mask, **_):
        return torch.full_like(weight, float("nan")), {}

    monkeypatch.setattr(admm, "admm_update", diverged)
    root = write_local_setup(tmp_path)
    out = tmp_path / "pruned"
    capsys.readouterr()
    code = main(["prune", "--model", str(root / "model"), "--calib", str(root / "calib.jsonl"), "--nsamples",
                 "2", "--seqlen", "32", "--eval", str(root / "eval.txt"), "--no-progress", "--skip-dense",
                 "--method", "wanda", "--reconstruct", "admm", "--save", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "layers.0." in err and "non-finite" in err
    assert not out.exists()


# ---- the cost in decoder-stack forwards, in the report ---------------------------------------------

def test_cost_is_the_pruning_time_over_the_runs_own_stack_forward():
    from llmprune.results import stack_forwards

    # 4 blocks, the last without a propagation (no next block): its turn counts at the others' mean
    assert stack_forwards(12.0, {"propagate": [1.0, 2.0, 3.0, 0.0]}) == 12.0 / (2.0 * 4)
    assert stack_forwards(5.0, {"propagate": [0.0]}) is None  # one block: nothing measured
    assert stack_forwards(5.0, {"stats": [1.0]}) is None
    assert stack_forwards(None, {"propagate": [1, 0]}) is None
    assert stack_forwards(5.0, {"propagate": [1.0, 0.0, 1.0, 0.0]}) is None  # a block not propagated


def test_report_writes_the_cost_table_and_the_cost_plot(tmp_path):
    from test_report import record, write

    from llmprune.report import write_report

    runs = []
    for method, ppl, seconds in (("wanda", 20.0, 10.0), ("sparsegpt", 15.0, 16.0)):
        for seed in (0, 1):
            r = record(f"{method}-seed{seed}", method, ppl={"wikitext2": ppl + seed}, seconds=seconds + seed)
            r["seed"] = r["config"]["calib"]["seed"] = seed
            r["prune"]["phase_seconds"] = {"propagate": [1.0, 1.0, 0.0]}  # a 3-second stack forward
            runs.append(r)
    write(tmp_path, record("dense", "dense", ppl={"wikitext2": 10.0}), *runs)
    written = write_report(tmp_path)
    md = (tmp_path / "summary.md").read_text()
    cost = md.split("Pruning cost of the runs above")[1].split("\n\n")[1].splitlines()
    assert cost[0] == "| Method | 50% |"
    # (10, 11) / 3 and (16, 17) / 3: mean and sample standard deviation over the two seeds
    assert "| Wanda | 3.5 ± 0.2 |" in cost and "| SparseGPT | 5.5 ± 0.2 |" in cost
    plot = [name for name in written if name.startswith("ppl_vs_cost")]
    assert len(plot) == 1 and (tmp_path / plot[0]).read_bytes().startswith(b"\x89PNG")


# ---- the whole procedure against the literal official loops (benchmarks/reference_frontier.py) --------

@pytest.mark.parametrize("text,tolerance", [("admm-wanda:0.5", 1e-4), ("admm:0.5", 1e-4), ("admm:2:4", 1e-4),
                                            ("lunch-wanda:0.5", 1e-3)])
def test_the_engine_equals_the_official_procedure_on_a_tiny_model(text, tolerance):
    import argparse
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from reference_frontier import _agreement, parse_spec, reference_prune

    base, windows = make_model("llama"), _windows()
    args = argparse.Namespace(owl_m=5.0, owl_lambda=0.08, calib="c4", nsamples=4, seqlen=32, seed=0,
                              lunch_batch=2)
    spec = parse_spec(text)
    ref, ours = copy.deepcopy(base), copy.deepcopy(base)
    reference_prune(ref, windows, spec, args)
    prune(ours, None, spec.config(args), windows=windows, progress=False)
    assert min(_agreement(ref.model.layers, ours.model.layers)) == 1.0
    for p, q in zip(ref.model.layers.parameters(), ours.model.layers.parameters()):
        p, q = p.detach(), q.detach()
        assert float((p - q).abs().max()) <= tolerance * float(p.abs().max()), text


def test_the_goal_table_reads_seeds_differences_and_costs(tmp_path):
    from test_report import record, write

    from llmprune.report import load_results
    from llmprune.report.frontier import goal_table

    runs = []
    for method, extra, ppls, seconds in (("sparsegpt", {}, (100.0, 104.0, 96.0), 30.0),
                                         ("wanda", {"reconstruct": "admm"}, (80.0, 82.0, 78.0), 45.0),
                                         ("alps", {}, (85.0, 86.0, 84.0), 90.0),
                                         ("ria", {}, (95.0, 99.0, 91.0), 20.0)):
        for seed, ppl in enumerate(ppls):
            r = record(f"{method}-seed{seed}", method, sparsity=0.6, ppl={"wikitext2": ppl}, seconds=seconds)
            r["seed"] = r["config"]["calib"]["seed"] = seed
            r["config"].update(extra)
            r["prune"]["phase_seconds"] = {"propagate": [5.0, 5.0, 0.0]}  # a 15-second stack forward
            runs.append(r)
    write(tmp_path, *runs)
    rows = {line.split(" | ")[1]: line for line in goal_table(load_results(tmp_path))[2:]}
    assert rows["SparseGPT"].endswith("| - | 1.00× | (the baseline) |")
    assert "| 80.00 ± 2.00 (n=3) | +20.0% | 1.50× | yes |" in rows["Wanda+ADMM"]  # 1 - 80/100; 45/30
    assert rows["ALPS"].endswith("no: over 2x the cost |")  # 15% lower, but 90/30 = 3x
    assert rows["RIA"].endswith("no: < 10% lower, within one std |")  # 95 + 4 > 100 - 4
