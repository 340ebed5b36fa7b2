"""The distance to the dense model (llmprune.evaluation.distance) against float64 brute force on a
tiny model: the exact KL, its percentiles, top-1 agreement, the top-k coarsening from the cache, the
perplexity unchanged bit for bit, and the cache's keys and corruption handling."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from conftest import make_model
from llmprune.errors import LlmpruneError
from llmprune.evaluation.distance import DenseSide, model_fingerprint, topk_kl
from llmprune.evaluation.perplexity import perplexity

SEQLEN, WINDOWS, K = 16, 3, 5


def _tokens(seed=1, n=SEQLEN * WINDOWS + 7):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed))


def _pruned(seed=0):
    model = make_model("llama", seed=seed)
    with torch.no_grad():  # 60% magnitude pruning of every linear weight in the blocks
        for name, p in model.named_parameters():
            if name.startswith("model.layers") and p.dim() == 2:
                p.mul_(p.abs() > p.abs().flatten().kthvalue(int(0.6 * p.numel())).values)
    return model


def _brute(dense, pruned, tokens, k=K):
    """Per-position exact KL, coarsened KL and agreement over the perplexity's positions, float64."""
    data = tokens[: WINDOWS * SEQLEN].view(WINDOWS, SEQLEN)
    with torch.no_grad():
        p = torch.log_softmax(dense(data).logits[:, :-1].double(), -1).reshape(-1, 512)
        q = torch.log_softmax(pruned(data).logits[:, :-1].double(), -1).reshape(-1, 512)
    exact = (p.exp() * (p - q)).sum(-1)
    coarse = []
    for row_p, row_q in zip(p.exp(), q.exp()):  # literally: k bins of the dense top-k, one for the rest
        top = torch.argsort(row_p, descending=True)[:k]
        rest = torch.ones(512, dtype=torch.bool)
        rest[top] = False
        bins_p = torch.cat([row_p[top], row_p[rest].sum()[None]])
        bins_q = torch.cat([row_q[top], row_q[rest].sum()[None]])
        coarse.append((bins_p * (bins_p.log() - bins_q.log())).sum())
    agree = (p.argmax(-1) == q.argmax(-1)).double().mean()
    return exact, torch.stack(coarse), agree.item(), p.exp(), q.exp()


def _peaky(model):
    """A random tiny model's next-token distributions are nearly uniform (KL ~1e-5, where float32 rounding
    is the whole story); a sharper head gives distributions like a trained model's."""
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


@pytest.fixture(scope="module")
def models():
    return _peaky(make_model("llama")), _peaky(_pruned())


def _side(tmp_path, dense, record=False, model=None, k=K):
    return DenseSide(key=model_fingerprint(dense), cache_dir=tmp_path, topk=k, model=model, record=record)


def test_topk_approximation_from_the_cache_matches_brute_force(models, tmp_path):
    dense, pruned = models
    tokens = _tokens()
    recorded = perplexity(dense, tokens, SEQLEN, progress=False, dense=_side(tmp_path, dense, record=True))
    assert recorded.distance is None and list((tmp_path / "kl").iterdir())
    result = perplexity(pruned, tokens, SEQLEN, progress=False, dense=_side(tmp_path, dense)).distance
    exact, coarse, agree, p, _ = _brute(dense, pruned, tokens)
    assert not result.exact and result.positions == WINDOWS * (SEQLEN - 1)
    assert result.kl_mean == pytest.approx(coarse.mean().item(), rel=1e-4)
    for name, q in (("kl_p90", 0.9), ("kl_p99", 0.99), ("kl_p999", 0.999)):
        assert getattr(result, name) == pytest.approx(np.quantile(coarse.numpy(), q), rel=1e-4)
    assert result.top1_agreement == pytest.approx(agree)
    dense_mass = p.sort(-1, descending=True).values[:, :K].sum(-1).mean().item()
    assert result.approx["dense_topk_mass"] == pytest.approx(dense_mass, rel=1e-5)
    assert result.kl_mean <= exact.mean().item() + 1e-7  # the coarsening is a lower bound
    assert result.cache_bytes > 0


