"""Plots of perplexity from parsed results, one PNG per kind and scope.

perplexity vs sparsity per method (log y) when unstructured sparsity varies, grouped bars per
pattern when N:M columns are present, perplexity vs calibration samples (log2 x) when
``nsamples`` varies, grouped bars when the comparison group or metric varies. Each function
returns None when its comparison is not in the results. Results that differ only in their
calibration seed are one point or bar: their mean, with error bars of ±1 sample standard deviation
(``tables.merge_seeds``); with one seed per setting nothing changes.

matplotlib's object API on the Agg canvas: no global pyplot state, no display needed. PNGs are
saved without the "Software" stamp, so the same results and matplotlib give the same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from llmprune.io import write_atomic
from llmprune.report.tables import (
    KNOBS,
    Stat,
    knob_order,
    merge_seeds,
    method_key,
    method_label,
    seed_groups,
    varies_within_method,
)
from llmprune.results import MISSING, Result


def new_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def finish_figure(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, grid_axis: str = "both",
                  grid_which: str = "major") -> Path:
    """Labels, title, grid and legend, then a tight layout saved atomically as PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis=grid_axis, which=grid_which, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return write_atomic(path, lambda f: fig.savefig(f, format="png", metadata={"Software": None}))


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _dense_line(ax, dense: list[Result], dataset: str) -> None:
    if dense and _finite(dense[0].ppl.get(dataset)):
        ax.axhline(dense[0].ppl[dataset], color="gray", linestyle="--", linewidth=1, label="Dense")


def _merged(results: list[Result], dataset: str) -> list[tuple[Result, Stat]]:
    """The results with a finite perplexity on ``dataset``, one per seed group (its mean and spread)."""
    return [(r, stat) for r, stat in merge_seeds(results, lambda r: r.ppl.get(dataset)) if _finite(stat.mean)]


def _series(results: list[Result], layout_knobs: list[str], x: Callable[[Result], Any],
            dataset: str) -> dict[tuple, tuple[str, list[tuple[Any, float, float]]]]:
    """Lines keyed by method and the other varying knobs; points ``(x, mean, std)`` sorted by x (the
    std 0 for a single result)."""
    lines: dict[tuple, tuple[str, list]] = {}
    for r, stat in _merged(results, dataset):
        key = (method_key(r),) + tuple(knob_order(k, r.knob(k)) for k in layout_knobs)
        extra = [f"{k}={r.knob_label(k)}" for k in layout_knobs if r.knob(k) is not None]
        label = method_label(r) + (f" ({', '.join(extra)})" if extra else "")
        points = lines.setdefault(key, (label, []))[1]
        if all(px != x(r) for px, _, _ in points):
            points.append((x(r), stat.mean, stat.std or 0.0))
    return {k: (label, sorted(points)) for k, (label, points) in sorted(lines.items())}


def _line(ax, points: list[tuple[Any, float, float]], label: str) -> None:
    """A line with a marker per point, and ±1 std error bars where a point is a mean over seeds."""
    xs, ys, errs = [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]
    if any(errs):
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
    else:
        ax.plot(xs, ys, marker="o", label=label)


def _bars(ax, xs: list[float], ys: list[float], errs: list[float], width: float, label: str) -> None:
    if any(errs):
        ax.bar(xs, ys, width=width, label=label, yerr=errs, capsize=3)
    else:
        ax.bar(xs, ys, width=width, label=label)


def log_y(ax) -> None:
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
    others = [k for k in KNOBS if varies_within_method(pruned, k)]
    fig, ax = new_figure()
    for label, points in _series(pruned, others, lambda r: round(r.sparsity * 100, 6), dataset).values():
        _line(ax, points, label)
    _dense_line(ax, [r for r in results if r.dense], dataset)
    log_y(ax)
    return finish_figure(fig, ax, path, "unstructured sparsity (%)", f"{dataset} perplexity (log scale)",
                         title, grid_which="both")


