"""The edge report: pruned, recovered, quantized models run in llama.cpp, from ``benchmarks/edge.py``'s
files (one ``NAME.json`` per model in a results folder), never typed.

* :func:`load_rows`: one row per (model, GGUF type): llama.cpp's WikiText-2 perplexity, the GGUF's
  bytes, prefill/decode tokens/s on 1 and 2 threads, their ratios to dense-q4_0 timed in the same
  run, the peak RSS;
* :func:`table_lines`, :func:`parity_lines`, :func:`answer_lines`: the markdown (``summary.md`` and
  the README's ``edge`` table);
* :func:`plot`: perplexity against decode speed and against size (the Pareto plot).

The question the table answers: does a pruned (+ recovered) + quantized model beat dense-q4_0
(quantization alone) on two of perplexity, decode speed and size without losing on the third, and
does one reach :data:`GOAL_SPEED` x its decode tokens/s at no more than :data:`GOAL_PPL` x its
perplexity?
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llmprune.errors import LlmpruneError
from llmprune.io import write_json_atomic, write_text_atomic

BASELINE = ("dense", "q4_0")
THREADS = (1, 2)
GOAL_SPEED, GOAL_PPL = 1.5, 1.3
SPEED_KEYS = ("prefill_tokens_per_s", "decode_tokens_per_s")


def load_records(folder: str | os.PathLike) -> list[dict]:
    """The per-model records of a results folder, dense first, then in the order they were made."""
    folder = Path(folder)
    records = []
    for path in sorted(folder.glob("*.json")):
        if path.name == "summary.json":
            continue
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise LlmpruneError(f"edge: {path} is not readable JSON ({exc})") from None
    if not records:
        raise LlmpruneError(f"edge: no result files in {folder}: run benchmarks/edge.py --out {folder}")
    records.sort(key=lambda r: (r.get("name") != "dense", r.get("finished", 0)))
    return records


def _row(record: dict, kind: str, gguf: dict) -> dict:
    speed = {s["threads"]: s for s in gguf["speed"]}
    row = {"model": record["name"], "type": kind, "ppl": gguf["ppl"], "bytes": gguf["bytes"],
           "blocks": record["shape"]["blocks"], "params": record["shape"]["params"],
           "recovered": "recover" in record}
    for t in THREADS:
        for key in SPEED_KEYS:
            row[f"{key}_t{t}"] = speed[t][key]
            row[f"{key}_ratio_t{t}"] = speed[t][f"{key}_vs_dense_q4_0"]
        row[f"peak_rss_mib_t{t}"] = speed[t]["peak_rss_mib"]
    return row


def load_rows(folder: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """``(rows, records)``: one row per model and GGUF type, and the records they came from."""
    records = load_records(folder)
    try:
        rows = [_row(r, kind, g) for r in records for kind, g in r["gguf"].items()]
    except (KeyError, TypeError) as exc:
        raise LlmpruneError(f"edge: a file in {folder} is not a benchmarks/edge.py record "
                            f"({type(exc).__name__}: {exc})") from None
    return rows, records


def baseline(rows: list[dict]) -> dict:
    found = [r for r in rows if (r["model"], r["type"]) == BASELINE]
    if not found:
        raise LlmpruneError("edge: no dense q4_0 row, the baseline every ratio is taken against")
    return found[0]


def table_lines(rows: list[dict], gguf_type: str | None = None) -> list[str]:
    """The table of every row (or of the rows of one GGUF type), with the ratios to dense-q4_0."""
    base = baseline(rows)
    if gguf_type is not None:
        rows = [r for r in rows if r["type"] == gguf_type]
        if not rows:
            raise LlmpruneError(f"edge: no {gguf_type} rows (the types are f16, q8_0, q4_0)")
    lines = ["| model | GGUF | WikiText-2 ppl | × dense-q4_0 | MB | × dense-q4_0 | decode tok/s (1 / 2 "
             "threads) | × dense-q4_0 (1 / 2) | prefill tok/s (2 threads) | × dense-q4_0 | peak RSS MiB |",
             "| :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['type']} | {r['ppl']:.2f} | {r['ppl'] / base['ppl']:.2f} | "
            f"{r['bytes'] / 1e6:.1f} | {r['bytes'] / base['bytes']:.2f} | "
            f"{r['decode_tokens_per_s_t1']:.1f} / {r['decode_tokens_per_s_t2']:.1f} | "
            f"{r['decode_tokens_per_s_ratio_t1']:.2f} / "
            f"{r['decode_tokens_per_s_ratio_t2']:.2f} | {r['prefill_tokens_per_s_t2']:.0f} | "
            f"{r['prefill_tokens_per_s_ratio_t2']:.2f} | {r['peak_rss_mib_t1']:.0f} |")
    return lines


def parity_lines(records: list[dict]) -> list[str]:
    lines = ["| model | blocks | parameters | transformers (float32) | llama.cpp f16 | difference |",
             "| :--- | ---: | ---: | ---: | ---: | ---: |"]
    for r in (r for r in records if "f16" in r["gguf"]):
        f16 = r["gguf"]["f16"]["ppl"]
        lines.append(f"| {r['name']} | {r['shape']['blocks']} | {r['shape']['params']:,} | "
                     f"{r['torch_ppl']:.3f} | {f16:.3f} | {f16 / r['torch_ppl'] - 1:+.3%} |")
    return lines


def _wins(row: dict, base: dict) -> tuple[int, int]:
    """(axes won, axes lost) against the baseline: perplexity, decode tokens/s (2 threads), size."""
    speed = row["decode_tokens_per_s_ratio_t2"]
    better = [row["ppl"] < base["ppl"], speed > 1.0, row["bytes"] < base["bytes"]]
    worse = [row["ppl"] > base["ppl"], speed < 1.0, row["bytes"] > base["bytes"]]
    return sum(better), sum(worse)


def _speed(row: dict) -> float:
    """Decode speed against dense-q4_0, the lower of the 1- and 2-thread ratios."""
    return min(row["decode_tokens_per_s_ratio_t1"], row["decode_tokens_per_s_ratio_t2"])


def answer_lines(rows: list[dict]) -> list[str]:
    """Which pruned rows beat dense-q4_0 on two axes without losing the third, which meet the goal,
    and, when none does, the pruned rows nearest to it on each side."""
    base = baseline(rows)
    pruned = [r for r in rows if r["model"] != BASELINE[0]]
    dominate = [r for r in pruned if _wins(r, base)[0] >= 2 and _wins(r, base)[1] == 0]
    goal = [r for r in pruned if r["ppl"] <= GOAL_PPL * base["ppl"] and _speed(r) >= GOAL_SPEED]
    names = lambda found: ", ".join(f"{r['model']} {r['type']}" for r in found)  # noqa: E731
    describe = lambda r: (f"{r['model']} {r['type']} ({r['ppl'] / base['ppl']:.2f}× the perplexity, "  # noqa: E731
                          f"{_speed(r):.2f}× the decode speed)")
    lines = [f"Against dense-q4_0 (WikiText-2 ppl {base['ppl']:.2f}, {base['bytes'] / 1e6:.1f} MB, decode "
             f"{base['decode_tokens_per_s_t2']:.1f} tok/s on 2 threads):",
             f"- better on two of perplexity, decode speed (2 threads) and size, worse on none: "
             f"{names(dominate) or 'no pruned model'};",
             f"- the goal (≥ {GOAL_SPEED}× its decode tokens/s on 1 and 2 threads at ≤ {GOAL_PPL}× its "
             f"perplexity): {names(goal) or 'not met'}"]
    if not goal and pruned:
        best_ppl = min(pruned, key=lambda r: r["ppl"])
        fastest = max(pruned, key=_speed)
        lines[-1] += (f"; the lowest perplexity of a pruned model is {describe(best_ppl)}, the fastest "
                      f"{describe(fastest)}")
    lines[-1] += "."
    return lines


def plot(rows: list[dict], path: str | os.PathLike) -> None:
    """Perplexity (log) against decode tokens/s on 2 threads and against GGUF size; dense-q8_0 and
    dense-q4_0 marked as the baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    markers = {"f16": "o", "q8_0": "s", "q4_0": "^"}
    for ax, key, label in ((axes[0], "decode_tokens_per_s_t2", "decode tokens/s in llama.cpp (2 threads)"),
                           (axes[1], "bytes", "GGUF size (MB)")):
        for r in rows:
            x = r[key] / (1e6 if key == "bytes" else 1)
            dense = r["model"] == "dense"
            ax.scatter(x, r["ppl"], marker=markers.get(r["type"], "o"), s=40 if dense else 22,
                       color="C3" if dense else ("C2" if r["recovered"] else "C0"))
            ax.annotate(f"{r['model']} {r['type']}", (x, r["ppl"]), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("WikiText-2 perplexity in llama.cpp (log)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M: red dense (o f16, s q8_0, ^ q4_0), blue pruned, green pruned + KD")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)


def write_report(folder: str | os.PathLike) -> str:
    """``summary.md``, ``summary.json`` and ``pareto.png`` in ``folder``, from its records; returns the
    markdown."""
    folder = Path(folder)
    rows, records = load_rows(folder)
    text = "\n".join(["# SmolLM2-135M at the edge: pruned, recovered, quantized, run in llama.cpp", "",
                      *table_lines(rows), "", *answer_lines(rows), "",
                      "f16 GGUF perplexity in llama.cpp against transformers on the same token ids:", "",
                      *parity_lines(records), "", "![perplexity against decode speed and size](pareto.png)",
                      ""])
    write_json_atomic(folder / "summary.json", {"rows": rows})
    write_text_atomic(folder / "summary.md", text)
    plot(rows, folder / "pareto.png")
    return text
