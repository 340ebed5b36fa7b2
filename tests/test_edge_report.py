"""The edge report (llmprune.report.edge): rows, ratios and the answer to its question, from
hand-made records whose verdicts are worked out by hand."""

from __future__ import annotations

import json

import pytest

from llmprune.errors import LlmpruneError
from llmprune.report import edge
from llmprune.report.readme import render


def _gguf(ppl, mb, decode, ratio):
    speed = [{"threads": t, "prefill_tokens_per_s": 100.0 * t, "decode_tokens_per_s": decode * t,
              "prefill_tokens_per_s_vs_dense_q4_0": 1.0, "decode_tokens_per_s_vs_dense_q4_0": ratio,
              "peak_rss_mib": 300.0} for t in (1, 2)]
    return {"ppl": ppl, "bytes": int(mb * 1e6), "speed": speed}


def _record(name, torch_ppl, ggufs, finished, recovered=False):
    record = {"name": name, "torch_ppl": torch_ppl, "finished": finished,
              "shape": {"blocks": 30, "params": 1000}, "gguf": ggufs}
    if recovered:
        record["recover"] = {}
    return record


@pytest.fixture
def folder(tmp_path):
    records = [
        _record("dense", 20.0, {"f16": _gguf(20.0, 270, 30, 0.5), "q4_0": _gguf(25.0, 90, 60, 1.0)}, 1),
        # faster and smaller, perplexity within 1.3x: wins two axes, loses one (ppl): no domination
        _record("depth-8", 40.0, {"q4_0": _gguf(30.0, 70, 96, 1.6)}, 3),
        # better on all three: dominates, and meets the goal (1.6x at 0.96x ppl)
        _record("magic", 10.0, {"q4_0": _gguf(24.0, 60, 96, 1.6)}, 2, recovered=True),
        # within 1.3x perplexity but only 1.2x faster
        _record("width-20", 22.0, {"q8_0": _gguf(31.0, 100, 72, 1.2)}, 4),
    ]
    for r in records:
        (tmp_path / f"{r['name']}.json").write_text(json.dumps(r))
    return tmp_path


def test_rows_keep_dense_first_then_the_order_made(folder):
    rows, records = edge.load_rows(folder)
    assert [r["name"] for r in records] == ["dense", "magic", "depth-8", "width-20"]
    assert [(r["model"], r["type"]) for r in rows][:2] == [("dense", "f16"), ("dense", "q4_0")]
    assert edge.baseline(rows)["ppl"] == 25.0


def test_the_answer_names_what_dominates_and_what_meets_the_goal(folder):
    rows, _ = edge.load_rows(folder)
    text = "\n".join(edge.answer_lines(rows))
    assert "worse on none: magic q4_0;" in text
    assert "perplexity): magic q4_0, depth-8 q4_0." in text  # depth-8: 30/25 = 1.2 <= 1.3, 1.6x on both


def test_the_nearest_pruned_rows_are_named_when_the_goal_is_missed(tmp_path):
    dense = {"q4_0": _gguf(25.0, 90, 60, 1.0), "q8_0": _gguf(21.0, 140, 50, 0.9)}
    records = [_record("dense", 20.0, dense, 1),
               _record("a", 30.0, {"q4_0": _gguf(30.0, 70, 80, 1.3)}, 2),
               _record("b", 30.0, {"q4_0": _gguf(40.0, 50, 150, 2.5)}, 3)]  # fast but 1.6x ppl
    for r in records:
        (tmp_path / f"{r['name']}.json").write_text(json.dumps(r))
    text = "\n".join(edge.answer_lines(edge.load_rows(tmp_path)[0]))
    assert ("not met; the lowest perplexity of a pruned model is a q4_0 (1.20× the perplexity, 1.30× the "
            "decode speed), the fastest b q4_0 (1.60× the perplexity, 2.50× the decode speed).") in text
    assert "worse on none: no pruned model;" in text  # a is worse in perplexity, b too


def test_parity_and_readme_table(folder, tmp_path):
    rows, records = edge.load_rows(folder)
    assert "| dense | 30 | 1,000 | 20.000 | 20.000 | +0.000% |" in edge.parity_lines(records)
    table = edge.table_lines(rows)
    assert table[3].startswith("| dense | q4_0 | 25.00 | 1.00 | 90.0 | 1.00 |")
    assert render(f"edge {folder.name} table", folder.parent).splitlines() == table
    with pytest.raises(LlmpruneError, match="no result files"):
        edge.load_rows(tmp_path / "empty")


def test_the_table_of_one_gguf_type(folder):
    lines = render(f"edge {folder.name} table q4_0", folder.parent).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| dense", "| magic", "| depth-8"]
    with pytest.raises(LlmpruneError, match="no f32 rows"):
        render(f"edge {folder.name} table f32", folder.parent)
    with pytest.raises(LlmpruneError, match="takes DIR table"):
        render(f"edge {folder.name} answer q4_0", folder.parent)
