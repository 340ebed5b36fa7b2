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

``--random-weights``: no download and no data. A LLaMA-shaped model with random weights
(``--shape llama-7b``: hidden 4096, intermediate 11008, 32 heads; ``tiny`` for a CPU smoke test)
and ``--layers`` decoder blocks, calibrated on random token ids (128 x 2048 unless
``--nsamples``/``--seqlen`` say otherwise). Per decoder block it prints the plain block forward
and, for Wanda, Wanda 2:4 and SparseGPT, llmprune's seconds next to the literal reference
procedure's (``benchmarks/reference_protocol.py``: one sample at a time, the official
``add_batch`` statistics, masks and ``fasterprune``), with the ratios reference / ours and
SparseGPT / Wanda:

    python benchmarks/prune_speed.py --random-weights --shape llama-7b --layers 8 --device cuda
    python benchmarks/prune_speed.py --random-weights --shape tiny --layers 2 --nsamples 2 --seqlen 128 \\
        --device cpu
"""

from __future__ import annotations

import argparse
import copy
import gc
import re
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from llmprune.config import CalibConfig, PruneConfig  # noqa: E402
from llmprune.data import calibration_windows  # noqa: E402
from llmprune.engine import prune  # noqa: E402
from llmprune.models import load_model  # noqa: E402


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


# --random-weights shapes (LlamaConfig fields); llama-7b is LLaMA-7B's width, tiny runs on a CPU
SHAPES = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4,
                 vocab_size=32000),
}
RANDOM_METHODS = "wanda,wanda@2:4,sparsegpt"


def random_model(shape: str, layers: int, seqlen: int, device: torch.device):
    """A float32 LlamaForCausalLM of ``shape`` with ``layers`` blocks and random weights, built on
    ``device`` directly (a 7B-width model would take minutes to initialise on a CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], num_hidden_layers=layers, max_position_embeddings=max(seqlen, 2048))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.float().eval()


class _Timed:
    """Seconds spent in the reference's ``name`` (a function of reference_protocol, replaced by a
    timing wrapper while the body runs, so reference_prune runs unchanged)."""

    def __init__(self, module, name: str, device: torch.device):
        self.module, self.name, self.device, self.seconds = module, name, device, 0.0

    def __enter__(self):
        inner = self.original = getattr(self.module, self.name)

        def timed(*args, **kwargs):
            _sync(self.device)
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                _sync(self.device)
                self.seconds += time.perf_counter() - start

        setattr(self.module, self.name, timed)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.original)


