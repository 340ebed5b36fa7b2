"""Report generation from result JSON files written here: tables, CSV, plots, determinism."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmprune.config import PruneConfig
from llmprune.errors import LlmpruneError
from llmprune.report import write_report
from llmprune.results import DENSE, RESULT_SCHEMA, effective_group_metric

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(name, method, sparsity=0.5, pattern="unstructured", ppl=None, group=None, metric=None, nsamples=32,
           acc=None, seconds=1.5, model="tiny", seqlen=2048):
    """A result in the shared schema, as the runner writes it (group and metric the effective ones)."""
    dense = method == DENSE
    if not dense:
        group, metric = effective_group_metric(
            PruneConfig(method=method, sparsity=None if ":" in pattern else sparsity, pattern=pattern,
                        group=group, metric=metric))
    zeroshot = None
    if acc is not None:
        zeroshot = {"tasks": {t: {"acc": a, "acc_stderr": 0.01} for t, a in acc.items()},
                    "mean_acc": sum(acc.values()) / len(acc)}
    return {
        "schema": RESULT_SCHEMA, "name": name, "model": model, "method": method,
        "sparsity": 0.0 if dense else sparsity, "pattern": pattern, "group": None if dense else group,
        "metric": None if dense else metric, "nsamples": None if dense or method == "magnitude" else nsamples,
        "seed": None if dense or method == "magnitude" else 0,
        "config": None if dense else {"method": method, "sparsity": sparsity, "pattern": pattern,
                                      "calib": {"dataset": "c4", "nsamples": nsamples, "seed": 0}},
        "eval": {"datasets": sorted(ppl or {}), "seqlen": seqlen, "batch_size": 1, "max_windows": None,
                 "zeroshot": sorted(acc or {}), "limit": None},
        "perplexity": {d: {"dataset": d, "ppl": v, "windows": 3, "seqlen": seqlen}
                       for d, v in (ppl or {}).items()},
        "zeroshot": zeroshot,
        "prune": None if dense else {"seconds": seconds, "overall_sparsity": sparsity},
        "prune_seconds": None if dense else seconds,
        "versions": {"llmprune": "0.1.0", "torch": "2.x"}, "machine": "test machine", "recipe": "fixture",
    }


def write(folder: Path, *records) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for r in records:
        (folder / f"{r['name'].replace(':', '_')}.json").write_text(json.dumps(r, indent=2))


def table_after(md: str, heading: str) -> list[str]:
    """The markdown table lines that follow ``heading``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## ") and heading in line)
    table = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return table


@pytest.fixture
def paper(tmp_path):
    folder = tmp_path / "paper"
    write(folder,
          record("dense", "dense", ppl={"ptb": 10.0, "wikitext2": 5.0}, acc={"boolq": 0.70, "rte": 0.60}),
          record("magnitude-unstructured", "magnitude", ppl={"ptb": 40.0, "wikitext2": 17.29},
                 acc={"boolq": 0.5, "rte": 0.5}),
          record("magnitude-2:4", "magnitude", pattern="2:4", ppl={"ptb": 90.5, "wikitext2": 42.13}),
          record("wanda-unstructured", "wanda", ppl={"ptb": 12.345, "wikitext2": 7.26},
                 acc={"boolq": 0.68, "rte": 0.58}),
          record("wanda-4:8", "wanda", pattern="4:8", ppl={"ptb": 14.0, "wikitext2": 8.57}),
          record("wanda-2:4", "wanda", pattern="2:4", ppl={"ptb": 16.0, "wikitext2": 11.53}),
          record("sparsegpt-2:4", "sparsegpt", pattern="2:4",
                 ppl={"ptb": 15.0, "wikitext2": 11.0}, seconds=20.25))
    (folder / "recipe.json").write_text(json.dumps({"schema": "llmprune.recipe/1", "name": "fixture",
                                                    "description": "A fixture table.", "runs": []}))
    (folder / "notes.json").write_text(json.dumps({"not": "a result"}))
    return folder


