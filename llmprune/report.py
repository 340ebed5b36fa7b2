"""Tables and plots, generated only from the result JSON files in a folder.

``write_report(folder)`` reads every ``*.json`` there whose ``schema`` is ``llmprune.result/1``
and writes:

* ``summary.md``: per model and perplexity dataset a paper-style table (rows: methods,
  columns: patterns/sparsities, or the ablated knob when only that varies), the same for mean
  zero-shot accuracy and per task when present, and one row per run with every setting;
* ``summary.csv``: one row per run;
* PNG plots: perplexity vs sparsity per method (log y) when sparsity varies, perplexity vs
  calibration samples (log2 x) when ``nsamples`` varies, grouped bars when the comparison group
  or metric varies.

Everything is sorted and free of timestamps, so the same files give byte-identical tables.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from llmprune.errors import LlmpruneError

RESULT_SCHEMA = "llmprune.result/1"
SUMMARY_MD = "summary.md"
SUMMARY_CSV = "summary.csv"
DENSE = "dense"
METHOD_ORDER = ("dense", "magnitude", "sparsegpt", "wanda")
METHOD_LABELS = {"dense": "Dense", "magnitude": "Magnitude", "sparsegpt": "SparseGPT", "wanda": "Wanda"}
# settings besides method and pattern/sparsity that an ablation may vary, in display order
KNOBS = ("group", "metric", "nsamples", "seed", "calib")
KNOB_TITLES = {"setting": "sparsity", "group": "group", "metric": "metric", "nsamples": "nsamples",
               "seed": "seed", "calib": "calibration data"}
MISSING = "-"


@dataclass(frozen=True)
class Result:
    """The fields of one result file that tables and plots use."""

    file: str
    name: str
    recipe: str | None
    model: str
    method: str
    sparsity: float
    pattern: str
    group: str | None
    metric: str | None
    nsamples: int | None
    seed: int | None
    calib: str | None
    eval_seqlen: int | None
    max_windows: int | None
    ppl: dict[str, float]
    acc: dict[str, float]
    mean_acc: float | None
    zs_limit: int | None
    prune_seconds: float | None
    actual_sparsity: float | None
    versions: str
    machine: str
    structured: bool = field(default=False)
    nm: tuple[int, int] | None = None

    @property
    def dense(self) -> bool:
        return self.method == DENSE

    @property
    def setting(self) -> tuple:
        """Sort key of the pattern/sparsity column: unstructured by sparsity, then N:M."""
        if self.nm is None:
            return (0, round(self.sparsity, 9), 0, 0)
        n, m = self.nm
        return (1, round(self.sparsity, 9), -m, n)

    @property
    def setting_label(self) -> str:
        return self.pattern if self.nm is not None else _percent(self.sparsity)

    def knob(self, name: str) -> Any:
        return self.setting if name == "setting" else getattr(self, name)

    def knob_label(self, name: str) -> str:
        if name == "setting":
            return self.setting_label
        value = getattr(self, name)
        return MISSING if value is None else str(value)

    @property
    def zs_key(self) -> tuple:
        return (_task_order(self.acc), self.zs_limit)


def _task_order(tasks: Iterable[str]) -> tuple[str, ...]:
    """Zero-shot tasks in the Wanda paper's column order, any others after them by name."""
    from llmprune.evaluation.zeroshot import AVAILABLE_TASKS

    return tuple(sorted(tasks, key=lambda t: (AVAILABLE_TASKS.index(t) if t in AVAILABLE_TASKS
                                              else len(AVAILABLE_TASKS), t)))


def _percent(fraction: float) -> str:
    return f"{round(fraction * 100, 6):g}%"


def _method_rank(method: str) -> tuple:
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def _none_last(value: Any) -> tuple:
    return (value is None, value if value is not None else 0)


# groups and metrics in the order the papers list them, not alphabetical
_KNOWN_ORDER = {"group": ("row", "column", "layer"), "metric": ("weight", "activation", "wanda")}


def _order(knob: str, value: Any) -> tuple:
    known = _KNOWN_ORDER.get(knob, ())
    rank = known.index(value) if value in known else len(known)
    return (value is None, rank, value if value is not None else 0)


