"""The "what perplexity hides" report: measures read from records, rank correlations by hand."""

from __future__ import annotations

import json
import math

import pytest

from llmprune.errors import LlmpruneError
from llmprune.report import hides
from llmprune.results import RESULT_SCHEMA


def test_spearman_matches_the_textbook_formula_without_ties():
    x, y = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 1.0, 4.0, 3.0, 5.0]
    d2 = sum((a - b) ** 2 for a, b in zip(hides.ranks(x), hides.ranks(y)))  # 1+1+1+1+0
    n = len(x)
    assert hides.spearman(x, y) == pytest.approx(1 - 6 * d2 / (n * (n * n - 1)))  # 0.8
    assert hides.spearman(x, [-v for v in x]) == pytest.approx(-1.0)
    assert hides.spearman([1.0, 2.0], [1.0, 2.0]) is None  # too few points
    assert hides.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None  # constant side


def test_ties_share_their_mean_rank_and_pearson_of_ranks():
    assert hides.ranks([10.0, 20.0, 20.0, 5.0]) == [2.0, 3.5, 3.5, 1.0]
    x, y = [1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0]
    rx, ry = [1.0, 2.5, 2.5, 4.0], [1.0, 3.0, 2.0, 4.0]
    mx, my = sum(rx) / 4, sum(ry) / 4
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    want = num / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert hides.spearman(x, y) == pytest.approx(want)


def test_discordant_pairs_counted_by_hand():
    # pairs (0,1) agree, (0,2) agree, (1,2) disagree: 1 of 3
    assert hides.discordant([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == pytest.approx(1 / 3)
    assert hides.discordant([1.0, 1.0], [1.0, 2.0]) is None  # the only pair is tied


def _record(name, method, ppl, sparsity=0.5, pattern="unstructured", kl=None, top1=None, tasks=None,
            gen=None):
    perplexity = {"wikitext2": {"ppl": ppl}}
    if kl is not None:
        perplexity["wikitext2"]["distance"] = {"kl_mean": kl, "kl_p99": 10 * kl, "top1_agreement": top1}
    record = {"schema": RESULT_SCHEMA, "name": name, "model": "m", "method": method, "sparsity": sparsity,
              "pattern": pattern, "perplexity": perplexity, "zeroshot": None}
    if tasks is not None:
        record["zeroshot"] = {"kind": "zeroshot", "tasks": tasks}
    if gen is not None:
        record["generation"] = {"agreement": gen}
    return record


def _write(folder, records):
    for r in records:
        (folder / f"{r['name']}.json").write_text(json.dumps(r))


def test_report_reads_every_measure_and_orients_them(tmp_path):
    tasks = lambda a, b, lam: {"boolq": {"acc": a}, "rte": {"acc": b},  # noqa: E731
                               "lambada_openai": {"acc": lam, "ppl": 1 / lam}}
    _write(tmp_path, [
        _record("dense", "dense", 10.0, sparsity=0.0),
        _record("a-50", "a", 20.0, kl=0.2, top1=0.8, tasks=tasks(0.6, 0.5, 0.4), gen=0.5),
        _record("b-50", "b", 30.0, kl=0.1, top1=0.9, tasks=tasks(0.7, 0.6, 0.5), gen=0.6),
        _record("c-50", "c", 40.0, kl=0.3, top1=0.7, tasks=tasks(0.5, 0.4, 0.3), gen=0.4),
    ])
    rows, dense = hides.load_rows(tmp_path, "wikitext2")
    assert dense["name"] == "dense"
    by = {r.method: r.values for r in rows}
    assert by["a"]["ppl_ratio"] == pytest.approx(2.0)
    assert by["b"]["zeroshot"] == pytest.approx(0.65)  # lambada is not in the multiple-choice mean
    assert by["b"]["lambada_acc"] == pytest.approx(0.5) and by["b"]["lambada_ppl"] == pytest.approx(2.0)
    corr = hides.correlations(rows)["all"]
    # ppl ranks a < b < c; KL ranks b < a < c: one swap of three -> rho 0.5, 1/3 discordant
    assert corr["kl_mean"][0] == pytest.approx(0.5) and corr["kl_mean"][1] == pytest.approx(1 / 3)
    # top-1 is better when higher: oriented, it ranks like KL
    assert corr["top1"][0] == pytest.approx(0.5)
    assert corr["zeroshot"][0] == pytest.approx(0.5) and corr["generation"][0] == pytest.approx(0.5)
    out = hides.write_hides(tmp_path)
    text = out["markdown"].read_text()
    assert "| 50% | a | 2.00 | 0.200 |" in text
    assert "+0.50 (33%, n=3)" in text
    if "plot" in out:
        assert out["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_settings_are_correlated_apart(tmp_path):
    _write(tmp_path, [
        _record("dense", "dense", 10.0, sparsity=0.0),
        _record("a-50", "a", 20.0, kl=0.1, top1=0.9), _record("b-50", "b", 30.0, kl=0.2, top1=0.8),
        _record("c-50", "c", 40.0, kl=0.3, top1=0.7),
        _record("a-2_4", "a", 50.0, pattern="2:4", kl=0.9, top1=0.5),
        _record("b-2_4", "b", 60.0, pattern="2:4", kl=0.8, top1=0.6),
        _record("c-2_4", "c", 70.0, pattern="2:4", kl=0.7, top1=0.7),
    ])
    rows, _ = hides.load_rows(tmp_path, "wikitext2")
    corr = hides.correlations(rows)
    assert corr["50%"]["kl_mean"][0] == pytest.approx(1.0)
    assert corr["2:4"]["kl_mean"][0] == pytest.approx(-1.0)
    assert {r.method for r in rows} == {"a", "b", "c"}


def test_bad_folders_are_one_clear_error(tmp_path):
    with pytest.raises(LlmpruneError, match="does not exist"):
        hides.load_rows(tmp_path / "missing", "wikitext2")
    _write(tmp_path, [_record("dense", "dense", 10.0, sparsity=0.0)])
    with pytest.raises(LlmpruneError, match="no pruned run"):
        hides.load_rows(tmp_path, "wikitext2")
    assert hides.main([str(tmp_path / "missing")]) == 2
