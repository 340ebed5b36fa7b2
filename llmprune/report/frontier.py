"""The frontier's goal, read from its result files: which training-free combination is at least 10%
below SparseGPT in perplexity at 60%, 70% and 2:4, by the mean over calibration seeds and outside
one standard deviation, at no more than 2× SparseGPT's pruning cost (both in forwards of the
decoder stack, measured in each run). ``goal_table`` is the README/docs table
(``python -m llmprune.report.readme``: ``frontier_goal``) and ``benchmarks/frontier_goal.py``'s output.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmprune.report.tables import Stat, merge_seeds, method_label
from llmprune.results import Result

GOAL_GAIN = 0.10  # at least 10% lower perplexity than SparseGPT
GOAL_COST = 2.0  # at no more than 2x its cost
SETTINGS = ("60%", "70%", "2:4")
BASELINE = "SparseGPT"


@dataclass
class Cell:
    label: str  # "SparseGPT", "Wanda+ADMM"
    setting: str  # "60%"
    ppl: Stat
    cost: Stat | None


def cells(results: list[Result], dataset: str) -> list[Cell]:
    """One cell per method and setting: perplexity and cost, each the mean over its seeds."""
    pruned = [r for r in results if not r.dense and dataset in r.ppl]
    key = lambda r: r.seed_group or r.file  # noqa: E731 (a merged seed group is a new object)
    costs = {key(r): stat for r, stat in merge_seeds(pruned, lambda r: r.cost)}
    return [Cell(method_label(r), r.setting_label, stat, costs.get(key(r)))
            for r, stat in merge_seeds(pruned, lambda r, d=dataset: r.ppl.get(d))]


def meets(cell: Cell, base: Cell) -> tuple[bool, str]:
    """Whether ``cell`` reaches the goal against ``base`` (SparseGPT in the same setting), and why not."""
    gain = 1 - cell.ppl.mean / base.ppl.mean
    ratio = cell.cost.mean / base.cost.mean if cell.cost is not None and base.cost is not None else None
    apart = cell.ppl.mean + (cell.ppl.std or 0.0) < base.ppl.mean - (base.ppl.std or 0.0)
    seeds = cell.ppl.n >= 3 and base.ppl.n >= 3
    why = [w for w, bad in (("< 10% lower", gain < GOAL_GAIN), ("within one std", not apart),
                            ("cost unknown", ratio is None), ("over 2x the cost", ratio is not None
                                                               and ratio > GOAL_COST),
                            ("fewer than 3 seeds", not seeds)) if bad]
    return not why, ", ".join(why)


def goal_table(results: list[Result], dataset: str = "wikitext2") -> list[str]:
    """Every row against SparseGPT in the goal's settings: perplexity (mean ± std, seeds), the
    difference, the cost ratio, and whether it meets the goal."""
    all_cells = [c for c in cells(results, dataset) if c.setting in SETTINGS]
    base = {c.setting: c for c in all_cells if c.label == BASELINE}
    rows = []
    for c in sorted(all_cells, key=lambda c: (SETTINGS.index(c.setting), c.label != BASELINE,
                                              c.ppl.mean)):
        b = base.get(c.setting)
        if b is None:
            continue
        ratio = (f"{c.cost.mean / b.cost.mean:.2f}×" if c.cost is not None and b.cost is not None else "-")
        if c is b:
            rows.append(f"| {c.setting} | {c.label} | {_stat(c.ppl)} | - | {ratio} | (the baseline) |")
            continue
        ok, why = meets(c, b)
        rows.append(f"| {c.setting} | {c.label} | {_stat(c.ppl)} | {1 - c.ppl.mean / b.ppl.mean:+.1%} "
                    f"| {ratio} | {'yes' if ok else 'no: ' + why} |")
    header = ["| setting | method | perplexity (mean ± std, n seeds) | lower than SparseGPT by | cost / "
              "SparseGPT's | meets the goal |", "| :--- | :--- | ---: | ---: | ---: | :--- |"]
    return header + rows


def _stat(stat: Stat) -> str:
    if stat.std is None:
        return f"{stat.mean:.2f} (n=1)"
    return f"{stat.mean:.2f} ± {stat.std:.2f} (n={stat.n})"
