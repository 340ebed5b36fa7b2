"""Generated regions of markdown files: tables from ``eval/results`` and the registry.

A region is two HTML comments around generated text::

    <!-- table: KIND ARGS -->
    | ... the table, rewritten by the generator ... |
    <!-- /table -->

Kinds (:data:`KINDS`):

* ``methods``: one row per built-in method, allocation, refiner and reconstruction (asked from the
  registry): its flag, what it does, its paper, its official code, and how far llmprune's perplexity
  is from the official procedure's at 50% sparsity in the ``eval/results/reference_*.json`` files
  (or "not measured").
* ``recipe DIR [DATASET]``: the perplexity table of a results folder (``DIR`` relative to the
  repository root), exactly as ``llmprune report`` writes it into that folder's ``summary.md``.
* ``parity [FILE...]``: llmprune against the literal re-implementations of the official codes, one
  row per measured method and setting, from ``eval/results/reference_*.json`` (or the files named).
* ``frontier``: the frontier table, ``recipe eval/results/frontier_smollm2 wikitext2`` and its costs.
* ``frontier_goal``: every row of the frontier table against SparseGPT at 60%, 70% and 2:4.
* ``demo [FILE]``: one sentence on ``make demo`` as measured by ``benchmarks/demo_memory.py --json``
  (``eval/results/demo_smollm2.json``): perplexity dense and pruned, time, peak memory.
* ``protocol [FILE]``: the full WikiText-2 protocol on SmolLM2, llmprune's perplexity beside the
  reference loop's (``benchmarks/full_protocol.py --json``, ``eval/results/full_protocol_wikitext2.json``).
* ``kl [FILE]``: the cost and the error of the KL's top-k approximation, from
  ``benchmarks/kl_cost.py --json`` (``eval/results/kl_smollm2.json``).
* ``hides DIR DATASET runs|correlations``: the "what perplexity hides" tables of a results folder
  (:mod:`llmprune.report.hides`).
* ``edge DIR table [TYPE]|answer|parity``: the edge benchmark's tables of a results folder
  (``benchmarks/edge.py``, :mod:`llmprune.report.edge`).

``python -m llmprune.report.readme FILE...`` rewrites the regions of each file in place
(atomically); ``--check`` only says which files differ (exit 1). ``tests/test_readme_tables.py``
fails whenever a committed file's region differs from what this module makes now. No torch,
transformers or lm-eval import on this path.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from llmprune.errors import LlmpruneError
from llmprune.io import write_text_atomic
from llmprune.methods import ALLOCATIONS, BLOCK_STEPS, METHODS, RECONSTRUCTIONS, REFINERS
from llmprune.registry import OPTION_REGISTRIES
from llmprune.report import COST_LINE, edge, hides, load_results
from llmprune.report.frontier import goal_table
from llmprune.report.tables import pivot, ppl_scopes, scope_title
from llmprune.results import DENSE, MISSING, percent

ROOT = Path(__file__).resolve().parents[2]  # the checkout: eval/results lives beside llmprune/
RESULTS = Path("eval") / "results"
# the parity files: literal re-implementations of the official procedures against llmprune, in this
# order (the Wanda/SparseGPT protocol first, then the newer methods' frontier)
DATASET_NAMES = {"ptb": "PTB", "wikitext2": "WikiText-2", "c4": "C4"}
PARITY_GLOBS = ("reference_protocol*.json", "reference_frontier*.json")
FRONTIER_DIR = "eval/results/frontier_smollm2"
DEMO_FILE = "demo_smollm2.json"  # benchmarks/demo_memory.py --json
START = re.compile(r"<!-- table: *(?P<spec>[^>]*?) *-->")
END = "<!-- /table -->"
COMMAND = "python -m llmprune.report.readme"


# ---------------------------------------------------------------------------------------------
# the measured agreement with the official codes (eval/results/reference_*.json)


@dataclass(frozen=True)
class Measured:
    """One row of a parity file: llmprune and the literal reference on the same model and data."""

    file: str  # the file's name inside eval/results
    key: str  # the row's method key as the file writes it ("owl-wanda:0.5", "wanda:2:4", "dense")
    method: str | None  # the registered method (DENSE for the evaluator-only row, None if unknown)
    steps: tuple[str, ...]  # registered allocation / refiner / reconstruction names in the key
    sparsity: float | None
    pattern: str | None  # "2:4", or None for unstructured
    reference_ppl: float
    llmprune_ppl: float
    rel_diff: float
    mask_min: float | None  # the lowest per-layer agreement of the whole-model masks
    windows: int | None  # evaluation windows (None: the whole test set)
    dataset: str  # the evaluation data set (the parity files before WikiText-2 used PTB)
    calib_batch: int | None

    @property
    def label(self) -> str:
        if self.method == DENSE:
            return "dense (evaluator only)"
        if self.method is None:
            return self.key
        prefix = "".join(ALLOCATIONS.get(s).prefix for s in self.steps if s in ALLOCATIONS)
        suffix = "".join(next(r for r in _step_registries()[1:] if s in r).get(s).suffix
                         for s in self.steps if s not in ALLOCATIONS)
        return f"{prefix}{METHODS.get(self.method).label}{suffix} {self.setting}"

    @property
    def setting(self) -> str:
        if self.pattern:
            return self.pattern
        return percent(self.sparsity) if self.sparsity is not None else MISSING

    @property
    def unstructured_half(self) -> bool:
        return self.pattern is None and self.sparsity is not None and math.isclose(self.sparsity, 0.5)


def _step_registries():
    return (ALLOCATIONS, REFINERS, RECONSTRUCTIONS, BLOCK_STEPS)


def parse_key(key: str, default_sparsity: float | None) -> tuple[str | None, tuple[str, ...], float | None,
                                                                 str | None]:
    """``[step-]...method[:sparsity|:N:M]`` -> (method, steps, sparsity, pattern), names from the
    registry: ``owl-wanda:0.7`` -> ("wanda", ("owl",), 0.7, None); unknown names give method None."""
    name, _, setting = key.strip().lower().partition(":")
    sparsity, pattern = default_sparsity, None
    if ":" in setting:
        pattern = setting
        n, m = (int(x) for x in setting.split(":"))
        sparsity = 1 - n / m
    elif setting:
        sparsity = float(setting)
    if name == DENSE:
        return DENSE, (), None, None
    steps: list[str] = []
    while name not in METHODS:
        head, sep, rest = name.partition("-")
        if not sep or not any(head in registry for registry in _step_registries()):
            return None, tuple(steps), sparsity, pattern
        steps.append(head)
        name = rest
    return name, tuple(steps), sparsity, pattern


def _measured_row(file: str, args: dict, row: dict) -> Measured | None:
    if not all(isinstance(row.get(k), (int, float)) for k in ("reference_ppl", "llmprune_ppl", "rel_diff")):
        return None  # a noise-floor row: llmprune against itself, no reference
    method, steps, sparsity, pattern = parse_key(str(row["method"]), args.get("sparsity"))
    mask = row.get("mask_agreement_min", row.get("mask_agreement"))
    return Measured(file=file, key=str(row["method"]), method=method, steps=steps, sparsity=sparsity,
                    pattern=pattern, reference_ppl=float(row["reference_ppl"]),
                    llmprune_ppl=float(row["llmprune_ppl"]), rel_diff=float(row["rel_diff"]),
                    mask_min=None if mask is None else float(mask), windows=args.get("max_windows"),
                    dataset=str(args.get("eval") or "ptb"),
                    calib_batch=row.get("llmprune_calib_batch"))


def parity_files(root: Path = ROOT, names: Iterable[str] = ()) -> list[Path]:
    """The parity files: ``names`` inside eval/results, or every ``reference_*.json`` there."""
    folder = root / RESULTS
    if names:
        paths = [folder / n for n in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise LlmpruneError(f"parity: no such results file: {', '.join(missing)}")
        return paths
    seen: list[Path] = []
    for pattern in PARITY_GLOBS:
        seen += [p for p in sorted(folder.glob(pattern)) if p not in seen]
    return seen


def measured(root: Path = ROOT, names: Iterable[str] = ()) -> list[Measured]:
    """Every row with a reference perplexity in the parity files, in file order."""
    rows: list[Measured] = []
    for path in parity_files(root, names):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LlmpruneError(f"parity: {path} is not readable JSON ({exc})") from None
        args = data.get("args") or {}
        for row in data.get("rows") or []:
            parsed = _measured_row(path.name, args, row)
            if parsed is not None:
                rows.append(parsed)
    return rows


# ---------------------------------------------------------------------------------------------
# formatting


def _cell(text: str) -> str:
    return text.replace("\n", " ").replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    rule = ["---:" if a == "r" else ":---" for a in align]
    return (["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
            + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows])


def diff_percent(rel: float) -> str:
    """``0.00192`` -> ``"+0.19%"``, ``-0.012`` -> ``"-1.20%"``."""
    return f"{rel * 100:+.2f}%"


def agreement_percent(fraction: float | None) -> str:
    return MISSING if fraction is None else f"{fraction * 100:.2f}%"


def ppl(value: float) -> str:
    return f"{value:.2f}"


def _code_link(code: str) -> str:
    """``owner/repo (detail)`` -> a link to the repository; anything else as written."""
    match = re.fullmatch(r"([\w.-]+/[\w.-]+)(.*)", code.strip())
    if not match:
        return code or "none"
    return f"[{match.group(1)}](https://github.com/{match.group(1)}){match.group(2)}"


PAPER = re.compile(r'(?P<authors>.+?) (?P<year>(19|20)\d\d), "(?P<title>[^"]+)", (?P<venue>.+)')


def short_paper(paper: str) -> str:
    """The spec's paper string with more than three authors shortened to "First et al."."""
    match = PAPER.fullmatch(paper.strip())
    if not match:
        return paper or "none"
    names = [n for n in re.split(r", | & ", match.group("authors")) if n]
    authors = match.group("authors") if len(names) <= 3 else f"{names[0]} et al."
    return f'{authors} {match.group("year")}, "{match.group("title")}", {match.group("venue")}'


