"""Wall time and peak memory of pruning, against the decoder stack's plain forward, like for like.

Measured in one run on the same machine and the same calibration tokens:

* the denominator: the decoder stack alone (``model.model``: embeddings, blocks, final norm; no
  lm_head, whose logits the pruner never computes), timed at batch sizes 1 and 4 (and the
  pruner's calibration batch), and the fastest taken: the best plain way to push these tokens
  through the blocks once;
* each method's whole ``prune`` call on a fresh copy of the model, and its per-block phases
  from the prune report: the statistics pass (hooks on), score + mask (or the solver), and the
  propagation (pruned block, hooks off).

The floor is two passes (statistics, then propagation), so about 2x; the statistics pass stops
before the last Linear of each block (down_proj), so it can cost less than a block forward.

    python benchmarks/prune_speed.py --nsamples 8 --seqlen 2048 --data-dir ../shared/data
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
    """Peak extra memory while the body runs: CUDA allocator peak, or sampled process RSS."""

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def stack_forward(model, windows: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Seconds for the decoder stack (no lm_head) over every window, at ``batch_size``."""
    stack = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    _sync(device)
    start = time.perf_counter()
    for s in range(0, windows.shape[0], batch_size):
        stack(input_ids=windows[s:s + batch_size].to(device), use_cache=False)
    _sync(device)
    return time.perf_counter() - start


STEPS = {"owl": {"allocation": "owl"}, "depth": {"allocation": "depth"}, "dsnot": {"refine": "dsnot"},
         "reconstruct": {"reconstruct": True}, "permute": {"permute": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=CalibConfig().batch_size,
                        help="the pruner's calibration batch")
    parser.add_argument("--calib", default="c4")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default="wanda,sparsegpt,ria,wanda+owl,wanda+dsnot,wanda+reconstruct",
                        help="comma separated; 'name@N:M' prunes with that pattern, e.g. wanda@2:4; "
                             "'+owl', '+depth', '+dsnot', '+reconstruct', '+permute' add those steps")
    args = parser.parse_args()
    device = torch.device(args.device)

    base, tokenizer = load_model(args.model, dtype="float32", device=device, seqlen=args.seqlen)
    windows = calibration_windows(args.calib, tokenizer, args.nsamples, args.seqlen, 0, args.data_dir)
    print(f"{args.model} on {device}: {args.nsamples} x {args.seqlen} = {windows.numel()} calibration tokens, "
          f"pruner batch {args.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    stack_forward(base, windows[:1], 1, device)  # warm-up
    batches = sorted({1, 4, args.batch_size})
    timings = {b: stack_forward(base, windows, b, device) for b in batches}
    best = min(timings, key=timings.get)
    forward_s = timings[best]
    shown = ", ".join(f"batch {b}: {t:.1f} s" for b, t in timings.items())
    print(f"decoder stack forward ({shown}); denominator: batch {best}, {forward_s:.1f} s, "
          f"{forward_s / len(base.model.layers):.3f} s per block")

    print(f"{'method':<16} {'seconds':>8} {'ratio':>6}   per block: {'stats':>6} {'prune':>6} {'propagate':>9}"
          f"   (x forward per block)   peak extra memory")
    per_block_forward = forward_s / len(base.model.layers)
    for spec in args.methods.split(","):
        method, *steps = spec.split("+")  # issue 8's steps: wanda+owl, wanda+dsnot, ria@2:4+permute, ...
        method, _, pattern = method.partition("@")
        model = copy.deepcopy(base)
        config = PruneConfig(method=method, sparsity=None if pattern else 0.5, pattern=pattern or "unstructured",
                             calib=CalibConfig(nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size),
                             **{k: v for step in steps for k, v in STEPS[step].items()})
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            report = prune(model, tokenizer, config, windows=windows, progress=False, device=device)
            _sync(device)
            seconds = time.perf_counter() - t0
        phases = {k: sum(v) / len(v) for k, v in report.phase_seconds.items() if v}
        # the last block has no propagation: average that phase over the blocks that have one
        propagated = [v for v in report.phase_seconds.get("propagate", []) if v > 0]
        phases["propagate"] = sum(propagated) / len(propagated) if propagated else 0.0
        label = f"{spec.partition('@')[0].split('+')[0]}{''.join('+' + x for x in steps)} {pattern or '50%'}"
        if report.allocation and report.allocation.get("seconds"):  # OWL's dense statistics pass
            print(f"{'':<16} of which OWL's statistics pass {report.allocation['seconds']:.1f} s = "
                  f"{report.allocation['seconds'] / forward_s:.2f}x forward")
        ratios = " ".join(f"{phases[k] / per_block_forward:.2f}" for k in ("stats", "prune", "propagate"))
        print(f"{label:<16} {seconds:8.1f} {seconds / forward_s:5.2f}x   "
              f"{phases['stats']:>17.3f} {phases['prune']:>6.3f} {phases['propagate']:>9.3f}   ({ratios})"
              f"   +{mem.peak / 2**20:.0f} MiB")
        del model
        gc.collect()


if __name__ == "__main__":
    main()
