"""Peak memory and wall time of ``make demo``, and of its perplexity evaluation alone (full vs chunked).

    python benchmarks/demo_memory.py                 # the demo, then the evaluation 2 x 2, interleaved
    python benchmarks/demo_memory.py --skip-demo --rounds 1
    PYTHONPATH=/some/checkout python benchmarks/demo_memory.py   # measure another copy of llmprune

Every measurement is its own subprocess, so each peak is that process's own: the kernel's high-water
mark of its resident set (``ru_maxrss`` from ``os.wait4``), not a sample that could miss the peak. For
the demo, a thread also samples the child's RSS (``/proc/<pid>/status``) every 0.2 s and files each
sample under the phase the child last announced on stderr (its progress lines), so the table says which
phase holds the peak. The evaluation runs load SmolLM2 (float32) and the WikiText-2 stream once, note the peak
so far, then score the demo's 16 windows at batch 4 with ``logits_chunk=None`` (every logit of a batch
at once, as before) or in chunks (``--chunks``, default: the library's); the modes alternate so a change
in the machine's load falls on all. Wall times count: the machine may be shared, so the load average is
printed with them. The phase table is coarse: a phase is named only once its first progress line is out,
so what runs before that line (e.g. the first evaluation batch) is filed under "after" the previous loop.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["prune", "--model", "smollm2-135m", "--method", "wanda", "--sparsity", "0.5", "--calib", "c4",
        "--nsamples", "8", "--seqlen", "2048", "--seed", "0", "--eval", "wikitext2", "--max-windows", "16",
        "--batch-size", "1"]
TARGET_MB = 1.5 * 1024  # the target for the demo's peak RSS (1.5 GB, read as GiB: the looser)
MB = 2**20


def _rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # the process has just ended
        return None
    return None


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_measured(cmd: list[str], env: dict, trace: bool = False) -> dict:
    """Run ``cmd``; its exit code, wall time, peak RSS and (``trace``) the peak per announced phase."""
    start = time.perf_counter()
    # not from the checkout's root: `python -m` puts the working directory first on sys.path, which
    # would shadow a PYTHONPATH copy of llmprune being measured
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=tempfile.gettempdir())
    phase = ["start"]
    phases: dict[str, dict] = {}
    out_chunks: list[bytes] = []
    err_lines: list[str] = []

    def read_stderr() -> None:
        buffer = b""
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            buffer += chunk
            *lines, buffer = re.split(rb"[\r\n]", buffer)  # tqdm bars redraw with \r: each is a line
            for raw in lines:
                line = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", raw.decode(errors="replace")).strip()
                if line:
                    err_lines.append(line)
                    # the phase is the progress line's description: the text before ':' (or the line);
                    # once a loop says it is done (plain line or full tqdm bar), what follows is "after" it
                    name = line.split(":")[0][:54]
                    finished = ": done," in line or "100%|" in line
                    phase[0] = f"after {name}" if finished else name

    def read_stdout() -> None:
        out_chunks.append(proc.stdout.read())

    def sample() -> None:
        while proc.returncode is None:
            rss = _rss_bytes(proc.pid)
            if rss is None:
                break
            now = time.perf_counter() - start
            entry = phases.setdefault(phase[0], {"first_s": now, "start_mb": rss / MB, "peak_mb": 0.0})
            entry["peak_mb"] = max(entry["peak_mb"], rss / MB)
            entry["last_s"] = now
            time.sleep(0.2)

    threads = [threading.Thread(target=read_stderr, daemon=True),
               threading.Thread(target=read_stdout, daemon=True)]
    if trace:
        threads.append(threading.Thread(target=sample, daemon=True))
    for thread in threads:
        thread.start()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not every child's so far
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    for thread in threads:
        thread.join(timeout=5)
    return {"rc": proc.returncode, "seconds": seconds, "peak_mb": usage.ru_maxrss / 1024,  # KiB on Linux
            "stdout": b"".join(out_chunks).decode(errors="replace"), "stderr": err_lines, "phases": phases}


def demo(env: dict, out: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "llmprune", *DEMO, "--json", str(Path(tmp) / "demo.json")]
        load_before = _load()
        print(f"demo: llmprune {' '.join(DEMO)} (load before: {load_before})", flush=True)
        result = run_measured(cmd, env, trace=True)
        record = json.loads((Path(tmp) / "demo.json").read_text()) if result["rc"] == 0 else {}
    if result["rc"] != 0:
        print("\n".join(result["stderr"][-15:]))
        raise SystemExit(f"the demo failed with exit code {result['rc']}")
    verdict = "within" if result["peak_mb"] <= TARGET_MB else "ABOVE"
    print(f"demo: peak RSS {result['peak_mb']:.0f} MiB ({verdict} the {TARGET_MB:.0f} MiB target), "
          f"wall {result['seconds']:.1f} s, load after: {_load()}")
    ppl = {name: row.get("ppl") for name, row in (record.get("perplexity") or {}).items()}
    if ppl:
        print(f"demo: perplexity {ppl}")
    if out:
        dense_rows = (record.get("dense") or {}).get("perplexity") or {}
        dense = {name: row.get("ppl") for name, row in dense_rows.items()}
        summary = {"command": "make demo", "args": DEMO, "peak_rss_mib": round(result["peak_mb"], 1),
                   "target_mib": TARGET_MB, "wall_s": round(result["seconds"], 1),
                   "prune_s": round((record.get("prune") or {}).get("seconds", float("nan")), 1),
                   "load_before": load_before, "load_after": _load(), "cpus": os.cpu_count(),
                   "perplexity": ppl, "dense_perplexity": dense, "versions": record.get("versions")}
        Path(out).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    print(f"  {'phase (last stderr line before the samples)':<62} {'from s':>7} {'to s':>7} "
          f"{'RSS at start':>12} {'peak MiB':>9}")
    for name, entry in result["phases"].items():
        print(f"  {name:<62} {entry['first_s']:7.1f} {entry.get('last_s', entry['first_s']):7.1f} "
              f"{entry['start_mb']:12.0f} {entry['peak_mb']:9.0f}")


def evaluation(env: dict, rounds: int, chunks: list[str]) -> None:
    print(f"\nevaluation alone: SmolLM2 float32, WikiText-2, 16 windows x 2048, batch 4 "
          f"(load before: {_load()})", flush=True)
    rows = []
    for _ in range(rounds):
        for mode in ("full", *chunks):
            result = run_measured([sys.executable, __file__, "--child-eval", mode], env)
            if result["rc"] != 0:
                print("\n".join(result["stderr"][-15:]))
                raise SystemExit(f"the {mode} evaluation failed with exit code {result['rc']}")
            child = json.loads(result["stdout"].strip().splitlines()[-1])
            rows.append(child | {"peak_mb": result["peak_mb"], "load": _load()})
            growth = result["peak_mb"] - child["peak_before_mb"]
            label = mode if mode == "full" else f"chunk {mode}"
            print(f"  {label:<10} ppl {child['ppl']:<20} eval {child['seconds']:6.1f} s   "
                  f"peak RSS {result['peak_mb']:6.0f} MiB   (before the evaluation: "
                  f"{child['rss_before_mb']:.0f} MiB now, {child['peak_before_mb']:.0f} MiB peak)   "
                  f"growth {growth:6.0f} MiB   load {_load()}", flush=True)
    first = rows[0]
    print(f"  model load (same in every run): RSS {first['rss_imports_mb']:.0f} MiB after the imports, peak "
          f"{first['peak_load_mb']:.0f} MiB while loading, {first['rss_before_mb']:.0f} MiB once loaded")
    same = {row["ppl"] for row in rows}
    print(f"  identical perplexity in every run: {len(same) == 1} ({', '.join(sorted(same))})")


def child_eval(mode: str) -> None:
    """One evaluation in this process; prints one JSON line."""
    import resource

    from llmprune.data import eval_tokens
    from llmprune.evaluation.perplexity import LOGITS_CHUNK, perplexity
    from llmprune.models import load_model

    rss_imports = _rss_bytes(os.getpid())
    model, tokenizer = load_model("smollm2-135m", dtype="float32")
    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the load's own peak
    tokens = eval_tokens("wikitext2", tokenizer, 2048)
    rss_before = _rss_bytes(os.getpid())
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    chunk = None if mode == "full" else int(mode) if mode.isdigit() else LOGITS_CHUNK
    result = perplexity(model, tokens, 2048, batch_size=4, max_windows=16, progress=False,
                        dataset="wikitext2", logits_chunk=chunk)
    print(json.dumps({"mode": mode, "ppl": repr(result.ppl), "seconds": result.seconds,
                      "rss_imports_mb": rss_imports / MB, "peak_load_mb": peak_load,
                      "rss_before_mb": rss_before / MB, "peak_before_mb": peak_before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-demo", action="store_true", help="only the evaluation comparison")
    parser.add_argument("--skip-eval", action="store_true", help="only the demo")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the evaluation modes (default 2)")
    parser.add_argument("--chunks", default="default",
                        help="comma-separated logits chunks (positions) to compare with the full logits; "
                             "'default' is the library's (default)")
    parser.add_argument("--json", help="write the demo's figures here (eval/results/demo_smollm2.json: the "
                                       "README's demo line is generated from it)")
    parser.add_argument("--child-eval", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_eval:
        child_eval(args.child_eval)
        return
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the Makefile: the cores may be shared
    env.setdefault("LLMPRUNE_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    env.setdefault("LLMPRUNE_PROGRESS_SECONDS", "1")  # frequent plain lines: finer phases in the trace
    where = subprocess.run([sys.executable, "-c", "import llmprune; print(llmprune.__file__)"], env=env,
                           cwd=tempfile.gettempdir(), capture_output=True, text=True).stdout.strip()
    print(f"python {sys.executable}; llmprune from {where}; {os.cpu_count()} CPUs; load average {_load()}")
    if not args.skip_demo:
        demo(env, args.json)
    if not args.skip_eval:
        evaluation(env, args.rounds, [c.strip() for c in args.chunks.split(",") if c.strip()])


if __name__ == "__main__":
    main()
