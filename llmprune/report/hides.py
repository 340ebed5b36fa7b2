"""What perplexity hides: perplexity beside the distances to the dense model and the task scores.

For the runs of a results folder (a recipe's, or any ``--json`` files), one row per pruned run:
the perplexity ratio to the dense model, the KL(dense || pruned) mean and 99th percentile and the
top-1 agreement (``eval.kl``), the mean zero-shot accuracy over the multiple-choice tasks, LAMBADA's
accuracy and perplexity, GSM8K's exact match, and the greedy-continuation agreement
(``eval.generate``). Then, for each of those measures, the Spearman rank correlation with the
perplexity ratio across the runs, over all runs and within each setting (same sparsity or N:M
pattern), each measure oriented so that a larger value is a worse model: a correlation of 1 means the
measure ranks the runs exactly as perplexity does; the lower it is, the more perplexity hides. The
share of discordant pairs (two runs that perplexity and the measure order differently) is given
beside it, since with few runs a correlation says little.

Torch-free, from the JSON alone, like the rest of :mod:`llmprune.report`: ``llmprune report DIR``
writes ``hides.md`` and ``hides.png`` into the folder when its runs measured a distance;
:func:`write_hides` (or :func:`main`, ``--dataset``) for another dataset.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmprune.errors import LlmpruneError
from llmprune.io import write_atomic, write_text_atomic
from llmprune.results import DENSE, is_result

# zero-shot tasks reported in their own columns, not in the multiple-choice mean
OWN_COLUMNS = ("lambada_openai", "gsm8k")


@dataclass(frozen=True)
class Measure:
    """One column: how to read it from a record, and which way is worse."""

    key: str
    label: str
    higher_is_worse: bool
    fmt: str


MEASURES = (
    Measure("ppl_ratio", "ppl / dense", True, "{:.2f}"),
    Measure("kl_mean", "KL mean", True, "{:.3f}"),
    Measure("kl_p99", "KL p99", True, "{:.2f}"),
    Measure("top1", "top-1 agree", False, "{:.1%}"),
    Measure("zeroshot", "zero-shot mean", False, "{:.1%}"),
    Measure("lambada_acc", "LAMBADA acc", False, "{:.1%}"),
    Measure("lambada_ppl", "LAMBADA ppl", True, "{:.1f}"),
    Measure("gsm8k", "GSM8K", False, "{:.1%}"),
    Measure("generation", "greedy agree", False, "{:.1%}"),
)


@dataclass
class Row:
    name: str
    method: str
    setting: str
    values: dict[str, float] = field(default_factory=dict)


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _setting(record: dict) -> str:
    pattern = record.get("pattern") or "unstructured"
    if pattern != "unstructured":
        return pattern
    return f"{round(100 * float(record.get('sparsity') or 0.0))}%"


def _run_label(record: dict) -> str:
    """The run's name without its setting suffix, e.g. ``wanda-50`` -> ``wanda``."""
    name = str(record.get("name", "?"))
    for suffix in ("-2_4", "-4_8", "-1_4", "-50", "-60", "-70", "-80"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def measures_of(record: dict, dense: dict | None, dataset: str) -> dict[str, float]:
    """Every measure :data:`MEASURES` names that ``record`` has (dense: the baseline record)."""
    out: dict[str, float] = {}
    ppl = ((record.get("perplexity") or {}).get(dataset) or {})
    base = (((dense or {}).get("perplexity") or {}).get(dataset) or {}).get("ppl")
    if _number(ppl.get("ppl")) is not None and _number(base):
        out["ppl_ratio"] = ppl["ppl"] / base
    distance = ppl.get("distance") or {}
    for key, source in (("kl_mean", "kl_mean"), ("kl_p99", "kl_p99"), ("top1", "top1_agreement")):
        if _number(distance.get(source)) is not None:
            out[key] = distance[source]
    tasks = ((record.get("zeroshot") or {}).get("tasks") or {})
    choice = [t["acc"] for name, t in tasks.items()
              if name not in OWN_COLUMNS and _number(t.get("acc")) is not None]
    if choice:
        out["zeroshot"] = sum(choice) / len(choice)
    lambada = tasks.get("lambada_openai") or {}
    if _number(lambada.get("acc")) is not None:
        out["lambada_acc"] = lambada["acc"]
    if _number(lambada.get("ppl")) is not None:
        out["lambada_ppl"] = lambada["ppl"]
    if _number((tasks.get("gsm8k") or {}).get("acc")) is not None:
        out["gsm8k"] = tasks["gsm8k"]["acc"]
    generation = record.get("generation") or {}
    if _number(generation.get("agreement")) is not None:
        out["generation"] = generation["agreement"]
    return out


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank (as Spearman's coefficient needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation: Pearson's correlation of the (tie-averaged) ranks; None below
    3 points or where one side is constant."""
    if len(x) != len(y) or len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def discordant(x: list[float], y: list[float]) -> float | None:
    """Share of pairs that ``x`` and ``y`` order in opposite directions (ties in either: not counted)."""
    pairs = bad = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 or dy == 0:
                continue
            pairs += 1
            bad += (dx > 0) != (dy > 0)
    return bad / pairs if pairs else None


def load_rows(folder: str | Path, dataset: str) -> tuple[list[Row], dict | None]:
    """The pruned runs' rows of ``folder`` and its dense record (None when it has none)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LlmpruneError(f"results folder {folder} does not exist: give the --out folder of a recipe run")
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if is_result(record):
            records.append(record)
    dense = next((r for r in records if r.get("method") == DENSE), None)
    rows = []
    for record in records:
        if record.get("method") == DENSE:
            continue
        baseline = dense if dense is not None else record.get("dense")
        rows.append(Row(name=str(record.get("name")), method=_run_label(record), setting=_setting(record),
                        values=measures_of(record, baseline, dataset)))
    if not rows:
        raise LlmpruneError(f"{folder} holds no pruned run's result: run the recipe first")
    return rows, dense


def correlations(rows: list[Row]) -> dict[str, dict[str, tuple[float | None, float | None, int]]]:
    """{scope: {measure: (spearman, discordant share, runs)}} against the perplexity ratio, each
    measure oriented so that larger is worse; scopes: "all" and each setting."""
    scopes = {"all": rows}
    for row in rows:
        scopes.setdefault(row.setting, []).append(row)
    out: dict[str, dict] = {}
    for scope, members in scopes.items():
        out[scope] = {}
        for m in MEASURES[1:]:
            both = [r for r in members if "ppl_ratio" in r.values and m.key in r.values]
            x = [r.values["ppl_ratio"] for r in both]
            y = [r.values[m.key] if m.higher_is_worse else -r.values[m.key] for r in both]
            out[scope][m.key] = (spearman(x, y), discordant(x, y), len(both))
    return out


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def run_lines(rows: list[Row]) -> list[str]:
    """The table of runs: one row per run, sorted by perplexity within each setting."""
    present = [m for m in MEASURES if any(m.key in r.values for r in rows)]
    setting_order = {s: i for i, s in enumerate(dict.fromkeys(r.setting for r in rows))}
    rows = sorted(rows, key=lambda r: (setting_order[r.setting], r.values.get("ppl_ratio", math.inf)))
    lines = ["| setting | run | " + " | ".join(m.label for m in present) + " |",
             "|---|---|" + "---:|" * len(present)]
    for r in rows:
        cells = [_cell(r.values.get(m.key), m.fmt) for m in present]
        lines.append(f"| {r.setting} | {r.method} | " + " | ".join(cells) + " |")
    return lines


def correlation_lines(rows: list[Row]) -> list[str]:
    """The rank correlations with the perplexity ratio, over all runs and within each setting."""
    shown = [m for m in MEASURES[1:] if any(m.key in r.values for r in rows)]
    lines = ["| runs | " + " | ".join(m.label for m in shown) + " |", "|---|" + "---:|" * len(shown)]
    for scope, values in correlations(rows).items():
        cells = []
        for m in shown:
            rho, bad, n = values[m.key]
            cells.append("–" if rho is None else f"{rho:+.2f} ({bad:.0%}, n={n})")
        label = "all settings" if scope == "all" else scope
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def markdown(rows: list[Row], dense: dict | None, dataset: str) -> str:
    base = (((dense or {}).get("perplexity") or {}).get(dataset) or {}).get("ppl")
    lines = [f"# What perplexity hides ({dataset})", ""]
    if base is not None:
        lines += [f"Dense {dataset} perplexity {base:.2f}. Rows sorted by perplexity within each setting.",
                  ""]
    lines += run_lines(rows)
    lines += ["", "Spearman rank correlation with the perplexity ratio (each measure oriented so that larger "
              "is worse: 1 = ranks the runs as perplexity does), and in brackets the share of run pairs "
              "the two order differently:", ""]
    lines += correlation_lines(rows)
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path, dataset: str) -> Path | None:
    """One panel per measure against the perplexity ratio (log x), a marker per setting."""
    present = [m for m in MEASURES[1:] if any(m.key in r.values for r in rows)]
    if not present:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(3, len(present))
    lines = -(-len(present) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * lines), dpi=110)
    FigureCanvasAgg(fig)
    settings = list(dict.fromkeys(r.setting for r in rows))
    markers = "osD^v<>"
    for index, m in enumerate(present):
        ax = fig.add_subplot(lines, cols, index + 1)
        for k, setting in enumerate(settings):
            pts = [r for r in rows if r.setting == setting and "ppl_ratio" in r.values and m.key in r.values]
            ax.scatter([r.values["ppl_ratio"] for r in pts], [r.values[m.key] for r in pts],
                       marker=markers[k % len(markers)], label=setting, s=22)
            for r in pts:
                ax.annotate(r.method, (r.values["ppl_ratio"], r.values[m.key]), fontsize=6,
                            xytext=(2, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(f"{dataset} perplexity / dense (log)")
        ax.set_ylabel(m.label)
        ax.grid(True, alpha=0.3)
        if index == 0:
            ax.legend(fontsize=7)
    fig.suptitle("What perplexity hides", fontsize=10)
    fig.tight_layout()
    return write_atomic(path, lambda f: fig.savefig(f, format="png", metadata={"Software": None}))


def write_hides(folder: str | Path, dataset: str = "wikitext2") -> dict[str, Path]:
    """Write ``hides.md`` (and ``hides.png`` where matplotlib is installed) into ``folder``."""
    rows, dense = load_rows(folder, dataset)
    folder = Path(folder)
    out = {"markdown": write_text_atomic(folder / "hides.md", markdown(rows, dense, dataset))}
    try:
        picture = plot(rows, folder / "hides.png", dataset)
    except ImportError:  # the plot needs the report extra; the table does not
        picture = None
    if picture is not None:
        out["plot"] = picture
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmprune.report.hides",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="a results folder (a recipe's --out)")
    parser.add_argument("--dataset", default="wikitext2", help="the perplexity dataset (default: wikitext2)")
    args = parser.parse_args(argv)
    try:
        for path in write_hides(args.folder, args.dataset).values():
            print(f"wrote {path}")
    except LlmpruneError as exc:
        print(f"llmprune: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
