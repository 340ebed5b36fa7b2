"""Wall time and peak memory of pruning, against one plain forward over the same tokens.

Measured in one run on the same machine: a plain ``model(ids).logits`` pass over the calibration
windows (batched as the pruner batches them), then Wanda 50% and SparseGPT 50% on fresh copies.
The floor is about 2x (one pass to collect statistics, one to propagate); the target for Wanda
is <= 2.2x.

    python benchmarks/prune_speed.py --nsamples 32 --seqlen 2048
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmprune.config import CalibConfig, PruneConfig  # noqa: E402
from llmprune.data import calibration_windows  # noqa: E402
from llmprune.models import load_model  # noqa: E402
from llmprune.pipeline import prune  # noqa: E402


class PeakMemory:
    """Peak extra memory while the block runs: CUDA allocator peak, or sampled process RSS."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import psutil

            self.proc = psutil.Process()
            self.base = self.proc.memory_info().rss
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calib", default="c4")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    args = parser.parse_args()
    device = torch.device(args.device)

    base, tokenizer = load_model(args.model, dtype="float32", device=device, seqlen=args.seqlen)
    windows = calibration_windows(args.calib, tokenizer, args.nsamples, args.seqlen, 0, args.data_dir)
    tokens = windows.numel()
    print(f"{args.model} on {device}: {args.nsamples} x {args.seqlen} = {tokens} calibration tokens, "
          f"batch {args.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    with torch.no_grad():  # warm-up
        base(windows[:1].to(device)).logits
    with PeakMemory(device) as mem, torch.no_grad():
        t0 = time.perf_counter()
        for s in range(0, args.nsamples, args.batch_size):
            base(windows[s:s + args.batch_size].to(device), use_cache=False).logits
        if device.type == "cuda":
            torch.cuda.synchronize()
        forward_s = time.perf_counter() - t0
    forward_mem = mem.peak
    print(f"{'plain forward':<14} {forward_s:8.1f} s  peak +{forward_mem / 2**20:8.0f} MiB")

    for method in args.methods.split(","):
        model = copy.deepcopy(base)
        config = PruneConfig(method=method, sparsity=0.5,
                             calib=CalibConfig(nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size))
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            prune(model, tokenizer, config, windows=windows, progress=False, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        print(f"{method + ' 50%':<14} {seconds:8.1f} s  peak +{mem.peak / 2**20:8.0f} MiB   "
              f"time ratio {seconds / forward_s:.2f}x  memory ratio {mem.peak / max(forward_mem, 1):.2f}x")
        del model
        gc.collect()


if __name__ == "__main__":
    main()