def random_weights_main(args) -> None:
    """Per-block seconds of llmprune against the reference procedure on a random-weight model."""
    import reference_protocol as ref

    device = torch.device(args.device)
    nsamples, seqlen = args.nsamples or 128, args.seqlen or 2048
    base = random_model(args.shape, args.layers, seqlen, device)
    windows = torch.randint(0, base.config.vocab_size, (nsamples, seqlen),
                            generator=torch.Generator().manual_seed(0))
    dims = SHAPES[args.shape]
    print(f"random-weight {args.shape} (hidden {dims['hidden_size']}, intermediate "
          f"{dims['intermediate_size']}, {dims['num_attention_heads']} heads, {args.layers} blocks, float32) "
          f"on {device}: {nsamples} x {seqlen} = "
          f"{windows.numel()} random calibration tokens, pruner batch {args.batch_size}, reference batch 1, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    stack_forward(base, windows[:1], 1, device)  # warm-up
    timings = {b: stack_forward(base, windows, b, device) / args.layers
               for b in sorted({1, 4, args.batch_size})}
    best = min(timings, key=timings.get)
    forward = timings[best]
    print(f"block forward: {forward:.3f} s per block (batch {best}; "
          + ", ".join(f"batch {b}: {t:.3f} s" for b, t in timings.items()) + ")")

    print(f"{'per block, s':<14} {'ours':>7} {'stats':>7} {'prune':>7} {'propagate':>9}   "
          f"{'reference':>9} {'solve':>7}   {'reference / ours':>16} {'solve':>7}   {'ours x forward':>14}")
    rows = {}
    for spec in (args.methods or RANDOM_METHODS).split(","):
        method, _, pattern = spec.partition("@")
        n, m = (int(x) for x in pattern.split(":")) if pattern else (0, 0)
        model = copy.deepcopy(base)
        config = PruneConfig(method=method, sparsity=None if pattern else 0.5,
                             pattern=pattern or "unstructured",
                             calib=CalibConfig(nsamples=nsamples, seqlen=seqlen, batch_size=args.batch_size))
        _sync(device)
        t0 = time.perf_counter()
        report = prune(model, None, config, windows=windows, progress=False, device=device)
        _sync(device)
        ours = (time.perf_counter() - t0) / args.layers
        phases = {k: sum(v) / len(v) for k, v in report.phase_seconds.items() if v}
        # the last block has none
        propagated = [v for v in report.phase_seconds.get("propagate", []) if v > 0]
        phases["propagate"] = sum(propagated) / len(propagated) if propagated else 0.0
        del model
        gc.collect()

        model = copy.deepcopy(base)
        solver = "ref_sparsegpt" if method == "sparsegpt" else "ref_wanda_mask"
        with _Timed(ref, solver, device) as solve:
            _sync(device)
            t0 = time.perf_counter()
            # the reference's prune_n counts zeros: N:M keeps N, so it prunes M - N
            ref.reference_prune(model, windows.to(device), method, 0.5, m - n if pattern else 0, m)
            _sync(device)
            reference = (time.perf_counter() - t0) / args.layers
        del model
        gc.collect()

        label = f"{method} {pattern or '50%'}"
        rows[label] = (phases["prune"], ours, solve.seconds / args.layers, reference)
        print(f"{label:<14} {ours:7.3f} {phases['stats']:7.3f} {phases['prune']:7.3f} "
              f"{phases['propagate']:9.3f}   "
              f"{reference:9.3f} {solve.seconds / args.layers:7.3f}   {reference / ours:15.2f}x "
              f"{solve.seconds / args.layers / phases['prune']:6.2f}x   {ours / forward:13.2f}x", flush=True)
    if "sparsegpt 50%" in rows and "wanda 50%" in rows:
        (sp, st, rsp, rst), (wp, wt, rwp, rwt) = rows["sparsegpt 50%"], rows["wanda 50%"]
        print(f"sparsegpt / wanda per block: ours {st / wt:.2f}x (prune step {sp / wp:.1f}x), "
              f"reference {rst / rwt:.2f}x (solve {rsp / rwp:.1f}x)")


STEPS = {"owl": {"allocation": "owl"}, "depth": {"allocation": "depth"}, "dsnot": {"refine": "dsnot"},
         "reconstruct": {"reconstruct": True}, "permute": {"permute": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=None, help="default 8 (--random-weights: 128)")
    parser.add_argument("--seqlen", type=int, default=None, help="default 2048")
    parser.add_argument("--batch-size", type=int, default=CalibConfig().batch_size,
                        help="the pruner's calibration batch")
    parser.add_argument("--calib", default="c4")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", default=None,
                        help="comma separated; 'name@N:M' prunes with that pattern, e.g. wanda@2:4; "
                             "'+owl', '+depth', '+dsnot', '+reconstruct', '+permute' add those steps "
                             "(default: wanda,sparsegpt,ria,wanda+owl,wanda+dsnot,wanda+reconstruct; "
                             f"--random-weights: {RANDOM_METHODS}; wanda and sparsegpt only)")
    parser.add_argument("--random-weights", action="store_true",
                        help="a random-weight LLaMA-shaped model and random tokens instead of "
                             "--model and --calib")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="with --random-weights: the model's width (default llama-7b)")
    parser.add_argument("--layers", type=int, default=None,
                        help="with --random-weights: decoder blocks (default 8)")
    args = parser.parse_args()
    if args.random_weights:
        args.shape, args.layers = args.shape or "llama-7b", args.layers or 8
        specs = (args.methods or RANDOM_METHODS).split(",")
        bad = [s for s in specs if s.partition("@")[0] not in ("wanda", "sparsegpt")]
        if bad:
            parser.error("--random-weights times the reference procedure next to ours, for wanda and "
                         f"sparsegpt only: drop {', '.join(bad)}")
        random_weights_main(args)
        return
    if args.shape is not None or args.layers is not None:
        parser.error("--shape and --layers need --random-weights")
    args.nsamples = 8 if args.nsamples is None else args.nsamples
    args.seqlen = 2048 if args.seqlen is None else args.seqlen
    args.methods = args.methods or "wanda,sparsegpt,ria,wanda+owl,wanda+dsnot,wanda+reconstruct"
    device = torch.device(args.device)

    base, tokenizer = load_model(args.model, dtype="float32", device=device, seqlen=args.seqlen)
    windows = calibration_windows(args.calib, tokenizer, args.nsamples, args.seqlen, 0, args.data_dir)
    print(f"{args.model} on {device}: {args.nsamples} x {args.seqlen} = {windows.numel()} calibration "
          f"tokens, pruner batch {args.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    stack_forward(base, windows[:1], 1, device)  # warm-up
    batches = sorted({1, 4, args.batch_size})
    timings = {b: stack_forward(base, windows, b, device) for b in batches}
    best = min(timings, key=timings.get)
    forward_s = timings[best]
    shown = ", ".join(f"batch {b}: {t:.1f} s" for b, t in timings.items())
    print(f"decoder stack forward ({shown}); denominator: batch {best}, {forward_s:.1f} s, "
          f"{forward_s / len(base.model.layers):.3f} s per block")

    print(f"{'method':<16} {'seconds':>8} {'ratio':>6}   per block: {'stats':>6} {'prune':>6} "
          f"{'propagate':>9}   (x forward per block)   peak extra memory")
    per_block_forward = forward_s / len(base.model.layers)
    for spec in args.methods.split(","):
        # steps: wanda+owl, wanda+dsnot, ria@2:4+permute, ...; a "+" inside a name (wanda++) is no step
        method, *steps = re.split(r"\+(?=[a-z])", spec)
        method, _, pattern = method.partition("@")
        model = copy.deepcopy(base)
        config = PruneConfig(method=method, sparsity=None if pattern else 0.5,
                             pattern=pattern or "unstructured",
                             calib=CalibConfig(nsamples=args.nsamples, seqlen=args.seqlen,
                                               batch_size=args.batch_size),
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
        label = f"{method}{''.join('+' + x for x in steps)} {pattern or '50%'}"
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
