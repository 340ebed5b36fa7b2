"""Markdown and CSV tables from parsed results, and the display order everything shares.

A paper-style table puts methods on the rows and the pattern/sparsity on the columns, or the
ablated knob when only that varies (``choose_layout``); the dense model's number fills every
column of its row, as the reference for each. Results that differ only in their calibration seed
(a recipe's ``seeds:``) fill one cell with their mean ± sample standard deviation
(``merge_seeds``). Every order is explicit (the papers' order for methods, groups and metrics), so
the same files always give the same bytes.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from llmprune.methods import ALLOCATIONS, BLOCK_STEPS, METHODS, RECONSTRUCTIONS, REFINERS
from llmprune.recipes import slugify
from llmprune.results import DENSE, MISSING, Result, percent, task_order

# methods whose spec's order is below this are listed in that order (the papers': magnitude,
# SparseGPT, Wanda, RIA), the rest alphabetically after them
EXPLICIT_ORDER = 50
# allocations are a prefix (OWL-Wanda), the other steps a suffix (Wanda+DSnoT), in run order
# (the OBS reconstruction is "reconstruct" in a result's variant, as before there was a choice)
_RECONSTRUCTIONS = {"reconstruct" if r.name == "obs" else r.name: r for r in RECONSTRUCTIONS}
STEP_ORDER = ([a.name for a in ALLOCATIONS if a.name != "uniform"] + ["permute"] + [r.name for r in REFINERS]
              + list(_RECONSTRUCTIONS) + [b.name for b in BLOCK_STEPS])
STEP_PREFIX = {a.name: a.prefix for a in ALLOCATIONS}
STEP_SUFFIX = {"permute": "+permute", **{k: r.suffix for k, r in _RECONSTRUCTIONS.items()},
               **{r.name: r.suffix for r in REFINERS}, **{b.name: b.suffix for b in BLOCK_STEPS}}
# settings besides method and pattern/sparsity that an ablation may vary, in display order
KNOBS = ("group", "metric", "nsamples", "seed", "calib")
KNOB_TITLES = {"setting": "sparsity", "group": "group", "metric": "metric", "nsamples": "nsamples",
               "seed": "seed", "calib": "calibration data"}
# groups and metrics in the order the papers list them, not alphabetical
_KNOWN_ORDER = {"group": ("row", "column", "layer"), "metric": ("weight", "activation", "wanda")}


# ---------------------------------------------------------------------------------------------
# order (shared with plots.py)


def method_rank(method: str) -> tuple:
    if method == DENSE:
        return (0, "")
    order = METHODS.get(method).order if method in METHODS else EXPLICIT_ORDER
    return (order, "") if order < EXPLICIT_ORDER else (EXPLICIT_ORDER, method)


def method_key(r: Result) -> tuple:
    """Sort key of a row's method with its variant: plain method first, then its variants."""
    steps = tuple(STEP_ORDER.index(v) if v in STEP_ORDER else len(STEP_ORDER) for v in r.variant)
    return method_rank(r.method) + (len(r.variant), steps, r.variant)


def method_label(r: Result) -> str:
    """"OWL-Wanda+DSnoT+reconstruct": the method's label with its allocation and steps."""
    label = "Dense" if r.method == DENSE else METHODS.get(r.method).label if r.method in METHODS else r.method
    prefix = "".join(STEP_PREFIX.get(v, "") for v in r.variant)
    suffix = "".join(STEP_SUFFIX.get(v, "" if v in STEP_PREFIX else f"+{v}") for v in r.variant)
    return prefix + label + suffix


def none_last(value: Any) -> tuple:
    return (value is None, value if value is not None else 0)


def knob_order(knob: str, value: Any) -> tuple:
    known = _KNOWN_ORDER.get(knob, ())
    rank = known.index(value) if value in known else len(known)
    return (value is None, rank, value if value is not None else 0)


def sort_key(r: Result) -> tuple:
    return (r.model, method_key(r), r.setting, knob_order("group", r.group), knob_order("metric", r.metric),
            none_last(r.nsamples), none_last(r.seed), none_last(r.calib),
            none_last(r.eval_seqlen), r.name, r.file)