# ---------------------------------------------------------------------------------------------
# the kinds


def builtin(spec: Any) -> bool:
    """A spec of llmprune itself, not of an installed plugin (the table must not depend on them)."""
    functions = [getattr(spec, a, None) for a in ("select", "channel_score", "run")]
    functions.append(getattr(getattr(spec, "structured", None), "choose", None))  # depth methods
    modules = [f.__module__ for f in functions if callable(f)]
    return bool(modules) and modules[0].startswith("llmprune.")


def _selector(registry, spec) -> str:
    flag = registry.flag
    alone = registry.flag_is_switch and spec.name == registry.names()[0]  # the bare flag picks it
    return f"`{flag}` ({spec.name})" if alone else f"`{flag} {spec.name}`"


def _agreement(registry, spec, rows: list[Measured]) -> str:
    if registry is METHODS:
        found = [r for r in rows if r.method == spec.name and not r.steps and r.unstructured_half]
        cells = [f"{diff_percent(r.rel_diff)} ({_data(r)}, `{r.file}`)" for r in found]
    else:
        found = [r for r in rows if spec.name in r.steps and r.unstructured_half]
        cells = [f"{r.label.rsplit(' ', 1)[0]}: {diff_percent(r.rel_diff)} ({_data(r)}, `{r.file}`)"
                 for r in found]
    return "; ".join(cells) if cells else "not measured"