def test_paper_table_has_methods_as_rows_and_patterns_as_columns(paper):
    written = write_report(paper)
    md = written["summary.md"].read_text()
    assert md.startswith("# Results: fixture\n\nA fixture table.\n")
    assert table_after(md, "Perplexity on ptb: tiny") == [
        "| Method | 50% | 4:8 | 2:4 |",
        "| :--- | ---: | ---: | ---: |",
        "| Dense | 10.00 | 10.00 | 10.00 |",
        "| Magnitude | 40.00 | - | 90.50 |",
        "| SparseGPT | - | - | 15.00 |",
        "| Wanda | 12.35 | 14.00 | 16.00 |",
    ]
    assert "| Wanda | 7.26 | 8.57 | 11.53 |" in table_after(md, "Perplexity on wikitext2: tiny")
    # mean zero-shot accuracy, in percent, and the per-task table
    assert table_after(md, "Mean zero-shot accuracy") == [
        "| Method | 50% |", "| :--- | ---: |", "| Dense | 65.00 |",
        "| Magnitude | 50.00 |", "| Wanda | 63.00 |"]
    assert "| wanda-unstructured | Wanda | 50% | 68.00 | 58.00 | 63.00 |" in md
    # the full per-run table: every run, every setting, prune seconds
    runs = table_after(md, "All runs")
    assert runs[0] == ("| name | model | method | sparsity | pattern | group | metric | nsamples | ppl ptb | "
                       "ppl wikitext2 | mean acc (%) | prune s |")
    assert len(runs) == 2 + 7
    assert "| sparsegpt-2:4 | tiny | sparsegpt | 50% | 2:4 | - | - | 32 | 15.00 | 11.00 | - | 20.2 |" in runs
    assert ("| magnitude-unstructured | tiny | magnitude | 50% | unstructured | layer | weight | - | 40.00 | "
            "17.29 | 50.00 | 1.5 |") in runs
    # sparsity does not vary among unstructured runs: no sparsity plot, but the pattern bars
    assert not any(name.startswith("ppl_vs_sparsity") for name in written)
    assert _is_png(written["ppl_by_pattern_ptb_tiny.png"])
    assert "(ppl_by_pattern_ptb_tiny.png)" in md


def test_csv_has_one_row_per_run(paper):
    rows = list(csv.DictReader(write_report(paper)["summary.csv"].open()))
    assert [r["name"] for r in rows] == ["dense", "magnitude-unstructured", "magnitude-2:4", "sparsegpt-2:4",
                                         "wanda-unstructured", "wanda-4:8", "wanda-2:4"]
    wanda = rows[4]
    assert float(wanda["ppl_ptb"]) == 12.345 and float(wanda["acc_boolq"]) == 0.68
    assert float(wanda["mean_acc"]) == pytest.approx(0.63) and wanda["group"] == "row"
    assert wanda["nsamples"] == "32"
    assert rows[0]["method"] == "dense" and rows[0]["prune_seconds"] == "" and rows[0]["sparsity"] == "0.0"


def test_regenerating_gives_identical_files(paper):
    first = write_report(paper)
    md, csv_text = first["summary.md"].read_bytes(), first["summary.csv"].read_bytes()
    second = write_report(paper)
    assert second["summary.md"].read_bytes() == md and second["summary.csv"].read_bytes() == csv_text
    assert sorted(first) == sorted(second)


def _is_png(path: Path) -> bool:
    import matplotlib.image

    image = matplotlib.image.imread(path)
    return path.read_bytes()[:8] == PNG_MAGIC and image.shape[0] > 100 and image.shape[1] > 100


def test_sparsity_sweep_plot(tmp_path):
    folder = tmp_path / "sweep"
    values = {"magnitude": [11, 15, 60, 900], "wanda": [10.5, 11, 14, 80], "sparsegpt": [10.4, 10.9, 13, 60]}
    write(folder, record("dense", "dense", ppl={"ptb": 10.0}),
          *[record(f"{m}-{int(s * 100)}%", m, sparsity=s, ppl={"ptb": v})
            for m, vs in values.items() for s, v in zip((0.2, 0.4, 0.6, 0.8), vs)])
    written = write_report(folder)
    plot = written["ppl_vs_sparsity_ptb_tiny.png"]
    assert _is_png(plot)
    md = written["summary.md"].read_text()
    assert table_after(md, "Perplexity on ptb")[0] == "| Method | 20% | 40% | 60% | 80% |"
    assert "| Magnitude | 11.00 | 15.00 | 60.00 | 900.00 |" in md
    assert "![Perplexity on ptb: tiny (seqlen 2048)](ppl_vs_sparsity_ptb_tiny.png)" in md


def test_nsamples_ablation_puts_nsamples_on_the_columns_and_plots_log2(tmp_path):
    folder = tmp_path / "nsamples"
    write(folder, record("dense", "dense", ppl={"ptb": 10.0}),
          *[record(f"{m}-n{n}", m, nsamples=n, ppl={"ptb": base + 8 / n})
            for m, base in (("wanda", 12), ("sparsegpt", 11)) for n in (1, 2, 4, 8)])
    written = write_report(folder)
    md = written["summary.md"].read_text()
    assert table_after(md, "Perplexity on ptb")[0] == "| Method / nsamples | 1 | 2 | 4 | 8 |"
    assert "| SparseGPT | 19.00 | 15.00 | 13.00 | 12.00 |" in md
    assert "| Dense | 10.00 | 10.00 | 10.00 | 10.00 |" in md
    assert _is_png(written["ppl_vs_nsamples_ptb_tiny.png"])
    assert "ppl_vs_sparsity_ptb_tiny.png" not in written


