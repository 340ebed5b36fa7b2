"""The method registry and the three registered methods, end to end on tensors."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from llmprune.config import PruneConfig
from llmprune.errors import LlmpruneError
from llmprune.methods import METHODS, get_method, needs_for
from llmprune.methods.base import Selection, finish
from llmprune.registry import MethodSpec, NoOptions
from llmprune.stats import LayerStats


def prune(method: str, weight, stats=None, **kw):
    return finish(get_method(method).select(weight, stats, PruneConfig(method=method, **kw)))


# ---- registry -----------------------------------------------------------------------------------

def test_registry_holds_the_methods_with_labels_papers_and_docs():
    assert {"magnitude", "wanda", "sparsegpt", "ria", "wanda-sp", "flap", "wanda++", "shortgpt",
            "angular"} <= set(METHODS.names())
    assert get_method("WANDA").name == "wanda"
    for method in METHODS:
        assert method.label and method.paper and method.summary
        # its per-layer function (mask or shrink methods) or its choice of blocks (depth methods)
        function = method.select or method.channel_score or method.structured.choose
        module = __import__(function.__module__, fromlist=["_"])
        assert module.__doc__ and len(module.__doc__) > 100  # the idea, the paper, the formula


def test_duplicate_registration_raises():
    before = METHODS.names()
    with pytest.raises(ValueError, match="already registered"):
        METHODS.add(MethodSpec("wanda", "W", "", "", "", select=lambda w, s, c: None))
    assert METHODS.names() == before


def test_an_option_declared_twice_must_keep_its_default():
    from dataclasses import dataclass

    from llmprune.registry import option

    @dataclass(frozen=True)
    class Clash:
        percdamp: float = option(0.5, "a different default for SparseGPT's option")

    with pytest.raises(ValueError, match="percdamp"):
        METHODS.add(MethodSpec("_clash_test", "C", "", "", "", options=Clash, select=lambda w, s, c: None))
    assert "_clash_test" not in METHODS


def test_new_method_is_one_spec():
    def halve(weight, stats, config):
        mask = torch.zeros_like(weight, dtype=torch.bool)
        return Selection(mask, weight / 2, {})

    try:
        METHODS.add(MethodSpec("_halve_test", "Halve", "nobody", "none", "halves",
                               options=NoOptions, select=halve))
        assert get_method("_halve_test").select is halve
        assert needs_for(PruneConfig(method="_halve_test")) == frozenset()
        new, info = prune("_halve_test", torch.ones(2, 2))
        assert new.eq(0.5).all() and info["pruned"] == 0
    finally:
        METHODS.remove("_halve_test")


def test_unknown_method_lists_known_ones():
    with pytest.raises(LlmpruneError) as err:
        get_method("obs")
    message = str(err.value)
    assert "obs" in message
    for name in ("magnitude", "sparsegpt", "wanda"):
        assert name in message


@pytest.mark.parametrize("kw,needs", [
    (dict(method="magnitude"), set()),
    (dict(method="wanda"), {"norms"}),
    (dict(method="wanda", metric="activation"), {"norms"}),
    (dict(method="wanda", metric="weight"), set()),
    (dict(method="magnitude", metric="wanda"), {"norms"}),
    (dict(method="sparsegpt"), {"hessian"}),
    (dict(method="sparsegpt", pattern="2:4"), {"hessian"}),
])
def test_needs_for(kw, needs):
    assert needs_for(PruneConfig(**kw)) == needs


@pytest.mark.parametrize("kw", [
    dict(method="wanda", use_variant=True, pattern="2:4"),
    dict(method="sparsegpt", group="row"),
    dict(method="sparsegpt", use_variant=True),
    dict(method="sparsegpt", pattern="2:4", blocksize=126),
])
def test_unsupported_combinations_fail_before_calibration(kw):
    with pytest.raises(LlmpruneError):
        PruneConfig(**kw)  # the config refuses itself: no model, no data needed


# ---- magnitude ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_magnitude_prunes_smallest_over_whole_matrix(sparsity):
    w = torch.randn(9, 14, generator=torch.Generator().manual_seed(1))
    new, info = prune("magnitude", w, sparsity=sparsity)
    k = math.floor(Fraction(repr(sparsity)) * w.numel())
    cells = sorted((abs(v), i) for i, v in enumerate(w.flatten().tolist()))
    expect = torch.zeros(w.numel(), dtype=torch.bool)
    expect[[i for _, i in cells[:k]]] = True
    assert torch.equal(new == 0, expect.view_as(w))
    assert torch.equal(new[~expect.view_as(w)], w[~expect.view_as(w)])
    assert info["pruned"] == k and info["group"] == "layer"
    # per-layer, not per-row: row counts differ
    assert len(set((new == 0).sum(1).tolist())) > 1


# ---- wanda --------------------------------------------------------------------------------------

def test_wanda_ranks_within_rows_by_weight_times_norm():
    # ||x|| = (1, 3, 1, 2) over 4 tokens. Row 0: |w|*||x|| = (4, 3, 0.5, 8); row 1 = (20, 30, 10, 40).
    w = torch.tensor([[4.0, -1.0, 0.5, 4.0], [-20.0, 10.0, 10.0, 20.0]])
    stats = LayerStats(tokens=4, sq_norm=torch.tensor([4.0, 36.0, 4.0, 16.0]))
    new, info = prune("wanda", w, stats, sparsity=0.5)
    assert (new == 0).tolist() == [[False, True, True, False], [True, False, True, False]]
    assert info["metric"] == "wanda" and info["group"] == "row"
    # ||x||^2 would give row 0 (4, 9, 0.5, 16) and row 1 (20, 90, 10, 80): a different mask
    squared = w.abs() * torch.tensor([1.0, 9.0, 1.0, 4.0])
    wrong = torch.zeros(2, 4, dtype=torch.bool).scatter_(1, squared.argsort(1)[:, :2], True)
    assert not torch.equal(new == 0, wrong)
    # one threshold over the layer would prune all of row 0 instead
    new_layer, _ = prune("wanda", w, stats, sparsity=0.5, group="layer")
    assert (new_layer == 0).tolist() == [[True, True, True, True], [False, False, False, False]]


def test_wanda_metric_ablation_activation_prunes_the_same_columns_in_every_row():
    w = torch.randn(5, 8)
    stats = LayerStats(tokens=2, sq_norm=torch.arange(1.0, 9.0))
    new, info = prune("wanda", w, stats, sparsity=0.25, metric="activation")
    assert (new[:, :2] == 0).all() and (new[:, 2:] != 0).all()
    assert info["metric"] == "activation"


def test_wanda_with_metric_weight_needs_no_stats():
    w = torch.tensor([[3.0, -1.0, 2.0, -4.0]])
    new, _ = prune("wanda", w, None, sparsity=0.5, metric="weight")
    assert new.tolist() == [[3.0, 0.0, 0.0, -4.0]]


def test_wanda_one_of_four_keeps_one_per_group():
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(2))
    stats = LayerStats(tokens=3, sq_norm=torch.rand(16) + 0.1)
    new, info = prune("wanda", w, stats, pattern="1:4")
    assert ((new != 0).reshape(6, 4, 4).sum(-1) == 1).all()
    assert info["sparsity"] == 0.75


def test_wanda_variant_reaches_target():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(4))
    stats = LayerStats(tokens=10, sq_norm=torch.rand(128) * 10)
    new, info = prune("wanda", w, stats, sparsity=0.5, use_variant=True)
    assert abs((new == 0).float().mean().item() - 0.5) <= 0.001
    assert "alpha" in info


def test_pipeline_validates_options_before_any_calibration(tiny_model, tiny_tokenizer):
    """SparseGPT's blocksize % M used to fire only after block 0 was calibrated."""
    from llmprune.engine import prune as prune_model

    before = [p.detach().clone() for p in tiny_model.parameters()]
    with pytest.raises(LlmpruneError, match="blocksize 126"):  # not the missing calibration file
        config = PruneConfig(method="sparsegpt", pattern="2:4", blocksize=126,  # refused as it is made
                             calib={"dataset": "/nonexistent/calib.jsonl", "nsamples": 2, "seqlen": 16})
        prune_model(tiny_model, tiny_tokenizer, config, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))


# ---- sparsegpt and common behaviour -------------------------------------------------------------

def test_sparsegpt_method_uses_config_pattern():
    x = torch.randn(128, 32, generator=torch.Generator().manual_seed(5))
    stats = LayerStats(tokens=128, hessian=2 * x.T @ x / 128)
    w = torch.randn(8, 32)
    new, info = prune("sparsegpt", w, stats, pattern="2:4", blocksize=16)
    assert ((new != 0).reshape(8, 8, 4).sum(-1) == 2).all()
    assert {"loss", "percdamp_used", "retries", "pruned", "sparsity"} <= set(info)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_zero_sparsity_prunes_nothing(method):
    w = torch.randn(4, 8)
    x = torch.randn(16, 8)
    stats = LayerStats(tokens=16, sq_norm=(x ** 2).sum(0), hessian=2 * x.T @ x / 16)
    new, info = prune(method, w, stats, sparsity=0.0)
    assert torch.equal(new, w) and info["pruned"] == 0