def plot_nsamples(results: list[Result], dataset: str, title: str, path: Path) -> Path | None:
    """Perplexity vs number of calibration samples (log2 x), one line per method."""
    pruned = [r for r in results if not r.dense and r.nsamples is not None]
    if not varies_within_method(pruned, "nsamples"):
        return None
    others = [k for k in ("setting",) + KNOBS if k != "nsamples" and varies_within_method(pruned, k)]
    fig, ax = new_figure()
    ticks: set[int] = set()
    for label, points in _series(pruned, others, lambda r: r.nsamples, dataset).values():
        _line(ax, points, label)
        ticks.update(p[0] for p in points)
    _dense_line(ax, [r for r in results if r.dense], dataset)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks))
    ax.set_xticklabels([str(t) for t in sorted(ticks)])
    return finish_figure(fig, ax, path, "calibration samples", f"{dataset} perplexity", title)


def plot_pattern(results: list[Result], dataset: str, title: str, path: Path) -> Path | None:
    """Grouped bars for a paper-style table with N:M columns: pattern on x, one bar per method (log y)."""
    pruned = [r for r in results if not r.dense and _finite(r.ppl.get(dataset))]
    if not any(r.nm is not None for r in pruned) or not varies_within_method(pruned, "setting"):
        return None
    others = [k for k in KNOBS if varies_within_method(pruned, k)]
    settings = sorted({(r.setting, r.setting_label) for r in pruned})
    columns = [label for _, label in settings]
    bars = _series(pruned, others, lambda r: r.setting, dataset)
    fig, ax = new_figure()
    width = 0.8 / max(len(bars), 1)
    for j, (label, points) in enumerate(bars.values()):
        where = {key: i for i, (key, _) in enumerate(settings)}
        xs = [where[p[0]] + (j - (len(bars) - 1) / 2) * width for p in points]
        _bars(ax, xs, [p[1] for p in points], [p[2] for p in points], width, label)
    _dense_line(ax, [r for r in results if r.dense], dataset)
    log_y(ax)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns)
    return finish_figure(fig, ax, path, "sparsity pattern", f"{dataset} perplexity (log scale)", title,
                         grid_axis="y", grid_which="both")


def plot_group_metric(results: list[Result], dataset: str, title: str, path: Path) -> Path | None:
    """Grouped bars: comparison group on x, one bar per metric (and method)."""
    pruned = [r for r in results if not r.dense and _finite(r.ppl.get(dataset))]
    if not (varies_within_method(pruned, "group") or varies_within_method(pruned, "metric")):
        return None
    others = [k for k in ("setting",) + KNOBS if k not in ("group", "metric")
              and varies_within_method(pruned, k)]
    groups = sorted({r.group for r in pruned}, key=lambda g: knob_order("group", g))
    bars: dict[tuple, tuple[str, dict]] = {}
    merged = _merged(pruned, dataset)
    for r, stat in merged:
        key = (method_key(r), knob_order("metric", r.metric))
        key += tuple(knob_order(k, r.knob(k)) for k in others)
        extra = [f"{k}={r.knob_label(k)}" for k in others if r.knob(k) is not None]
        label = f"{method_label(r)}, metric {r.knob_label('metric')}"
        label += f" ({', '.join(extra)})" if extra else ""
        bars.setdefault(key, (label, {}))[1].setdefault(r.group, stat)
    fig, ax = new_figure()
    width = 0.8 / max(len(bars), 1)
    for j, (label, values) in enumerate(v for _, v in sorted(bars.items())):
        xs = [i + (j - (len(bars) - 1) / 2) * width for i, g in enumerate(groups) if g in values]
        shown = [values[g] for g in groups if g in values]
        _bars(ax, xs, [s.mean for s in shown], [s.std or 0.0 for s in shown], width, label)
    _dense_line(ax, [r for r in results if r.dense], dataset)
    heights = [stat.mean for _, stat in merged]
    if max(heights) > 10 * min(heights):  # e.g. the activation-only metric: keep the others readable
        log_y(ax)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([MISSING if g is None else str(g) for g in groups])
    return finish_figure(fig, ax, path, "comparison group", f"{dataset} perplexity", title, grid_axis="y")