def _sort_key(r: Result) -> tuple:
    return (r.model, _method_rank(r.method), r.setting, _order("group", r.group), _order("metric", r.metric),
            _none_last(r.nsamples), _none_last(r.seed), _none_last(r.calib), _none_last(r.eval_seqlen), r.name, r.file)


def _float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _numbers(entries: dict | None, key: str) -> dict[str, float]:
    """``{name: number}`` from ``{name: {key: number, ...}}`` (or ``{name: number}``), skipping entries without a number."""
    out = {}
    for name, value in (entries or {}).items():
        number = _float(value.get(key) if isinstance(value, dict) else value)
        if number is not None:
            out[str(name)] = number
    return out


def _parse(record: dict, file: str) -> Result:
    def need(key: str) -> Any:
        if key not in record:
            raise LlmpruneError(f"result file {file} has no {key!r}: it is not a complete llmprune result")
        return record[key]

    pattern = str(record.get("pattern") or "unstructured")
    nm = None
    if ":" in pattern:
        n, m = pattern.split(":", 1)
        nm = (int(n), int(m))
    config = record.get("config") or {}
    evaluation = record.get("eval") or {}
    ppl = _numbers(record.get("perplexity"), "ppl")
    zeroshot = record.get("zeroshot") or {}
    acc = _numbers(zeroshot.get("tasks"), "acc")
    prune = record.get("prune") or {}
    versions = record.get("versions") or {}
    return Result(
        file=file,
        name=str(need("name")),
        recipe=record.get("recipe"),
        model=str(need("model")),
        method=str(need("method")),
        sparsity=float(record.get("sparsity") or 0.0),
        pattern=pattern,
        group=record.get("group"),
        metric=record.get("metric"),
        nsamples=record.get("nsamples"),
        seed=record.get("seed"),
        calib=(config.get("calib") or {}).get("dataset") if record.get("nsamples") is not None else None,
        eval_seqlen=evaluation.get("seqlen"),
        max_windows=evaluation.get("max_windows"),
        ppl=ppl,
        acc=acc,
        mean_acc=_float(zeroshot.get("mean_acc")) if zeroshot else None,
        zs_limit=evaluation.get("limit"),
        prune_seconds=_float(record.get("prune_seconds")),
        actual_sparsity=_float(prune.get("overall_sparsity")),
        versions=", ".join(f"{k} {versions[k]}" for k in sorted(versions)),
        machine=str(record.get("machine") or ""),
        structured=nm is not None,
        nm=nm,
    )


def _embedded_dense(record: dict, file: str) -> list[Result]:
    dense = record.get("dense")
    if record.get("method") == DENSE or not isinstance(dense, dict) or not dense.get("perplexity"):
        return []
    keep = ("model", "eval", "versions", "machine", "recipe")
    synthetic = {key: record.get(key) for key in keep} | {
        "schema": RESULT_SCHEMA, "name": DENSE, "method": DENSE, "sparsity": 0.0, "pattern": "unstructured",
        "perplexity": dense.get("perplexity"), "zeroshot": dense.get("zeroshot")}
    return [_parse(synthetic, f"{file}#dense")]


def load_results(results_dir: str | os.PathLike) -> list[Result]:
    """Every result in ``results_dir`` (not its subfolders), sorted for display."""
    folder = Path(results_dir)
    if not folder.is_dir():
        raise LlmpruneError(f"{folder} is not a folder: give the --out folder of `llmprune run`")
    results: list[Result] = []
    embedded: list[Result] = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LlmpruneError(f"{path} is not valid JSON ({exc}): delete or fix it") from None
        if isinstance(record, dict) and record.get("schema") == RESULT_SCHEMA:
            results.append(_parse(record, path.name))
            embedded.extend(_embedded_dense(record, path.name))
    # `llmprune prune --json` files carry the dense model's numbers inside: use them where the
    # folder has no dense result of its own for that model and evaluation
    have = {(r.model, r.eval_seqlen, r.max_windows) for r in results if r.dense}
    for r in embedded:
        if (r.model, r.eval_seqlen, r.max_windows) not in have:
            have.add((r.model, r.eval_seqlen, r.max_windows))
            results.append(r)
    if not results:
        raise LlmpruneError(f"{folder} holds no result files (*.json with schema {RESULT_SCHEMA}): run a recipe first")
    return sorted(results, key=_sort_key)