def varies_within_method(results: list[Result], knob: str) -> bool:
    by_method: dict[str, set] = {}
    for r in results:
        value = r.knob(knob)
        if value is not None:
            by_method.setdefault(method_label(r), set()).add(value)
    return any(len(values) > 1 for values in by_method.values())


# ---------------------------------------------------------------------------------------------
# calibration seeds: results that differ only in their seed are one setting, measured n times


@dataclass(frozen=True)
class Stat:
    """A cell's number: ``mean`` over ``n`` results (one: the result's own value), ``std`` their
    sample standard deviation (ddof=1; None for a single result) and the seeds they were made with."""

    mean: float
    std: float | None = None
    n: int = 1
    seeds: tuple[int, ...] = ()

    @classmethod
    def of(cls, values: list[float], seeds: tuple[int, ...] = ()) -> "Stat":
        n = len(values)
        if n == 1:
            return cls(values[0], None, 1, seeds)
        mean = math.fsum(values) / n
        if not math.isfinite(mean):  # inf - inf is nan: a spread around an infinite mean means nothing
            return cls(mean, math.nan, n, seeds)
        return cls(mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)), n, seeds)


def seed_groups(results: list[Result]) -> list[list[Result]]:
    """``results`` in their order, with those that differ only in their calibration seed (the same
    ``seed_group``, two or more distinct seeds) gathered into one list at the place of the first;
    a second result of the same seed is left out of its group. Every other result is a group of
    one, so a folder with one seed per setting gives back its results one by one."""
    members: dict[str, dict[int, Result]] = {}
    for r in results:
        if r.seed is not None and not r.dense:
            members.setdefault(r.seed_group, {}).setdefault(r.seed, r)
    groups: list[list[Result]] = []
    placed: set[str] = set()
    for r in results:
        same = members.get(r.seed_group, {}) if r.seed is not None and not r.dense else {}
        if len(same) < 2:
            groups.append([r])
        elif r.seed_group not in placed:
            placed.add(r.seed_group)
            groups.append(list(same.values()))
    return groups


def merge_seeds(results: list[Result], value: Callable[[Result], float | None]) -> list[tuple[Result, Stat]]:
    """One ``(result, Stat of value)`` per seed group of ``results`` (those with a value): a group
    of several seeds is its first result with the seed cleared (so the seed is no knob of the
    table) and the mean and sample standard deviation of ``value`` over the group."""
    out = []
    for group in seed_groups([r for r in results if value(r) is not None]):
        if len(group) == 1:
            out.append((group[0], Stat(value(group[0]))))
        else:
            seeds = tuple(sorted(r.seed for r in group))
            out.append((dataclasses.replace(group[0], seed=None), Stat.of([value(r) for r in group], seeds)))
    return out


def _stat_cell(stat: Stat | None, digits: int, scale: float, with_n: bool) -> str:
    if stat is None or stat.std is None:
        return _fmt(None if stat is None else stat.mean, digits, scale)
    cell = f"{_fmt(stat.mean, digits, scale)} ± {_fmt(stat.std, digits, scale)}"
    return cell + (f" (n={stat.n})" if with_n else "")


def seeds_note(stats: Iterable[Stat]) -> str | None:
    """The footnote of a table with ± cells: what ± is, over how many seeds (None: no ± cell)."""
    merged = [s for s in stats if s.std is not None]
    if not merged:
        return None
    counts = {s.n for s in merged}
    seeds = {s.seeds for s in merged}
    if len(counts) > 1:
        over = "the n calibration seeds given in the cell"
    else:
        over = f"n = {merged[0].n} calibration seeds"
        if len(seeds) == 1 and merged[0].seeds:
            over += f" ({', '.join(map(str, merged[0].seeds))})"
    return f"a ± b: mean ± sample standard deviation (ddof=1) over {over}; the other cells are single runs."


# ---------------------------------------------------------------------------------------------
# pivot: which knob goes on the columns, which on the rows


