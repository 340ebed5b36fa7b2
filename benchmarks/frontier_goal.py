"""The frontier's goal, measured: is a training-free combination >= 10% lower in WikiText-2
perplexity than SparseGPT at 60%, 70% and 2:4 (mean over calibration seeds 0, 1, 2, outside one
standard deviation) at no more than 2x SparseGPT's pruning cost? Reads the result files of
``recipes/frontier_smollm2.yaml`` (cost: each run's pruning time over its own decoder-stack
forward, measured in the same run) and prints every row against SparseGPT, and the ratio of
SparseGPT's cost to Wanda's where both were run.

    python benchmarks/frontier_goal.py [eval/results/frontier_smollm2]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmprune.report import load_results  # noqa: E402
from llmprune.report.frontier import cells, goal_table  # noqa: E402


def main(folder: str) -> None:
    results = load_results(folder)
    print("\n".join(goal_table(results)))
    by = {(c.label, c.setting): c for c in cells(results, "wikitext2")}
    for (label, setting), c in sorted(by.items()):
        wanda = by.get(("Wanda", setting))
        if label == "SparseGPT" and wanda is not None and c.cost and wanda.cost:
            print(f"\nSparseGPT / Wanda cost at {setting}: {c.cost.mean / wanda.cost.mean:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "eval" / "results" / "frontier_smollm2"))
