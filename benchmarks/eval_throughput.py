"""Throughput of ``evaluate_perplexity`` against a plain Hugging Face forward loop.

Both run over the same windows of the same evaluation stream; the plain loop does
``model(ids).logits`` and nothing else (under ``torch.inference_mode``, as any evaluation
would). Each is warmed up once, then timed ``--repeats`` times in alternation (order swapped every
repeat); the best time of each is kept, which damps noise from other processes on the machine.
Target: ratio >= 0.95.

    python benchmarks/eval_throughput.py --model smollm2-135m --dataset ptb --seqlen 2048 --windows 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as llmprune/__init__.py does
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmprune.data import DATA_DIR_ENV, eval_tokens  # noqa: E402
from llmprune.evaluation.perplexity import evaluate_perplexity  # noqa: E402
from llmprune.models import load_model  # noqa: E402

TARGET = 0.95


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="ptb")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is far steadier on a busy "
                             "shared machine")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each, alternating; best kept")
    parser.add_argument("--data-dir",
                        default=os.environ.get(DATA_DIR_ENV) or str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    tokens = eval_tokens(args.dataset, tokenizer, args.seqlen, data_dir=args.data_dir)
    windows = min(args.windows, tokens.numel() // args.seqlen)
    batches = tokens[: windows * args.seqlen].view(windows, args.seqlen).split(args.batch_size)
    device = model.get_input_embeddings().weight.device
    n_tokens = windows * args.seqlen

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn):
        """(wall seconds, process CPU seconds, fn's value)."""
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn()
        sync()
        return time.perf_counter() - wall, time.process_time() - cpu, value

    def plain() -> None:
        with torch.inference_mode():
            for ids in batches:
                model(ids.to(device))

    def ours() -> float:
        return evaluate_perplexity(model, tokenizer, args.dataset, args.seqlen, data_dir=args.data_dir,
                                   batch_size=args.batch_size, max_windows=windows, progress=False).ppl

    # warm-up once each (kernels, allocator, the cached token stream)
    plain()
    ours()
    runs: dict[str, list] = {"plain": [], "ours": []}
    ppl = float("nan")
    for rep in range(args.repeats):
        order = ("plain", "ours") if rep % 2 == 0 else ("ours", "plain")  # neither always goes first
        for name in order:
            wall, cpu, value = timed(plain if name == "plain" else ours)
            runs[name].append((wall, cpu))
            if name == "ours":
                ppl = value

    def best(name: str, which: int) -> float:
        return min(run[which] for run in runs[name])

    plain_times = [w for w, _ in runs["plain"]]
    our_times = [w for w, _ in runs["ours"]]
    plain_tps, our_tps = n_tokens / best("plain", 0), n_tokens / best("ours", 0)
    ratio = our_tps / plain_tps
    cpu_ratio = best("plain", 1) / best("ours", 1)
    dev = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"cpu ({torch.get_num_threads()} threads)")
    print(f"model {args.model} ({args.dtype}) on {dev}; {args.dataset} seqlen {args.seqlen}, "
          f"{windows} windows, batch {args.batch_size}, best of {args.repeats}")
    print(f"plain HF forward:     {plain_tps:10.1f} tokens/s  "
          f"(runs: {', '.join(f'{t:.2f}s' for t in plain_times)})")
    print(f"evaluate_perplexity:  {our_tps:10.1f} tokens/s  "
          f"(runs: {', '.join(f'{t:.2f}s' for t in our_times)})  ppl {ppl:.3f}")
    print(f"ratio {ratio:.3f} (target >= {TARGET}) {'OK' if ratio >= TARGET else 'BELOW TARGET'}; "
          f"by process CPU time {cpu_ratio:.3f} (less sensitive to other processes on a shared machine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