# ---------------------------------------------------------------------------------------------
# pivot: which knob goes on the columns, which on the rows


@dataclass
class Layout:
    column: str  # "setting" or one of KNOBS
    row_knobs: list[str]

    def row_key(self, r: Result) -> tuple:
        if r.dense:
            return ((), )
        return (_method_rank(r.method), tuple(_order(k, r.knob(k)) for k in self.row_knobs))

    def row_label(self, r: Result) -> str:
        label = METHOD_LABELS.get(r.method, r.method)
        if r.dense:
            return label
        extra = [f"{k}={r.knob_label(k)}" for k in self.row_knobs if r.knob(k) is not None]
        return f"{label} ({', '.join(extra)})" if extra else label

    def col_key(self, r: Result) -> tuple:
        return _order(self.column, r.knob(self.column))


def _varies_within_method(results: list[Result], knob: str) -> bool:
    by_method: dict[str, set] = {}
    for r in results:
        value = r.knob(knob)
        if value is not None:
            by_method.setdefault(r.method, set()).add(value)
    return any(len(values) > 1 for values in by_method.values())


def choose_layout(results: list[Result]) -> Layout:
    pruned = [r for r in results if not r.dense]
    row_knobs = [k for k in KNOBS if _varies_within_method(pruned, k)]
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
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def pivot(results: list[Result], value: Callable[[Result], float | None], digits: int = 2,
          scale: float = 1.0) -> list[str]:
    """A markdown table: rows are methods (plus varying knobs), columns the layout's knob. The
    dense model's value fills every column of its row, as the reference for each."""
    results = [r for r in results if value(r) is not None]
    layout = choose_layout(results)
    pruned = [r for r in results if not r.dense]
    columns: dict[tuple, str] = {}
    for r in sorted(pruned, key=lambda r: (layout.col_key(r), _sort_key(r))):
        columns.setdefault(layout.col_key(r), r.knob_label(layout.column))
    if not columns:  # only dense results: a single column
        columns[()] = "dense"
    rows: dict[tuple, tuple[str, dict[tuple, float | None]]] = {}
    for r in results:  # already sorted, so the first result for a cell wins
        label, cells = rows.setdefault(layout.row_key(r), (layout.row_label(r), {}))
        if r.dense:
            for key in columns:
                cells.setdefault(key, value(r))
        else:
            cells.setdefault(layout.col_key(r), value(r))
    corner = "Method" if layout.column == "setting" else f"Method / {KNOB_TITLES[layout.column]}"
    body = [[label] + [_fmt(cells.get(key), digits, scale) for key in columns]
            for _, (label, cells) in sorted(rows.items(), key=lambda item: item[0])]
    return _markdown([corner] + list(columns.values()), body)


# ---------------------------------------------------------------------------------------------
# scopes: results that belong in one table (same model and evaluation)


def _short_model(model: str) -> str:
    return model.rstrip("/").split("/")[-1]


def _slug(text: str) -> str:
    from llmprune.recipes import slugify

    return slugify(text)


def ppl_scopes(results: list[Result]) -> dict[tuple, list[Result]]:
    scopes: dict[tuple, list[Result]] = {}
    for r in results:
        for dataset in r.ppl:
            scopes.setdefault((r.model, dataset, _none_last(r.eval_seqlen), _none_last(r.max_windows)), []).append(r)
    return dict(sorted(scopes.items()))


def _scope_title(model: str, dataset: str, seqlen: tuple, max_windows: tuple) -> str:
    extra = [] if seqlen[0] else [f"seqlen {seqlen[1]}"]
    if not max_windows[0]:
        extra.append(f"first {max_windows[1]} windows")
    return f"Perplexity on {dataset}: {model}" + (f" ({', '.join(extra)})" if extra else "")


def _scope_slugs(scopes: Iterable[tuple]) -> dict[tuple, str]:
    scopes = list(scopes)
    base = {s: _slug(f"{s[1]}_{_short_model(s[0])}") for s in scopes}
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
# plots (matplotlib's object API on the Agg canvas: no global pyplot state, no display needed)