def test_exact_kl_matches_brute_force_and_ppl_is_unchanged(models, tmp_path):
    dense, pruned = models
    tokens = _tokens()
    perplexity(dense, tokens, SEQLEN, progress=False, dense=_side(tmp_path, dense, record=True))
    plain = perplexity(pruned, tokens, SEQLEN, progress=False)
    both = perplexity(pruned, tokens, SEQLEN, progress=False, dense=_side(tmp_path, dense, model=dense))
    assert both.ppl == plain.ppl  # bit for bit: the distance only reads the logits
    exact, coarse, agree, _, _ = _brute(dense, pruned, tokens)
    d = both.distance
    assert d.exact
    assert d.kl_mean == pytest.approx(exact.mean().item(), rel=1e-4)
    assert d.kl_p99 == pytest.approx(np.quantile(exact.numpy(), 0.99), rel=1e-4)
    assert d.top1_agreement == pytest.approx(agree)
    assert d.approx["kl_mean"] == pytest.approx(coarse.mean().item(), rel=1e-4)
    # full logits (no chunked head) give the same numbers
    full = perplexity(pruned, tokens, SEQLEN, progress=False, logits_chunk=None,
                      dense=_side(tmp_path, dense, model=dense)).distance
    assert full.kl_mean == pytest.approx(d.kl_mean, rel=1e-5)
    assert full.top1_agreement == d.top1_agreement


def test_distance_to_itself_is_zero_and_full_k_is_exact(models, tmp_path):
    dense, _ = models
    tokens = _tokens()
    side = _side(tmp_path, dense, record=True, k=512)
    perplexity(dense, tokens, SEQLEN, progress=False, dense=side)
    d = perplexity(dense, tokens, SEQLEN, progress=False,
                   dense=_side(tmp_path, dense, model=dense, k=512)).distance
    assert d.kl_mean == pytest.approx(0.0, abs=1e-6) and d.top1_agreement == 1.0
    assert d.approx["kl_mean"] == pytest.approx(0.0, abs=1e-6)  # k = vocabulary: nothing coarsened


def test_topk_kl_handles_a_remaining_mass_of_zero():
    ids = torch.tensor([[0, 1]], dtype=torch.int32)
    lp = torch.tensor([[0.0, float("-inf")]])  # all the dense mass on token 0
    rest = torch.tensor([float("-inf")])
    logq = torch.log_softmax(torch.tensor([[2.0, 0.0, 0.0, 0.0]]), -1)
    kl, mass = topk_kl(ids, lp, rest, logq.clone())
    assert kl.item() == pytest.approx(-logq[0, 0].item(), rel=1e-6)
    assert mass.item() == pytest.approx(logq[0, :2].exp().sum().item(), rel=1e-6)


def test_cache_of_another_setting_is_never_reused(models, tmp_path):
    dense, pruned = models
    tokens = _tokens()
    perplexity(dense, tokens, SEQLEN, progress=False, dense=_side(tmp_path, dense, record=True))
    for kwargs in ({"max_windows": 2}, {"seqlen": SEQLEN // 2}):  # another window set, another seqlen
        seqlen = kwargs.pop("seqlen", SEQLEN)
        with pytest.raises(LlmpruneError, match="no usable dense cache"):
            perplexity(pruned, tokens, seqlen, progress=False, dense=_side(tmp_path, dense), **kwargs)
    with pytest.raises(LlmpruneError, match="no usable dense cache"):  # another token stream (tokenizer)
        perplexity(pruned, _tokens(seed=2), SEQLEN, progress=False, dense=_side(tmp_path, dense))
    with pytest.raises(LlmpruneError, match="no usable dense cache"):  # another dense model
        perplexity(pruned, tokens, SEQLEN, progress=False, dense=_side(tmp_path, make_model("llama", seed=3)))
    with pytest.raises(LlmpruneError, match="no usable dense cache"):  # another k
        perplexity(pruned, tokens, SEQLEN, progress=False, dense=_side(tmp_path, dense, k=K + 1))


def test_corrupt_cache_is_rebuilt_from_the_dense_model_or_refused(models, tmp_path):
    dense, pruned = models
    tokens = _tokens()
    perplexity(dense, tokens, SEQLEN, progress=False, dense=_side(tmp_path, dense, record=True))
    good = perplexity(pruned, tokens, SEQLEN, progress=False, dense=_side(tmp_path, dense)).distance
    (path,) = (tmp_path / "kl").iterdir()
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(LlmpruneError, match="no usable dense cache"):
        perplexity(pruned, tokens, SEQLEN, progress=False, dense=_side(tmp_path, dense))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rebuilt = perplexity(pruned, tokens, SEQLEN, progress=False,
                             dense=DenseSide(key=model_fingerprint(dense), cache_dir=tmp_path, topk=K,
                                             model=dense)).distance
    assert rebuilt.approx["kl_mean"] == pytest.approx(good.kl_mean, rel=1e-6)
    again = perplexity(pruned, tokens, SEQLEN, progress=False, dense=_side(tmp_path, dense)).distance
    assert again.kl_mean == pytest.approx(good.kl_mean, rel=1e-6)  # the rebuilt file is whole


def test_fingerprint_names_the_weights():
    a, b = make_model("llama"), make_model("llama")
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(make_model("llama", seed=1))
    assert model_fingerprint(a) != model_fingerprint(_pruned())
