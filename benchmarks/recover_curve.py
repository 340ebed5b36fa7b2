"""Perplexity against training minutes of ``llmprune recover`` (kd and LoRA) on pruned SmolLM2.

Runs, each skipped when its output is already there (so the script resumes):

1. the dense model's PTB perplexity (``llmprune eval``), the baseline of the gap;
2. Wanda pruning per pattern (``llmprune prune --save``: 8 x 2048 C4-sample windows, seed 0);
3. ``llmprune recover`` per pattern and method for ``--minutes`` of the process's CPU time
   (``--max-cpu-minutes``: a budget the other jobs of a shared machine do not eat; constant
   learning rate after warmup, so every point of a curve is where a shorter run would have
   ended), PTB evaluated before, every ``--eval-every`` steps and after;
4. the plot (PTB perplexity vs training CPU minutes) and ``summary.md`` from the result JSONs.

Every command is printed and written to ``summary.md``. The evaluation protocol is the
smollm2_cpu recipe's: the first 16 PTB test windows of 2048 tokens.

    python benchmarks/recover_curve.py --data-dir ../shared/data --out eval/results/recover_smollm2
    python benchmarks/recover_curve.py --out eval/results/recover_smollm2 --plot-only
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmprune.io import write_text_atomic  # noqa: E402
from llmprune.recover import gap_closed  # noqa: E402

EVAL = ["--max-windows", "16"]  # the smollm2_cpu protocol: first 16 PTB test windows of 2048


def _run(command: list[str], log: list[str]) -> None:
    shown = "llmprune " + shlex.join(command)
    print(f"\n$ {shown}", flush=True)
    subprocess.run([sys.executable, "-m", "llmprune", *command], check=True, cwd=ROOT)
    log.append(shown)


def _ppl(record: dict) -> float:
    return record["perplexity"]["ptb"]["ppl"]


def measure(args, log: list[str]) -> None:
    out, work = Path(args.out), Path(args.work)
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    if not (out / "dense.json").exists():
        _run(["eval", "--model", "smollm2-135m", "--dataset", "ptb", "--seqlen", "2048", "--batch-size", "4",
              *EVAL, *data, "--no-progress", "--json", str(out / "dense.json")], log)
    for pattern in args.patterns:
        slug = pattern.replace(":", "_")
        pruned = work / f"wanda-{slug}"
        if not (pruned / "llmprune.json").exists():
            _run(["prune", "--model", "smollm2-135m", "--method", "wanda", "--pattern", pattern,
                  "--calib", "c4", "--nsamples", "8", "--seqlen", "2048", "--seed", "0",
                  "--calib-batch-size", "8", "--eval", "", *data, "--no-progress", "--save", str(pruned),
                  "--overwrite"], log)
        for method in [] if args.prune_only else args.methods:
            result = out / f"wanda-{slug}-{method}.json"
            if result.exists():
                continue
            lr = args.lr_kd if method == "kd" else args.lr_lora
            _run(["recover", "--model", str(pruned), "--teacher", "smollm2-135m", "--method", method,
                  "--steps", "1000", "--max-cpu-minutes", str(args.minutes), "--seqlen", str(args.seqlen),
                  "--batch-size", str(args.batch_size), "--lr", str(lr), "--data", "c4", "--seed", "1",
                  "--eval-every", str(args.eval_every), "--checkpoint-every", "0", "--eval", "ptb",
                  "--eval-seqlen", "2048", "--eval-batch-size", "4", *EVAL, *data, "--skip-dense",
                  "--no-progress", "--json", str(result)], log)


def plot_and_summarise(args, log: list[str]) -> None:
    from llmprune.report.plots import finish_figure, log_y, new_figure

    out = Path(args.out)
    dense = _ppl(json.loads((out / "dense.json").read_text()))
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("wanda-*.json"))}
    fig, ax = new_figure()
    colors = {"unstructured": "tab:blue", "2:4": "tab:red"}
    styles = {"kd": "-", "lora": "--"}
    rows = []
    for _name, record in runs.items():
        section = record["recover"]
        method, pattern = section["config"]["method"], record["pattern"]
        curve = section["curve"]
        minutes = [p["cpu_seconds"] / 60 for p in curve]
        ppl = [p["perplexity"]["ptb"]["ppl"] for p in curve]
        label = f"Wanda {'50%' if pattern == 'unstructured' else pattern} + {method}"
        ax.plot(minutes, ppl, styles[method], marker="o", color=colors.get(pattern, "black"), label=label)
        before, after = ppl[0], ppl[-1]
        closed = gap_closed(dense, before, after)
        along = "; ".join(f"{m:.1f} CPU min: {p:.2f}" for m, p in zip(minutes[1:-1], ppl[1:-1])) or "-"
        rows.append(f"| {label} | {before:.2f} | {along} | {after:.2f} | {closed:.1%} | "
            f"{section['steps_done']} | {section['tokens']} | {section['seconds'] / 60:.1f} | "
            f"{section['cpu_seconds'] / 60:.1f} | {section['config']['lr']:g} | "
            f"{section['sparsity_before']:.4%} → {section['sparsity_after']:.4%} |")
    ax.axhline(dense, color="gray", linestyle=":", linewidth=1, label=f"Dense ({dense:.2f})")
    log_y(ax)
    finish_figure(fig, ax, out / "ppl_vs_minutes.png", "training CPU minutes (process CPU time, 2 threads)",
                  "PTB perplexity (16 x 2048)", "SmolLM2-135M: recovery after Wanda pruning, zeros kept")
    header = ("| run | PTB before | along the way | PTB after | gap to dense closed | steps | tokens | "
              "train min (wall) | train min (CPU) | lr | sparsity before → after |")
    summary = [
        "# Recovery of pruned SmolLM2-135M on a 2-core CPU",
        "",
        f"Dense PTB perplexity {dense:.2f} (first 16 test windows of 2048 tokens). Each run trains for about "
        f"{args.minutes:g} minutes of its own CPU time (`--max-cpu-minutes`; 2 threads, so about half that "
        f"in wall time on an idle machine), {args.seqlen}-token C4-sample windows, batch {args.batch_size}, "
        "seed 1 (the pruning calibration used seed 0), constant learning rate after 5 warmup steps. PTB "
        "evaluation time is not counted. The budget is CPU time, which other jobs on the machine do not eat; "
        "wall minutes depend on the load at the time (the Wanda 50% kd run shared the machine with other "
        "jobs, load average 8 to 12 on 2 cores; the others ran with at most one other job).",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
        *rows,
        "",
        "![PTB perplexity vs training minutes](ppl_vs_minutes.png)",
        "",
        "Commands (from the repository root):",
        "",
        "```bash",
        *log,
        "```",
        "",
    ]
    write_text_atomic(out / "summary.md", "\n".join(summary))
    print("\n".join(summary))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="eval/results/recover_smollm2")
    parser.add_argument("--work", default="/tmp/recover_smollm2",
                        help="where the pruned checkpoints go (not committed)")
    parser.add_argument("--data-dir", default=os.environ.get("LLMPRUNE_DATA_DIR"))
    parser.add_argument("--patterns", type=lambda s: s.split(","), default=["unstructured", "2:4"])
    parser.add_argument("--methods", type=lambda s: s.split(","), default=["kd", "lora"])
    parser.add_argument("--minutes", type=float, default=10.0, help="CPU minutes of training per run")
    parser.add_argument("--eval-every", type=int, default=15, help="steps between PTB evaluations")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lr-kd", type=float, default=2e-4)
    parser.add_argument("--lr-lora", type=float, default=1e-3)
    parser.add_argument("--prune-only", action="store_true",
                        help="stop after the dense evaluation and pruning")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commands = out / "commands.json"  # every command that made a result here, across resumed runs
    log: list[str] = json.loads(commands.read_text()) if commands.exists() else []
    if not args.plot_only:
        try:
            measure(args, log)
        finally:
            write_text_atomic(commands, json.dumps(log, indent=2) + "\n")
    if not args.prune_only:
        plot_and_summarise(args, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