def _new_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", metadata={"Software": None})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _dense_line(ax, dense: list[Result], dataset: str) -> None:
    if dense and _finite(dense[0].ppl.get(dataset)):
        ax.axhline(dense[0].ppl[dataset], color="gray", linestyle="--", linewidth=1, label="Dense")


def _series(results: list[Result], layout_knobs: list[str], x: Callable[[Result], Any],
            dataset: str) -> dict[tuple, tuple[str, list[tuple[Any, float]]]]:
    """Lines keyed by method and the other varying knobs; points sorted by x."""
    lines: dict[tuple, tuple[str, list]] = {}
    for r in results:
        y = r.ppl.get(dataset)
        if not _finite(y):
            continue
        key = (_method_rank(r.method),) + tuple(_order(k, r.knob(k)) for k in layout_knobs)
        extra = [f"{k}={r.knob_label(k)}" for k in layout_knobs if r.knob(k) is not None]
        label = METHOD_LABELS.get(r.method, r.method) + (f" ({', '.join(extra)})" if extra else "")
        points = lines.setdefault(key, (label, []))[1]
        if all(px != x(r) for px, _ in points):
            points.append((x(r), y))
    return {k: (label, sorted(points)) for k, (label, points) in sorted(lines.items())}


def _log_y(ax) -> None:
    """Log y with plain numbers (40, not 4x10^1) on the ticks."""
    from matplotlib.ticker import LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))