def _data(r: Measured) -> str:
    return DATASET_NAMES.get(r.dataset, r.dataset)


def methods_table(args: list[str], root: Path) -> list[str]:
    """One row per built-in method, allocation, refiner and reconstruction."""
    if args:
        raise LlmpruneError(f"table methods takes no arguments, got {' '.join(args)!r}")
    rows = measured(root)
    body = []
    for registry in OPTION_REGISTRIES:
        for spec in registry:
            if builtin(spec):
                body.append([_selector(registry, spec), spec.summary, short_paper(spec.paper),
                             _code_link(spec.code), _agreement(registry, spec, rows)])
    header = ["name", "what it does", "paper", "official code",
              "agreement with the official code (perplexity difference at 50%: data set, eval/results file)"]
    return _table(header, body, "lllll")


def recipe_table(args: list[str], root: Path, cost: bool = False) -> list[str]:
    """The perplexity table of a results folder, as ``llmprune report`` writes it in summary.md
    (``cost``: with the pruning-cost table that follows it there)."""
    if not 1 <= len(args) <= 2:
        raise LlmpruneError("table recipe takes DIR [DATASET], e.g. `recipe eval/results/smollm2_cpu ptb`")
    folder = root / args[0]
    scopes = ppl_scopes(load_results(folder))
    if len(args) == 2:
        scopes = {scope: rows for scope, rows in scopes.items() if scope[1] == args[1]}
    if len(scopes) != 1:
        titles = "; ".join(scope_title(*s) for s in ppl_scopes(load_results(folder))) or "none"
        raise LlmpruneError(f"table recipe {' '.join(args)}: {len(scopes)} perplexity tables match, "
                            f"name the dataset (the folder has: {titles})")
    (scope, rows), = scopes.items()
    table = pivot(rows, lambda r, d=scope[1]: r.ppl.get(d))
    if cost and any(r.cost is not None for r in rows):
        table += ["", COST_LINE, ""] + pivot([r for r in rows if not r.dense], lambda r: r.cost, digits=1)
    return table


