"""Cost and accuracy of the distance to the dense model (``--eval-kl``) on SmolLM2, in one run.

1. The dense model's pass over the first ``--windows`` WikiText-2 windows writes the top-k cache
   (timed against a plain dense pass: the recording overhead), for k = 8, 32 and 128.
2. Wanda 50% (8 x 2048 C4 calibration, seed 0) prunes the model.
3. Cost: the pruned model's plain perplexity pass and its pass with the distance read from the k = 32
   cache, interleaved ``--reps`` times; the ratio (target <= 1.2) is the median of the per-rep ratios.
   The exact KL (dense model in memory, run again) is timed once beside them.
4. Error of the approximation: the top-k KL's mean and percentiles against the exact KL's on the same
   positions, for each k; top-1 agreement from the cache against the exact one.
5. Cache size: bytes per position measured, and for WikiText-2's every window.

    python benchmarks/kl_cost.py --json eval/results/kl_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmprune.config import CalibConfig, PruneConfig  # noqa: E402
from llmprune.data import calibration_windows, eval_tokens  # noqa: E402
from llmprune.engine import prune  # noqa: E402
from llmprune.evaluation.distance import DenseSide, model_fingerprint  # noqa: E402
from llmprune.evaluation.perplexity import perplexity  # noqa: E402
from llmprune.models import load_model  # noqa: E402
from llmprune.results import machine, versions  # noqa: E402

KS = (8, 32, 128)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--json", required=True)
    args = parser.parse_args()

    model, tok = load_model(args.model, dtype="float32", seqlen=args.seqlen)
    tokens = eval_tokens("wikitext2", tok, args.seqlen, args.data_dir)
    full_windows = tokens.numel() // args.seqlen
    key = model_fingerprint(model)
    cache = Path(tempfile.mkdtemp(prefix="kl_cost_"))
    out = {"args": vars(args), "versions": versions(), "machine": machine(), "load_start": os.getloadavg()[0]}

    def ppl(m, dense=None):
        return perplexity(m, tokens, args.seqlen, max_windows=args.windows, progress=False,
                          dataset="wikitext2", dense=dense)

    # 1. the dense side: recording overhead (interleaved with a plain dense pass) and the caches
    plain_dense, t_plain = timed(lambda: ppl(model))
    record = {}
    for k in KS:
        result, seconds = timed(lambda k=k: ppl(model, DenseSide(key, cache, topk=k, record=True)))
        assert result.ppl == plain_dense.ppl
        record[k] = seconds
    files = {k: next((cache / "kl").glob(f"*-top{k}-*.pt")) for k in KS}
    positions = args.windows * args.seqlen
    out["dense"] = {"ppl": plain_dense.ppl, "plain_seconds": t_plain,
                    "record_seconds": {str(k): record[k] for k in KS},
                    "record_ratio": {str(k): record[k] / t_plain for k in KS},
                    "cache_bytes": {str(k): files[k].stat().st_size for k in KS},
                    "cache_bytes_per_position": {str(k): files[k].stat().st_size / positions for k in KS},
                    "cache_bytes_full_wikitext2": {str(k): round(files[k].stat().st_size / positions
                                                                 * full_windows * args.seqlen) for k in KS},
                    "full_wikitext2_windows": full_windows}
    dense_copy = load_model(args.model, dtype="float32", seqlen=args.seqlen)[0]  # the same weights, for exact

    # 2. prune
    calib = calibration_windows("c4", tok, 8, args.seqlen, 0, args.data_dir)
    config = PruneConfig(method="wanda", sparsity=0.5, calib=CalibConfig(dataset="c4", nsamples=8,
                                                                          seqlen=args.seqlen, seed=0))
    out["prune_seconds"] = prune(model, tok, config, windows=calib, progress=False).seconds

    # 3. cost, interleaved
    plain_s, cached_s, ratios = [], [], []
    for _ in range(args.reps):
        plain, a = timed(lambda: ppl(model))
        with_kl, b = timed(lambda: ppl(model, DenseSide(key, cache, topk=32)))
        assert with_kl.ppl == plain.ppl  # the distance never changes the perplexity
        plain_s.append(a)
        cached_s.append(b)
        ratios.append(b / a)
    exact, t_exact = timed(lambda: ppl(model, DenseSide(key, cache, topk=32, model=dense_copy)))
    out["cost"] = {"plain_seconds": plain_s, "kl_cached_seconds": cached_s, "ratios": ratios,
                   "ratio_median": statistics.median(ratios), "target": 1.2,
                   "exact_seconds": t_exact, "exact_ratio": t_exact / statistics.median(plain_s),
                   "pruned_ppl": plain.ppl}

    # 4. the approximation's error against the exact KL
    d = exact.distance
    errors = {"exact": {"kl_mean": d.kl_mean, "kl_p90": d.kl_p90, "kl_p99": d.kl_p99, "kl_p999": d.kl_p999,
                        "top1_agreement": d.top1_agreement}}
    for k in KS:
        approx = ppl(model, DenseSide(key, cache, topk=k)).distance
        errors[f"top{k}"] = {
            "kl_mean": approx.kl_mean, "kl_p90": approx.kl_p90, "kl_p99": approx.kl_p99,
            "kl_p999": approx.kl_p999,
            "top1_agreement": approx.top1_agreement, "dense_topk_mass": approx.approx["dense_topk_mass"],
            "pruned_topk_mass": approx.approx["topk_mass"],
            "rel_error": {m: (getattr(approx, m) - getattr(d, m)) / getattr(d, m)
                          for m in ("kl_mean", "kl_p90", "kl_p99", "kl_p999")}}
    out["approximation"] = errors
    out["load_end"] = os.getloadavg()[0]
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"dense ppl {plain_dense.ppl:.3f}; pruned ppl {plain.ppl:.3f}")
    print(f"cost with the cached dense side: {statistics.median(ratios):.3f}x a plain pass (target <= 1.2); "
          f"exact {out['cost']['exact_ratio']:.2f}x")
    print(f"exact KL mean {d.kl_mean:.4f}, p99 {d.kl_p99:.4f}, top-1 {d.top1_agreement:.4f}")
    for k in KS:
        e = errors[f"top{k}"]
        print(f"top-{k:<3} KL mean {e['kl_mean']:.4f} ({e['rel_error']['kl_mean']:+.2%}), p99 "
              f"{e['kl_p99']:.4f} ({e['rel_error']['kl_p99']:+.2%}), dense mass in top-k "
              f"{e['dense_topk_mass']:.4f}, cache "
              f"{out['dense']['cache_bytes_per_position'][str(k)]:.0f} B/position, "
              f"{out['dense']['cache_bytes_full_wikitext2'][str(k)] / 2**20:.1f} MiB for all of WikiText-2")
    print(f"load average {out['load_start']:.2f} -> {out['load_end']:.2f}")


if __name__ == "__main__":
    main()