@dataclass
class Layout:
    column: str  # "setting" or one of KNOBS
    row_knobs: list[str]

    def row_key(self, r: Result) -> tuple:
        if r.dense:
            return ((), )
        return (method_key(r), tuple(knob_order(k, r.knob(k)) for k in self.row_knobs))

    def row_label(self, r: Result) -> str:
        label = method_label(r)
        if r.dense:
            return label
        extra = [f"{k}={r.knob_label(k)}" for k in self.row_knobs if r.knob(k) is not None]
        return f"{label} ({', '.join(extra)})" if extra else label

    def col_key(self, r: Result) -> tuple:
        return knob_order(self.column, r.knob(self.column))


def choose_layout(results: list[Result]) -> Layout:
    pruned = [r for r in results if not r.dense]
    row_knobs = [k for k in KNOBS if varies_within_method(pruned, k)]
    if len({r.setting for r in pruned}) > 1 or not row_knobs:
        return Layout("setting", row_knobs)
    return Layout(row_knobs[0], row_knobs[1:])


def _fmt(value: float | None, digits: int = 2, scale: float = 1.0) -> str:
    if value is None:
        return MISSING
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    return f"{value * scale:.{digits}f}"


def _markdown(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> list[str]:
    align = align or ["l"] + ["r"] * (len(header) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(cell.replace("\n", " ").replace("|", "\\|") for cell in row) + " |"
              for row in rows]
    return lines


def pivot(results: list[Result], value: Callable[[Result], float | None], digits: int = 2,
          scale: float = 1.0) -> list[str]:
    """A markdown table: rows are methods (plus varying knobs), columns the layout's knob. The
    dense model's value fills every column of its row, as the reference for each. Results that
    differ only in their calibration seed share a cell: ``mean ± std``, and a footnote says so."""
    merged = merge_seeds(results, value)
    stats = {id(r): stat for r, stat in merged}
    results = [r for r, _ in merged]
    layout = choose_layout(results)
    pruned = [r for r in results if not r.dense]
    columns: dict[tuple, str] = {}
    for r in sorted(pruned, key=lambda r: (layout.col_key(r), sort_key(r))):
        columns.setdefault(layout.col_key(r), r.knob_label(layout.column))
    if not columns:  # only dense results: a single column
        columns[()] = "dense"
    rows: dict[tuple, tuple[str, dict[tuple, Stat]]] = {}
    for r in results:  # already sorted, so the first result for a cell wins
        label, cells = rows.setdefault(layout.row_key(r), (layout.row_label(r), {}))
        if r.dense:
            for key in columns:
                cells.setdefault(key, stats[id(r)])
        else:
            cells.setdefault(layout.col_key(r), stats[id(r)])
    shown = [stat for _, cells in rows.values() for stat in cells.values()]
    with_n = len({s.n for s in shown if s.std is not None}) > 1
    corner = "Method" if layout.column == "setting" else f"Method / {KNOB_TITLES[layout.column]}"
    body = [[label] + [_stat_cell(cells.get(key), digits, scale, with_n) for key in columns]
            for _, (label, cells) in sorted(rows.items(), key=lambda item: item[0])]
    note = seeds_note(shown)
    return _markdown([corner] + list(columns.values()), body) + ([] if note is None else ["", note])


# ---------------------------------------------------------------------------------------------
# scopes: results that belong in one table (same model and evaluation)


def _short_model(model: str) -> str:
    return model.rstrip("/").split("/")[-1]


def ppl_scopes(results: list[Result]) -> dict[tuple, list[Result]]:
    scopes: dict[tuple, list[Result]] = {}
    for r in results:
        for dataset in r.ppl:
            key = (r.model, dataset, none_last(r.eval_seqlen), none_last(r.max_windows))
            scopes.setdefault(key, []).append(r)
    return dict(sorted(scopes.items()))


def scope_title(model: str, dataset: str, seqlen: tuple, max_windows: tuple) -> str:
    extra = [] if seqlen[0] else [f"seqlen {seqlen[1]}"]
    if not max_windows[0]:
        extra.append(f"first {max_windows[1]} windows")
    return f"Perplexity on {dataset}: {model}" + (f" ({', '.join(extra)})" if extra else "")


def scope_slugs(scopes: Iterable[tuple]) -> dict[tuple, str]:
    """A file-name part per scope, made longer only where two scopes would share one."""
    scopes = list(scopes)
    base = {s: slugify(f"{s[1]}_{_short_model(s[0])}")[:80] for s in scopes}  # a file name part: bounded
    counts: dict[str, int] = {}
    for slug in base.values():
        counts[slug] = counts.get(slug, 0) + 1
    out = {}
    for s, slug in base.items():
        if counts[slug] > 1:
            slug += f"_seq{s[2][1]}" + ("" if s[3][0] else f"_w{s[3][1]}")
        out[s] = slug
    return out


# ---------------------------------------------------------------------------------------------
# summary.csv and the tables of summary.md besides perplexity


def _number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def summary_csv(results: list[Result]) -> str:
    datasets = sorted({d for r in results for d in r.ppl})
    tasks = task_order({t for r in results for t in r.acc})
    header = (["name", "recipe", "model", "method", "sparsity", "pattern", "group", "metric", "nsamples",
               "seed", "calib_dataset", "eval_seqlen", "variant"]
              + [f"ppl_{d}" for d in datasets] + [f"acc_{t}" for t in tasks]
              + ["mean_acc", "prune_seconds", "cost_stack_forwards", "actual_sparsity", "file"])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for r in results:
        writer.writerow([r.name, r.recipe or "", r.model, r.method, _number(r.sparsity), r.pattern,
                         r.group or "", r.metric or "", _number(r.nsamples), _number(r.seed), r.calib or "",
                         _number(r.eval_seqlen), "+".join(r.variant)]
                        + [_number(r.ppl.get(d)) for d in datasets] + [_number(r.acc.get(t)) for t in tasks]
                        + [_number(r.mean_acc), _number(r.prune_seconds), _number(r.cost),
                           _number(r.actual_sparsity), r.file])
    return buffer.getvalue()


def run_table(results: list[Result]) -> list[str]:
    """One row per run with every setting."""
    datasets = sorted({d for r in results for d in r.ppl})
    with_acc = any(r.mean_acc is not None for r in results)
    header = ["name", "model", "method", "sparsity", "pattern", "group", "metric", "nsamples"]
    header += [f"ppl {d}" for d in datasets] + (["mean acc (%)"] if with_acc else []) + ["prune s"]
    rows = []
    for r in results:
        row = [r.name, r.model, "+".join((r.method,) + r.variant), percent(r.sparsity), r.pattern,
               r.group or MISSING, r.metric or MISSING, MISSING if r.nsamples is None else str(r.nsamples)]
        row += [_fmt(r.ppl.get(d)) for d in datasets]
        row += [_fmt(r.mean_acc, 2, 100.0)] if with_acc else []
        row += [_fmt(r.prune_seconds, 1)]
        rows.append(row)
    return _markdown(header, rows, ["l"] * 8 + ["r"] * (len(header) - 8))


def zeroshot_sections(results: list[Result]) -> list[str]:
    """Per model and task set: the mean-accuracy pivot, then accuracy per task and run."""
    scoped: dict[tuple, list[Result]] = {}
    for r in results:
        if r.mean_acc is not None:
            scoped.setdefault((r.model, r.zs_key), []).append(r)
    lines: list[str] = []
    for (model, (tasks, limit)), rows in sorted(scoped.items(), key=lambda item: (item[0][0], item[0][1][0],
                                                                                 none_last(item[0][1][1]))):
        where = f"{', '.join(tasks)}" + (f"; first {limit} documents per task" if limit else "")
        lines += [f"## Mean zero-shot accuracy (%): {model}", "", f"Tasks: {where}.", ""]
        lines += pivot(rows, lambda r: r.mean_acc, 2, 100.0) + [""]
        lines += [f"### Zero-shot accuracy per task (%): {model}", ""]
        body = [[r.name, method_label(r), MISSING if r.dense else r.setting_label]
                + [_fmt(r.acc.get(t), 2, 100.0) for t in tasks] + [_fmt(r.mean_acc, 2, 100.0)] for r in rows]
        lines += _markdown(["name", "method", "sparsity"] + list(tasks) + ["mean"], body,
                           ["l"] * 3 + ["r"] * (len(tasks) + 1))
        lines.append("")
    return lines