def parity_table(args: list[str], root: Path) -> list[str]:
    """llmprune against the literal reference procedures, row by row of the parity files."""
    body = []
    for r in measured(root, args):
        windows = f"{_data(r)}, {'all' if r.windows is None else r.windows}"
        body.append([r.label, ppl(r.reference_ppl), ppl(r.llmprune_ppl), diff_percent(r.rel_diff),
                     agreement_percent(r.mask_min), windows,
                     MISSING if r.calib_batch is None else str(r.calib_batch), f"`{r.file}`"])
    header = ["method", "reference ppl", "llmprune ppl", "difference", "lowest per-layer mask agreement",
              "evaluation windows", "llmprune calibration batch", "eval/results file"]
    return _table(header, body, "lrrrrrrl")


def frontier_table(args: list[str], root: Path) -> list[str]:
    """The frontier recipe's WikiText-2 table and its pruning costs (eval/results/frontier_smollm2)."""
    if args:
        raise LlmpruneError(f"table frontier takes no arguments, got {' '.join(args)!r}")
    return recipe_table([FRONTIER_DIR, "wikitext2"], root, cost=True)


def frontier_goal_table(args: list[str], root: Path) -> list[str]:
    """The frontier's goal, row by row against SparseGPT (``llmprune.report.frontier``)."""
    if args:
        raise LlmpruneError(f"table frontier_goal takes no arguments, got {' '.join(args)!r}")
    return goal_table(load_results(root / FRONTIER_DIR))


def _flag(args: list[str], flag: str) -> str | None:
    """The value after ``flag`` in a command's argument list."""
    return args[args.index(flag) + 1] if flag in args[:-1] else None


def _result_file(kind: str, args: list[str], root: Path, default: str) -> tuple[str, Path]:
    """``(name, path)`` of the eval/results file a ``KIND [FILE]`` table reads (``default`` when none
    is named)."""
    if len(args) > 1:
        raise LlmpruneError(f"table {kind} takes at most a file name, got {' '.join(args)!r}")
    name = args[0] if args else default
    return name, root / RESULTS / name


def demo_line(args: list[str], root: Path) -> list[str]:
    """One sentence on ``make demo`` as measured (``benchmarks/demo_memory.py --json``)."""
    name, path = _result_file("demo", args, root, DEMO_FILE)
    if not path.is_file():
        return [f"`make demo` not measured yet: run `python benchmarks/demo_memory.py --skip-eval --json "
                f"{RESULTS.as_posix()}/{name}`, then `{COMMAND} FILE`."]
    try:
        demo = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LlmpruneError(f"demo: {path} is not readable JSON ({exc})") from None
    cmd = [str(a) for a in demo.get("args") or []]
    method = _flag(cmd, "--method") or "wanda"
    label = METHODS.get(method).label if method in METHODS else method
    setting = _flag(cmd, "--pattern") or percent(float(_flag(cmd, "--sparsity") or 0.5))
    windows, seqlen = _flag(cmd, "--max-windows"), _flag(cmd, "--seqlen")
    where = f" (first {windows} windows of {seqlen})" if windows and seqlen else ""
    ppl = ", ".join(f"{d} perplexity {demo['dense_perplexity'][d]:.2f} dense, {v:.2f} after {label} {setting}"
                    for d, v in sorted((demo.get("perplexity") or {}).items())
                    if d in (demo.get("dense_perplexity") or {}))
    return [f"`{demo.get('command', 'make demo')}` measured on a {demo.get('cpus')}-CPU machine "
            f"(`{RESULTS.as_posix()}/{name}`): {ppl}{where}; pruning {demo['prune_s']:.1f} s, the whole "
            f"command {demo['wall_s']:.1f} s, peak memory {demo['peak_rss_mib']:.0f} MiB (load average "
            f"{demo.get('load_before')} before, {demo.get('load_after')} after)."]


PROTOCOL_FILE = "full_protocol_wikitext2.json"