def plot_sparsity(results: list[Result], dataset: str, title: str, path: Path) -> Path | None:
    """Perplexity vs unstructured sparsity, one line per method (log y)."""
    pruned = [r for r in results if not r.dense and r.nm is None]
    if len({round(r.sparsity, 9) for r in pruned}) < 2:
        return None
    others = [k for k in KNOBS if _varies_within_method(pruned, k)]
    fig, ax = _new_figure()
    for label, points in _series(pruned, others, lambda r: round(r.sparsity * 100, 6), dataset).values():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    _dense_line(ax, [r for r in results if r.dense], dataset)
    _log_y(ax)
    ax.set_xlabel("unstructured sparsity (%)")
    ax.set_ylabel(f"{dataset} perplexity (log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_nsamples(results: list[Result], dataset: str, title: str, path: Path) -> Path | None:
    """Perplexity vs number of calibration samples (log2 x), one line per method."""
    pruned = [r for r in results if not r.dense and r.nsamples is not None]
    if not _varies_within_method(pruned, "nsamples"):
        return None
    others = [k for k in ("setting",) + KNOBS if k != "nsamples" and _varies_within_method(pruned, k)]
    fig, ax = _new_figure()
    ticks: set[int] = set()
    for label, points in _series(pruned, others, lambda r: r.nsamples, dataset).values():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ticks.update(p[0] for p in points)
    _dense_line(ax, [r for r in results if r.dense], dataset)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks))
    ax.set_xticklabels([str(t) for t in sorted(ticks)])
    ax.set_xlabel("calibration samples")
    ax.set_ylabel(f"{dataset} perplexity")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_pattern(results: list[Result], dataset: str, title: str, path: Path) -> Path | None:
    """Grouped bars for a paper-style table with N:M columns: pattern on x, one bar per method (log y)."""
    pruned = [r for r in results if not r.dense and _finite(r.ppl.get(dataset))]
    if not any(r.nm is not None for r in pruned) or not _varies_within_method(pruned, "setting"):
        return None
    others = [k for k in KNOBS if _varies_within_method(pruned, k)]
    settings = sorted({(r.setting, r.setting_label) for r in pruned})
    columns = [label for _, label in settings]
    bars = _series(pruned, others, lambda r: r.setting, dataset)
    fig, ax = _new_figure()
    width = 0.8 / max(len(bars), 1)
    for j, (label, points) in enumerate(bars.values()):
        where = {key: i for i, (key, _) in enumerate(settings)}
        xs = [where[x] + (j - (len(bars) - 1) / 2) * width for x, _ in points]
        ax.bar(xs, [y for _, y in points], width=width, label=label)
    _dense_line(ax, [r for r in results if r.dense], dataset)
    _log_y(ax)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns)
    ax.set_xlabel("sparsity pattern")
    ax.set_ylabel(f"{dataset} perplexity (log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_group_metric(results: list[Result], dataset: str, title: str, path: Path) -> Path | None:
    """Grouped bars: comparison group on x, one bar per metric (and method)."""
    pruned = [r for r in results if not r.dense and _finite(r.ppl.get(dataset))]
    if not (_varies_within_method(pruned, "group") or _varies_within_method(pruned, "metric")):
        return None
    others = [k for k in ("setting",) + KNOBS if k not in ("group", "metric") and _varies_within_method(pruned, k)]
    groups = sorted({r.group for r in pruned}, key=lambda g: _order("group", g))
    bars: dict[tuple, tuple[str, dict]] = {}
    for r in pruned:
        key = (_method_rank(r.method), _order("metric", r.metric)) + tuple(_order(k, r.knob(k)) for k in others)
        extra = [f"{k}={r.knob_label(k)}" for k in others if r.knob(k) is not None]
        label = f"{METHOD_LABELS.get(r.method, r.method)}, metric {r.knob_label('metric')}"
        label += f" ({', '.join(extra)})" if extra else ""
        bars.setdefault(key, (label, {}))[1].setdefault(r.group, r.ppl[dataset])
    fig, ax = _new_figure()
    width = 0.8 / max(len(bars), 1)
    for j, (label, values) in enumerate(v for _, v in sorted(bars.items())):
        xs = [i + (j - (len(bars) - 1) / 2) * width for i, g in enumerate(groups) if g in values]
        ax.bar(xs, [values[g] for g in groups if g in values], width=width, label=label)
    _dense_line(ax, [r for r in results if r.dense], dataset)
    heights = [r.ppl[dataset] for r in pruned]
    if max(heights) > 10 * min(heights):  # e.g. the activation-only metric: keep the others readable
        _log_y(ax)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([MISSING if g is None else str(g) for g in groups])
    ax.set_xlabel("comparison group")
    ax.set_ylabel(f"{dataset} perplexity")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# summary.md and summary.csv


def _recipe_description(folder: Path, results: list[Result]) -> str:
    recipe_file = folder / "recipe.json"
    if not recipe_file.is_file():
        return ""
    try:
        recipe = json.loads(recipe_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    names = {r.recipe for r in results}
    if isinstance(recipe, dict) and recipe.get("name") in names:
        return str(recipe.get("description") or "")
    return ""


def _number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def summary_csv(results: list[Result]) -> str:
    datasets = sorted({d for r in results for d in r.ppl})
    tasks = _task_order({t for r in results for t in r.acc})
    header = (["name", "recipe", "model", "method", "sparsity", "pattern", "group", "metric", "nsamples", "seed",
               "calib_dataset", "eval_seqlen"] + [f"ppl_{d}" for d in datasets] + [f"acc_{t}" for t in tasks]
              + ["mean_acc", "prune_seconds", "actual_sparsity", "file"])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for r in results:
        writer.writerow([r.name, r.recipe or "", r.model, r.method, _number(r.sparsity), r.pattern,
                         r.group or "", r.metric or "", _number(r.nsamples), _number(r.seed), r.calib or "",
                         _number(r.eval_seqlen)]
                        + [_number(r.ppl.get(d)) for d in datasets] + [_number(r.acc.get(t)) for t in tasks]
                        + [_number(r.mean_acc), _number(r.prune_seconds), _number(r.actual_sparsity), r.file])
    return buffer.getvalue()


def _run_table(results: list[Result]) -> list[str]:
    datasets = sorted({d for r in results for d in r.ppl})
    with_acc = any(r.mean_acc is not None for r in results)
    header = ["name", "model", "method", "sparsity", "pattern", "group", "metric", "nsamples"]
    header += [f"ppl {d}" for d in datasets] + (["mean acc (%)"] if with_acc else []) + ["prune s"]
    rows = []
    for r in results:
        row = [r.name, r.model, r.method, _percent(r.sparsity), r.pattern, r.group or MISSING, r.metric or MISSING,
               MISSING if r.nsamples is None else str(r.nsamples)]
        row += [_fmt(r.ppl.get(d)) for d in datasets]
        row += [_fmt(r.mean_acc, 2, 100.0)] if with_acc else []
        row += [_fmt(r.prune_seconds, 1)]
        rows.append(row)
    return _markdown(header, rows, ["l"] * 8 + ["r"] * (len(header) - 8))


def _zeroshot_sections(results: list[Result]) -> list[str]:
    scoped: dict[tuple, list[Result]] = {}
    for r in results:
        if r.mean_acc is not None:
            scoped.setdefault((r.model, r.zs_key), []).append(r)
    lines: list[str] = []
    for (model, (tasks, limit)), rows in sorted(scoped.items(), key=lambda item: (item[0][0], item[0][1][0],
                                                                                 _none_last(item[0][1][1]))):
        where = f"{', '.join(tasks)}" + (f"; first {limit} documents per task" if limit else "")
        lines += [f"## Mean zero-shot accuracy (%): {model}", "", f"Tasks: {where}.", ""]
        lines += pivot(rows, lambda r: r.mean_acc, 2, 100.0) + [""]
        lines += [f"### Zero-shot accuracy per task (%): {model}", ""]
        body = [[r.name, METHOD_LABELS.get(r.method, r.method), MISSING if r.dense else r.setting_label]
                + [_fmt(r.acc.get(t), 2, 100.0) for t in tasks] + [_fmt(r.mean_acc, 2, 100.0)] for r in rows]
        lines += _markdown(["name", "method", "sparsity"] + list(tasks) + ["mean"], body, ["l"] * 3 + ["r"] * (len(tasks) + 1))
        lines.append("")
    return lines


def _write_text(path: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_report(results_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``summary.md``, ``summary.csv`` and the plots into ``results_dir``; return
    ``{file name: path}`` of everything written."""
    folder = Path(results_dir)
    results = load_results(folder)
    written: dict[str, Path] = {}

    recipes = sorted({r.recipe for r in results if r.recipe})
    title = ", ".join(recipes) if recipes else folder.name
    lines = [f"# Results: {title}", ""]
    description = _recipe_description(folder, results)
    if description:
        lines += [description, ""]
    files = len({r.file.split("#")[0] for r in results})
    lines += [f"Generated by `llmprune report` from {files} result files in this folder "
              "(tables and plots come only from those files).", ""]
    for label, values in (("Versions", sorted({r.versions for r in results if r.versions})),
                          ("Machine", sorted({r.machine for r in results if r.machine}))):
        if values:
            lines += [f"{label}: {'; '.join(values)}.", ""]

    plots: list[tuple[str, Path]] = []
    scopes = ppl_scopes(results)
    slugs = _scope_slugs(scopes)
    for scope, rows in scopes.items():
        dataset = scope[1]
        heading = _scope_title(*scope)
        lines += [f"## {heading}", ""]
        lines += pivot(rows, lambda r, d=dataset: r.ppl.get(d)) + [""]
        for kind, fn in (("ppl_vs_sparsity", plot_sparsity), ("ppl_by_pattern", plot_pattern),
                         ("ppl_vs_nsamples", plot_nsamples), ("ppl_by_group_metric", plot_group_metric)):
            path = fn(rows, dataset, heading, folder / f"{kind}_{slugs[scope]}.png")
            if path is not None:
                plots.append((heading, path))
                written[path.name] = path

    lines += _zeroshot_sections(results)
    lines += ["## All runs", ""] + _run_table(results) + [""]
    if plots:
        lines += ["## Plots", ""]
        for heading, path in plots:
            lines += [f"![{heading}]({path.name})", ""]
    md = _write_text(folder / SUMMARY_MD, "\n".join(lines).rstrip("\n") + "\n")
    csv_path = _write_text(folder / SUMMARY_CSV, summary_csv(results))
    return {SUMMARY_MD: md, SUMMARY_CSV: csv_path, **dict(sorted(written.items()))}


__all__ = ["write_report", "load_results", "pivot", "choose_layout", "summary_csv", "Result"]
