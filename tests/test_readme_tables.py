"""The generated regions of the markdown files (``<!-- table: KIND ARGS -->`` ... ``<!-- /table -->``).

Every committed region must equal what ``llmprune.report.readme`` makes now from eval/results and
the registry; when one differs the test prints the diff and the command that rewrites it. The
generator itself is checked on the committed results: its numbers are read here from the JSON
files independently.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmprune.errors import LlmpruneError
from llmprune.methods import ALLOCATIONS, METHODS
from llmprune.registry import OPTION_REGISTRIES
from llmprune.report import readme

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "eval" / "results"


def marked_files() -> list[Path]:
    files = sorted(ROOT.glob("*.md")) + sorted((ROOT / "docs").glob("**/*.md")) + sorted(RESULTS.glob("*.md"))
    return [f for f in files if readme.markers(f.read_text(encoding="utf-8"))]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_some_file_has_generated_tables():
    assert marked_files(), "no markdown file has a <!-- table: KIND --> region: the check below is empty"


@pytest.mark.parametrize("path", marked_files(), ids=_rel)
def test_generated_tables_are_up_to_date(path):
    try:
        diff = readme.diff(path)
    except LlmpruneError as exc:
        pytest.fail(str(exc), pytrace=False)
    if diff:
        pytest.fail(f"{_rel(path)}: a generated table differs from eval/results and the registry; rewrite it "
                    f"with\n\n    {readme.COMMAND} {_rel(path)}\n\n{diff}", pytrace=False)


def _row(lines: list[str], first_cell: str) -> list[str]:
    """The cells of the table row whose first cell is ``first_cell``."""
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in\n" + "\n".join(lines))


def _json(name: str) -> dict:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def _rows(name: str) -> dict[str, dict]:
    return {row["method"]: row for row in _json(name)["rows"]}


# ---------------------------------------------------------------------------------------------
# methods


def test_methods_table_has_every_builtin_spec_and_only_those():
    lines = readme.methods_table([], ROOT)
    names = [line.split(" | ")[0].strip("| ") for line in lines[2:]]
    # a switch registry's bare flag picks its first spec (--reconstruct is --reconstruct obs)
    expected = [f"`{r.flag}` ({s.name})" if r.flag_is_switch and s.name == r.names()[0]
                else f"`{r.flag} {s.name}`" for r in OPTION_REGISTRIES for s in r if readme.builtin(s)]
    assert names == expected
    assert len(names) >= len(METHODS) - 1 and "`--refine dsnot`" in names and "`--reconstruct` (obs)" in names
    for name in ("wanda", "sparsegpt", "magnitude", "ria", "flap", "wanda-sp", "wanda++"):  # a spot check
        assert f"`--method {name}`" in names


def test_every_spec_names_authors_year_title_and_venue():
    for registry in OPTION_REGISTRIES:
        for spec in registry:
            if not readme.builtin(spec):
                continue
            assert spec.code, spec.name
            if spec.paper.startswith("none"):
                assert registry is ALLOCATIONS, f"{spec.name}: only the baseline allocations cite no paper"
                continue
            match = readme.PAPER.fullmatch(spec.paper)
            assert match, f"{spec.name}: paper {spec.paper!r} is not 'Authors YEAR, \"Title\", Venue'"
            assert match["authors"] and match["title"] and match["venue"]


def test_methods_agreement_is_read_from_the_parity_files():
    lines = readme.methods_table([], ROOT)
    protocol, frontier, y2023 = (_rows("reference_protocol.json"), _rows("reference_frontier.json"),
                                 _rows("reference_frontier_2023.json"))
    pct = lambda rel: f"{rel * 100:+.2f}%"  # noqa: E731
    magnitude = _row(lines, "`--method magnitude`")[-1]
    assert f"{pct(protocol['magnitude']['rel_diff'])} (PTB, `reference_protocol.json`)" in magnitude
    wanda = _row(lines, "`--method wanda`")[-1]
    assert f"{pct(protocol['wanda']['rel_diff'])} (PTB, `reference_protocol.json`)" in wanda
    assert f"{pct(y2023['wanda:0.5']['rel_diff'])} (PTB, `reference_frontier_2023.json`)" in wanda
    sparsegpt = _row(lines, "`--method sparsegpt`")[-1]
    assert f"{pct(y2023['sparsegpt:0.5']['rel_diff'])} (PTB, `reference_frontier_2023.json`)" in sparsegpt
    assert f"{pct(frontier['ria:0.5']['rel_diff'])}" in _row(lines, "`--method ria`")[-1]
    owl, dsnot = _row(lines, "`--allocation owl`")[-1], _row(lines, "`--refine dsnot`")[-1]
    assert f"OWL-Wanda: {pct(frontier['owl-wanda:0.5']['rel_diff'])}" in owl
    assert f"Wanda+DSnoT: {pct(frontier['dsnot-wanda:0.5']['rel_diff'])}" in dsnot
    for unmeasured in ("`--method wanda++`", "`--method flap`", "`--method wanda-sp`",
                       "`--allocation depth`"):
        assert _row(lines, unmeasured)[-1] == "not measured"
    # 50% unstructured only: not the 70% or 2:4 rows of the same files
    assert pct(frontier["owl-wanda:0.7"]["rel_diff"]) not in owl
    assert pct(frontier["ria:2:4"]["rel_diff"]) not in _row(lines, "`--method ria`")[-1]


def test_row_keys_map_to_registered_names():
    assert readme.parse_key("owl-wanda:0.7", None) == ("wanda", ("owl",), 0.7, None)
    assert readme.parse_key("dsnot-wanda:0.5", None) == ("wanda", ("dsnot",), 0.5, None)
    assert readme.parse_key("ria:2:4", None) == ("ria", (), 0.5, "2:4")
    assert readme.parse_key("wanda-sp:0.3", None) == ("wanda-sp", (), 0.3, None)
    assert readme.parse_key("sparsegpt", 0.5) == ("sparsegpt", (), 0.5, None)
    assert readme.parse_key("dense", 0.5)[0] == "dense"
    assert readme.parse_key("nosuch-method:0.5", None)[0] is None


# ---------------------------------------------------------------------------------------------
# parity, recipe, frontier, demo


def test_parity_table_numbers_equal_the_json():
    lines = readme.parity_table([], ROOT)
    protocol = [line for line in lines if "`reference_protocol.json`" in line]
    rows = _json("reference_protocol.json")["rows"]
    assert len(protocol) == len(rows)
    wanda = next(r for r in rows if r["method"] == "wanda")
    cells = _row(protocol, "Wanda 50%")
    assert cells[1:6] == [f"{wanda['reference_ppl']:.2f}", f"{wanda['llmprune_ppl']:.2f}",
                          f"{wanda['rel_diff'] * 100:+.2f}%", f"{wanda['mask_agreement'] * 100:.2f}%",
                          "PTB, 16"]
    frontier = [line for line in lines if "`reference_frontier.json`" in line]
    owl = _rows("reference_frontier.json")["owl-wanda:0.7"]
    cells = _row(frontier, "OWL-Wanda 70%")
    assert cells[1:5] == [f"{owl['reference_ppl']:.2f}", f"{owl['llmprune_ppl']:.2f}",
                          f"{owl['rel_diff'] * 100:+.2f}%", f"{owl['mask_agreement_min'] * 100:.2f}%"]
    assert _row(lines, "dense (evaluator only)")[4] == "-"
    assert not any("reference_frontier_noise.json" in line for line in lines)  # no reference in it
    only = readme.parity_table(["reference_frontier_2023.json"], ROOT)
    assert len(only) == 2 + len(_json("reference_frontier_2023.json")["rows"])


@pytest.mark.parametrize("folder,dataset", [("frontier_2023_ptb", "ptb"), ("wandapp_smollm2", "wikitext2"),
                                            ("smollm2_cpu", "ptb"), ("frontier_smollm2", "wikitext2")])
def test_recipe_table_is_the_one_in_the_folders_summary(folder, dataset):
    table = readme.recipe_table([f"eval/results/{folder}", dataset], ROOT)
    summary = (RESULTS / folder / "summary.md").read_text(encoding="utf-8")
    assert "\n".join(table) in summary, f"{folder}: the table differs from summary.md (run llmprune report)"


def test_recipe_and_frontier_cells_equal_the_result_files():
    lines = readme.render("frontier").splitlines()
    assert lines == readme.recipe_table(["eval/results/frontier_smollm2", "wikitext2"], ROOT, cost=True)
    table = lines[:lines.index("")]
    header = [c.strip() for c in table[0].strip("|").split("|")]

    def ppl(name):
        record = json.loads((RESULTS / "frontier_smollm2" / f"{name}.json").read_text(encoding="utf-8"))
        return record["perplexity"]["wikitext2"]["ppl"]

    values = [ppl(f"sparsegpt-60-seed{seed}") for seed in (0, 1, 2)]  # a cell of three seeds
    cell = f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
    assert _row(table, "SparseGPT")[header.index("60%")].split(" (n=")[0] == cell  # (n=3) when cells differ
    assert _row(table, "Dense")[header.index("60%")] == f"{ppl('dense'):.2f}"
    cost = lines[lines.index(readme.COST_LINE) + 2:]
    assert cost[0].startswith("| Method |") and _row(cost, "SparseGPT")[header.index("60%")].count("±") == 1


def test_demo_line_from_its_json(tmp_path):
    (tmp_path / "eval" / "results").mkdir(parents=True)
    assert "not measured yet" in readme.render("demo", tmp_path)
    (tmp_path / "eval" / "results" / "demo_smollm2.json").write_text(json.dumps({
        "command": "make demo",
        "args": ["prune", "--method", "wanda", "--sparsity", "0.5", "--seqlen", "2048",
                 "--max-windows", "16"],
        "peak_rss_mib": 1012.3, "wall_s": 130.25, "prune_s": 46.14, "load_before": 0.3, "load_after": 1.2,
        "cpus": 2, "perplexity": {"wikitext2": 45.891}, "dense_perplexity": {"wikitext2": 20.712}}))
    line = readme.render("demo", tmp_path)
    for text in ("20.71 dense, 45.89 after Wanda 50%", "first 16 windows of 2048", "pruning 46.1 s",
                 "130.2 s", "1012 MiB"):
        assert text in line


# ---------------------------------------------------------------------------------------------
# the markers


PAGE = textwrap.dedent("""\
    # A page

    Text before.
    <!-- table: parity reference_frontier_2023.json -->
    | stale | table |
    <!-- /table -->
    Text between.

    <!-- table: recipe eval/results/wandapp_smollm2 -->
    <!-- /table -->
    Text after.

    ```text
    <!-- table: methods -->
    shown as an example, never filled
    <!-- /table -->
    ```
    """)


def test_marker_round_trip_keeps_the_text_around(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    assert readme.diff(page)
    assert readme.update(page)
    text = page.read_text()
    assert "stale" not in text
    assert text.startswith("# A page\n\nText before.\n<!-- table: parity reference_frontier_2023.json -->\n"
                           "| method |")
    assert ("\n<!-- /table -->\nText between.\n\n<!-- table: recipe eval/results/wandapp_smollm2 -->\n"
            "| Method |") in text
    assert text.endswith("<!-- /table -->\nText after.\n\n```text\n<!-- table: methods -->\n"
                         "shown as an example, never filled\n<!-- /table -->\n```\n")
    assert "\n".join(readme.recipe_table(["eval/results/wandapp_smollm2"], ROOT)) in text
    assert not readme.update(page) and not readme.diff(page)  # a second run changes nothing
    assert readme.main([str(page), "--check"]) == 0


def test_check_prints_the_diff_and_the_fix(tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    assert readme.main([str(page), "--check"]) == 1
    out, err = capsys.readouterr()
    assert "-| stale | table |" in out and "+| method |" in out
    assert f"{readme.COMMAND} {page}" in err
    assert page.read_text() == PAGE  # --check writes nothing


@pytest.mark.parametrize("text,message", [
    ("<!-- table: methods -->\nno end\n", "has no `<!-- /table -->`"),
    ("<!-- /table -->\n", "without a `<!-- table: KIND -->`"),
    ("<!-- table: methods -->\n<!-- table: parity -->\n<!-- /table -->\n", "is not closed"),
    ("x\n<!-- table: nosuch -->\n<!-- /table -->\n", ":2: unknown table 'nosuch'"),
    ("<!-- table: recipe eval/results/wandapp_smollm2 ptb -->\n<!-- /table -->\n",
     "0 perplexity tables match"),
    ("<!-- table: parity nosuch.json -->\n<!-- /table -->\n", "no such results file"),
])
def test_bad_markers_are_one_clear_error(text, message):
    with pytest.raises(LlmpruneError, match=re.escape(message)):
        readme.fill(text, ROOT, "page.md")


def test_the_command_rewrites_in_place_without_torch(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- table: methods -->\n<!-- /table -->\n<!-- table: frontier -->\n<!-- /table -->\n")
    code = ("import sys\n"
            "for name in ('torch', 'transformers', 'lm_eval'):\n"
            "    sys.modules[name] = None\n"
            "from llmprune.report.readme import main\n"
            f"sys.exit(main([{str(page)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "rewritten" in done.stdout
    assert "`--method wanda`" in page.read_text() and "| SparseGPT |" in page.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.md"]  # no temporary left beside it