def protocol_table(args: list[str], root: Path) -> list[str]:
    """The full WikiText-2 protocol, llmprune beside the reference loop (``benchmarks/full_protocol.py``)."""
    _, path = _result_file("protocol", args, root, PROTOCOL_FILE)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
        body = [[row["variant"], str(row["windows"]), f"{row['tokens']:,}", f"{row['llmprune_ppl']:.4f}",
                 f"{row['reference_ppl']:.4f}", f"{row['rel_diff']:+.1e}"] for row in rows]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LlmpruneError(f"protocol: {path} is not a full_protocol.py result "
                            f"({type(exc).__name__}: {exc})") from None
    header = ["model", "windows", "tokens", "llmprune ppl", "reference loop ppl", "relative difference"]
    return _table(header, body, "lrrrrr")


KL_FILE = "kl_smollm2.json"


def kl_lines(args: list[str], root: Path) -> list[str]:
    """The cost and error of the KL's top-k approximation (``benchmarks/kl_cost.py --json``)."""
    name, path = _result_file("kl", args, root, KL_FILE)
    if not path.is_file():
        return [f"Measured by `benchmarks/kl_cost.py` (`{RESULTS.as_posix()}/{name}`): not yet run."]
    try:
        kl = json.loads(path.read_text(encoding="utf-8"))
        cost, dense, approx = kl["cost"], kl["dense"], kl["approximation"]
        windows, seqlen = kl["args"]["windows"], kl["args"]["seqlen"]
        exact = approx["exact"]
        body = [["exact (`--kl-exact`)", f"{exact['kl_mean']:.4f}", f"{exact['kl_p99']:.3f}",
                 f"{exact['top1_agreement']:.2%}", MISSING, MISSING, MISSING]]
        for k in sorted(int(key[3:]) for key in approx if key.startswith("top")):
            a = approx[f"top{k}"]
            body.append([f"top-{k}", f"{a['kl_mean']:.4f} ({a['rel_error']['kl_mean']:+.1%})",
                         f"{a['kl_p99']:.3f} ({a['rel_error']['kl_p99']:+.1%})", f"{a['top1_agreement']:.2%}",
                         f"{a['dense_topk_mass']:.3f}", f"{dense['cache_bytes_per_position'][str(k)]:.0f}",
                         f"{dense['cache_bytes_full_wikitext2'][str(k)] / 2**20:.0f} MiB"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LlmpruneError(f"kl: {path} is not a kl_cost.py result ({type(exc).__name__}: {exc})") from None
    lines = [f"Measured by `benchmarks/kl_cost.py` on SmolLM2 pruned by Wanda 50% "
             f"(`{RESULTS.as_posix()}/{name}`, "
             f"first {windows} WikiText-2 windows of {seqlen}, {kl['machine']}, load average "
             f"{kl['load_start']:.2f} at the start, {kl['load_end']:.2f} at the end): the evaluation with "
             f"the distance read from the top-32 cache took {cost['ratio_median']:.3f}× a plain perplexity "
             f"pass (median of {len(cost['ratios'])} interleaved pairs; target ≤ {cost['target']}), the "
             f"exact KL {cost['exact_ratio']:.2f}×.", ""]
    header = ["KL from", "mean (error)", "p99 (error)", "top-1 agreement", "dense mass in top-k",
              "cache bytes / position", "cache for all of WikiText-2"]
    return lines + _table(header, body, "lrrrrrr")


def hides_table(args: list[str], root: Path) -> list[str]:
    """``hides DIR DATASET runs|correlations``: a table of ``llmprune.report.hides`` for a results folder."""
    if len(args) != 3 or args[2] not in ("runs", "correlations"):
        raise LlmpruneError("table hides takes DIR DATASET runs|correlations, e.g. "
                            "`hides eval/results/hides_smollm2 wikitext2 correlations`")
    rows, _ = hides.load_rows(root / args[0], args[1])
    return hides.run_lines(rows) if args[2] == "runs" else hides.correlation_lines(rows)


def edge_table(args: list[str], root: Path) -> list[str]:
    """``edge DIR table [TYPE]|answer|parity``: a part of :mod:`llmprune.report.edge`'s report of a
    results folder (``table q4_0``: the rows of one GGUF type, ratios still to dense-q4_0)."""
    if len(args) not in (2, 3) or args[1] not in ("table", "answer", "parity") or (len(args) == 3
                                                                                  and args[1] != "table"):
        raise LlmpruneError("table edge takes DIR table [TYPE]|answer|parity, e.g. "
                            "`edge eval/results/edge_smollm2 table q4_0`")
    rows, records = edge.load_rows(root / args[0])
    if args[1] == "parity":
        return edge.parity_lines(records)
    if args[1] == "answer":
        return edge.answer_lines(rows)
    return edge.table_lines(rows, args[2] if len(args) == 3 else None)


KINDS: dict[str, Callable[[list[str], Path], list[str]]] = {
    "methods": methods_table, "recipe": recipe_table, "parity": parity_table, "frontier": frontier_table,
    "frontier_goal": frontier_goal_table,
    "demo": demo_line, "hides": hides_table, "kl": kl_lines,
    "protocol": protocol_table, "edge": edge_table,
}


def render(spec: str, root: Path = ROOT) -> str:
    """The generated text of the region ``<!-- table: SPEC -->`` (no trailing newline)."""
    words = shlex.split(spec)
    if not words or words[0] not in KINDS:
        raise LlmpruneError(f"unknown table {spec!r}: the kinds are {', '.join(KINDS)}")
    return "\n".join(KINDS[words[0]](words[1:], root))


# ---------------------------------------------------------------------------------------------
# regions of a file


FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})", re.MULTILINE)