def plot_block_sparsity(results: list[Result], dataset: str, title: str, path: Path) -> Path | None:
    """Measured sparsity per decoder block, one line per run with a non-uniform allocation, and
    the uniform runs' target as a dashed line for each setting."""
    allocated = [r for r in results if not r.dense and r.block_sparsity and
                 (len(set(round(s, 4) for s in r.block_sparsity)) > 1 and r.variant
                  and r.variant[0] in ("owl", "depth"))]
    if not allocated:
        return None
    fig, ax = new_figure()
    for group in sorted(seed_groups(allocated), key=lambda g: (g[0].setting, method_key(g[0]))):
        r = group[0]
        label = f"{method_label(r)} {r.setting_label}"
        blocks = [Stat.of([100 * m.block_sparsity[i] for m in group])
                  for i in range(min(len(m.block_sparsity) for m in group))]
        if len(group) == 1:
            ax.plot(range(len(blocks)), [b.mean for b in blocks], marker=".", label=label)
        else:  # the seeds' mean per block, ±1 std
            ax.errorbar(range(len(blocks)), [b.mean for b in blocks], yerr=[b.std for b in blocks],
                        marker=".", capsize=2, label=label)
    for setting, _label in sorted({(r.setting, r.setting_label) for r in allocated}):
        target = next(r.sparsity for r in allocated if r.setting == setting)
        ax.axhline(100 * target, color="gray", linestyle="--", linewidth=0.8)
    return finish_figure(fig, ax, path, "decoder block", "sparsity (%)",
                         title.replace("Perplexity on", "Sparsity per block; runs evaluated on"))


# (file-name prefix, plot function) in the order the report lists them
def plot_cost(results: list[Result], dataset: str, title: str, path: Path) -> Path | None:
    """Perplexity against pruning cost (forwards of the decoder stack, log x), one marker shape per
    sparsity setting, each point a method (the mean over its seeds, ±1 std both ways), labelled."""
    pruned = [r for r in results if not r.dense and r.cost is not None]
    key = lambda r: r.seed_group or r.file  # noqa: E731 (a seed group's merged result is a new object)
    ppl = {key(r): stat for r, stat in _merged(pruned, dataset)}
    points = [(r, ppl[key(r)], stat) for r, stat in merge_seeds(pruned, lambda r: r.cost)
              if key(r) in ppl and stat.mean > 0]
    if len(points) < 2:
        return None
    fig, ax = new_figure()
    for marker, setting in zip("osD^v<>p*h", sorted({r.setting for r, _, _ in points})):
        mine = [(r, p, c) for r, p, c in points if r.setting == setting]
        ax.errorbar([c.mean for _, _, c in mine], [p.mean for _, p, _ in mine],
                    xerr=[c.std or 0.0 for _, _, c in mine], yerr=[p.std or 0.0 for _, p, _ in mine],
                    fmt=marker, capsize=2, label=mine[0][0].setting_label)
        for r, p, c in mine:
            ax.annotate(method_label(r), (c.mean, p.mean), fontsize=5, xytext=(2, 2),
                        textcoords="offset points")
    _dense_line(ax, [r for r in results if r.dense], dataset)
    ax.set_xscale("log")
    log_y(ax)
    return finish_figure(fig, ax, path, "pruning cost (decoder-stack forwards, log scale)",
                         f"{dataset} perplexity (log scale)", title, grid_which="both")


PLOTS = (("ppl_vs_sparsity", plot_sparsity), ("ppl_by_pattern", plot_pattern), ("ppl_vs_cost", plot_cost),
         ("ppl_vs_nsamples", plot_nsamples), ("ppl_by_group_metric", plot_group_metric),
         ("sparsity_per_block", plot_block_sparsity))