def test_group_metric_ablation_table_and_grouped_bars(tmp_path):
    folder = tmp_path / "group"
    ppl = {("row", "weight"): 20.0, ("row", "activation"): 900.0, ("row", "wanda"): 12.0,
           ("layer", "weight"): 40.0, ("layer", "activation"): 800.0, ("layer", "wanda"): 14.0}
    write(folder, record("dense", "dense", ppl={"ptb": 10.0}),
          *[record(f"wanda-{g}-{m}", "wanda", group=g, metric=m,
                   nsamples=None if m == "weight" else 32, ppl={"ptb": v})
            for (g, m), v in ppl.items()])
    written = write_report(folder)
    md = written["summary.md"].read_text()
    assert table_after(md, "Perplexity on ptb") == [
        "| Method / group | row | layer |",  # groups and metrics in the paper's order
        "| :--- | ---: | ---: |",
        "| Dense | 10.00 | 10.00 |",
        "| Wanda (metric=weight) | 20.00 | 40.00 |",
        "| Wanda (metric=activation) | 900.00 | 800.00 |",
        "| Wanda (metric=wanda) | 12.00 | 14.00 |",
    ]
    assert _is_png(written["ppl_by_group_metric_ptb_tiny.png"])


def test_two_models_get_separate_tables_and_plot_names(tmp_path):
    folder = tmp_path / "two"
    write(folder, *[record(f"{model}-{m}-{s}", m, sparsity=s, model=f"org/{model}", ppl={"ptb": 10 + s * 10})
                    for model in ("a", "b") for m in ("wanda", "magnitude") for s in (0.5, 0.7)])
    written = write_report(folder)
    md = written["summary.md"].read_text()
    assert "## Perplexity on ptb: org/a" in md and "## Perplexity on ptb: org/b" in md
    assert {"ppl_vs_sparsity_ptb_a.png", "ppl_vs_sparsity_ptb_b.png"} <= set(written)


def test_prune_json_files_lend_their_embedded_dense_numbers(tmp_path):
    folder = tmp_path / "loose"
    a = record("wanda-2:4", "wanda", pattern="2:4", ppl={"ptb": 16.0})
    b = record("magnitude-2:4", "magnitude", pattern="2:4", ppl={"ptb": 30.0})
    for r in (a, b):  # what `llmprune prune --json` writes
        r["dense"] = {"perplexity": {"ptb": {"dataset": "ptb", "ppl": 10.0}}, "zeroshot": None}
    write(folder, a, b)
    md = write_report(folder)["summary.md"].read_text()
    assert table_after(md, "Perplexity on ptb")[2:] == [
        "| Dense | 10.00 |", "| Magnitude | 30.00 |", "| Wanda | 16.00 |"]
    assert "from 2 result files" in md


def test_empty_folder_is_a_user_error(tmp_path):
    with pytest.raises(LlmpruneError, match="holds no result files"):
        write_report(tmp_path)
    with pytest.raises(LlmpruneError, match="is not a folder"):
        write_report(tmp_path / "missing")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(LlmpruneError, match="broken.json is not valid JSON"):
        write_report(tmp_path)


# Run in a fresh interpreter: torch, transformers and lm_eval cannot be imported, and every attempt
# is recorded (even one a try/except would swallow), so the report is made from JSON alone.
NO_TORCH = """
import sys
BLOCKED = ("torch", "transformers", "lm_eval")
assert not any(name.split(".")[0] in BLOCKED for name in sys.modules)
attempts = []

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ModuleNotFoundError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
from llmprune.cli import main
code = main(["report", sys.argv[1]])
if attempts:
    sys.exit(f"tried to import {sorted(set(attempts))}")
sys.exit(code)
"""


def test_report_imports_no_torch_transformers_or_lm_eval(paper):
    expected = {name: path.read_bytes() for name, path in write_report(paper).items()}
    for name in expected:
        (paper / name).unlink()
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(paper)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # the same bytes as in-process, zero-shot tables (task order) and the pattern plot included
    assert {name: (paper / name).read_bytes() for name in expected} == expected
    assert "ppl_by_pattern_ptb_tiny.png" in expected
    assert "Zero-shot accuracy per task" in expected["summary.md"].decode()
