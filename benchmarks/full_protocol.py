"""The full WikiText-2 protocol on SmolLM2: every window, llmprune's evaluator beside the reference loop.

For the dense model and for each pruned variant (pruned by llmprune from the same dense weights),
the perplexity over *all* non-overlapping 2048-token windows of the WikiText-2 raw test file is
computed twice: by :func:`llmprune.evaluate_perplexity` (chunked output head, float32 losses) and by
the literal reference loop of ``benchmarks/reference_protocol.py`` (``eval_ppl_wikitext``: one
window at a time, full logits, ``nll = loss * seqlen``). Each row is written to ``--json`` as soon as
it is measured, so a stopped run keeps what it finished.

    python benchmarks/full_protocol.py --json eval/results/full_protocol_wikitext2.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from reference_protocol import reference_ppl  # noqa: E402

from llmprune.config import CalibConfig, PruneConfig  # noqa: E402
from llmprune.data import calibration_windows, eval_tokens  # noqa: E402
from llmprune.engine import prune  # noqa: E402
from llmprune.evaluation.perplexity import perplexity  # noqa: E402
from llmprune.models import load_model  # noqa: E402
from llmprune.results import machine, versions  # noqa: E402

VARIANTS = {"dense": None, "wanda-50": ("wanda", "unstructured"), "wanda-2:4": ("wanda", "2:4"),
            "sparsegpt-50": ("sparsegpt", "unstructured")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-windows", type=int, default=None, help="None: every window (the protocol)")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    base, tokenizer = load_model(args.model, dtype="float32", seqlen=args.seqlen)
    tokens = eval_tokens("wikitext2", tokenizer, args.seqlen, args.data_dir)
    windows = calibration_windows("c4", tokenizer, args.nsamples, args.seqlen, args.seed, args.data_dir)
    dense_state = {k: v.clone() for k, v in base.state_dict().items()}
    out = {"args": vars(args), "versions": versions(), "machine": machine(), "rows": []}
    for name in args.variants.split(","):
        base.load_state_dict(dense_state)
        row = {"variant": name, "load_before": os.getloadavg()[0]}
        if VARIANTS[name] is not None:
            method, pattern = VARIANTS[name]
            config = PruneConfig(method=method, pattern=pattern,
                                 sparsity=0.5 if pattern == "unstructured" else None,
                                 calib=CalibConfig(dataset="c4", nsamples=args.nsamples, seqlen=args.seqlen,
                                                   seed=args.seed))
            row["prune_seconds"] = prune(base, tokenizer, config, windows=windows, progress=False).seconds
        with torch.inference_mode():
            t0 = time.perf_counter()
            ours = perplexity(base, tokens, args.seqlen, max_windows=args.max_windows, progress=False,
                              dataset="wikitext2")
            t1 = time.perf_counter()
            ref = reference_ppl(base, tokens, args.seqlen, args.max_windows)
            t2 = time.perf_counter()
        row.update(windows=ours.windows, tokens=ours.tokens, llmprune_ppl=ours.ppl, reference_ppl=ref,
                   rel_diff=(ours.ppl - ref) / ref, llmprune_seconds=t1 - t0, reference_seconds=t2 - t1,
                   load_after=os.getloadavg()[0])
        out["rows"].append(row)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"{name:<14} windows {ours.windows}  llmprune {ours.ppl:10.4f}  reference {ref:10.4f}  "
              f"diff {row['rel_diff']:+.5%}", flush=True)


if __name__ == "__main__":
    main()