def _fenced(text: str) -> list[tuple[int, int]]:
    """The character spans of the fenced code blocks (a page may show the markers as an example)."""
    spans, pos = [], 0
    while (opening := FENCE.search(text, pos)) is not None:
        mark = opening.group(1)
        closing = re.compile(rf"^[ \t]*{re.escape(mark[0])}{{{len(mark)},}}[ \t]*$", re.MULTILINE)
        line_end = text.find("\n", opening.end())
        found = closing.search(text, line_end) if line_end >= 0 else None
        end = found.end() if found else len(text)
        spans.append((opening.start(), end))
        pos = end
    return spans


def markers(text: str) -> list[tuple[int, int, str | None]]:
    """(start, end, spec) of every start marker and (start, end, None) of every end marker, in order,
    outside fenced code blocks."""
    found = [(m.start(), m.end(), m["spec"]) for m in START.finditer(text)]
    found += [(m.start(), m.end(), None) for m in re.finditer(re.escape(END), text)]
    fenced = _fenced(text)
    return sorted(f for f in found if not any(a <= f[0] < b for a, b in fenced))


def fill(text: str, root: Path = ROOT, where: str = "<text>") -> str:
    """``text`` with every region's body replaced by what the generator makes now."""
    out: list[str] = []
    pos = 0
    open_spec: tuple[int, str] | None = None
    for start, end, spec in markers(text):
        line = text.count("\n", 0, start) + 1
        if spec is not None and open_spec is None:
            open_spec = (line, spec)
            out.append(text[pos:end])
        elif spec is None and open_spec is not None:
            try:
                body = render(open_spec[1], root)
            except LlmpruneError as exc:
                raise LlmpruneError(f"{where}:{open_spec[0]}: {exc}") from None
            out += ["\n", body, "\n"]
            open_spec, pos = None, start
        elif spec is None:
            raise LlmpruneError(f"{where}:{line}: `{END}` without a `<!-- table: KIND -->` before it")
        else:
            raise LlmpruneError(f"{where}:{open_spec[0]}: `<!-- table: {open_spec[1]} -->` is not closed by "
                                f"`{END}` before the next table (line {line})")
        if spec is not None:
            pos = end
    if open_spec is not None:
        raise LlmpruneError(f"{where}:{open_spec[0]}: `<!-- table: {open_spec[1]} -->` has no `{END}`")
    return "".join(out) + text[pos:]


def diff(path: str | Path, root: Path = ROOT) -> str:
    """The unified diff from the file's regions to what the generator makes now ('' when equal)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    new = fill(text, root, str(path))
    return "".join(difflib.unified_diff(text.splitlines(keepends=True), new.splitlines(keepends=True),
                                        f"{path} (committed)", f"{path} (generated now)"))


def update(path: str | Path, root: Path = ROOT) -> bool:
    """Rewrite the file's regions in place (atomically); True when it changed."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    new = fill(text, root, str(path))
    if new == text:
        return False
    write_text_atomic(path, new)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", metavar="FILE", help="markdown files whose regions to rewrite")
    parser.add_argument("--check", action="store_true", help="change nothing: print the diff, exit 1 if any")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository root (holds eval/results)")
    args = parser.parse_args(argv)
    stale = []
    try:
        for file in args.files:
            if args.check:
                text = diff(file, args.root)
                if text:
                    stale.append(file)
                    sys.stdout.write(text)
            else:
                print(f"{file}: {'rewritten' if update(file, args.root) else 'up to date'}")
    except (LlmpruneError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if stale:
        print(f"out of date: {' '.join(stale)}; fix with `{COMMAND} {' '.join(stale)}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
