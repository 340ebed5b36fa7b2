"""Depth pruning against the literal published procedures, on SmolLM2-135M and the same calibration windows.

* ShortGPT (icip-cas/ShortGPT, ``shortgpt/shortgpt.py`` + ``metrics.py``): the model is run with
  ``output_hidden_states=True`` on 256-token strides of each text (each stride a separate forward,
  no context carried over, as its ``eval_importance`` does); per block, BI = 1 - cos(h_i, h_i+1)
  per token, summed over every token of every stride; the n blocks with the lowest sums go
  (``np.argsort(importances)[:n]``). Re-implemented here literally from that description, on the
  8 calibration windows of 2048 tokens llmprune draws (C4 sample, seed 0), cut into 256-token strides.
* The same BI on the whole 2048-token windows (llmprune's choice), through transformers'
  ``output_hidden_states`` instead of llmprune's block loop.
* Gromov et al. (no code released): ``output_hidden_states=True`` on the whole windows; for each
  start l, the mean over windows of arccos(cos(h_l, h_l+n)) / pi on the last token; the smallest
  start wins, blocks l..l+n-1 go.

Each is compared with ``llmprune.prune`` (``--method shortgpt`` / ``angular``) on the same windows:
the blocks removed, the largest difference of the per-block scores, and where the two choose
differently, the WikiText-2 perplexity (first 4 windows of 2048) of both shallower models.

    python benchmarks/reference_depth.py --json eval/results/reference_depth.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import llmprune  # noqa: E402
from llmprune.data import calibration_windows, eval_tokens  # noqa: E402
from llmprune.engine.drop import remove_blocks  # noqa: E402
from llmprune.evaluation.perplexity import perplexity  # noqa: E402
from llmprune.io import write_json_atomic  # noqa: E402
from llmprune.results import machine, versions  # noqa: E402


@torch.no_grad()
def hidden_states(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """transformers' hidden states of one forward, float64 on the CPU (the last after the final norm)."""
    return [h.double() for h in model(ids, output_hidden_states=True).hidden_states]


def official_bi(model, windows: torch.Tensor, stride: int) -> list[float]:
    """ShortGPT's importances: sum over strides and tokens of 1 - cos(h_i, h_i+1)."""
    sums = None
    for window in windows:
        for start in range(0, window.numel(), stride):
            states = hidden_states(model, window[None, start:start + stride])
            bi = [float((1 - torch.nn.functional.cosine_similarity(states[i], states[i + 1], dim=-1)).sum())
                  for i in range(len(states) - 1)]
            sums = bi if sums is None else [a + b for a, b in zip(sums, bi)]
    return sums


def full_window_scores(model, windows: torch.Tensor, ns: list[int]) -> tuple[list[float], dict]:
    """BI (mean over tokens) and Gromov's distances for each n, from whole windows."""
    cos_sum, count, last = None, 0, None
    for window in windows:
        states = hidden_states(model, window[None])
        cos = [float(torch.nn.functional.cosine_similarity(states[i], states[i + 1], dim=-1).sum())
               for i in range(len(states) - 1)]
        cos_sum = cos if cos_sum is None else [a + b for a, b in zip(cos_sum, cos)]
        count += window.numel()
        rows = [s[0, -1] for s in states]
        last = [[r] for r in rows] if last is None else [acc + [r] for acc, r in zip(last, rows)]
    bi = [1 - c / count for c in cos_sum]
    distances = {}
    for n in ns:
        distances[n] = []
        for start in range(len(last) - n):
            d = [math.acos(max(-1.0, min(1.0, float(a @ b / (a.norm() * b.norm()))))) / math.pi
                 for a, b in zip(last[start], last[start + n])]
            distances[n].append(sum(d) / len(d))
    return bi, distances


def lowest(scores: list[float], n: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda i: scores[i])[:n])


def ppl_without(model, removed: list[int], ids, seqlen: int, windows: int) -> float:
    shallow = copy.deepcopy(model)
    remove_blocks(shallow, removed)
    return perplexity(shallow, ids, seqlen, max_windows=windows, progress=False).ppl


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("LLMPRUNE_DATA_DIR"))
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--blocks", default="4,8")
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    ns = [int(n) for n in args.blocks.split(",")]
    model, tok = llmprune.load_model("smollm2-135m", dtype="float32")
    windows = calibration_windows("c4", tok, args.nsamples, args.seqlen, 0, args.data_dir)
    ids = eval_tokens("wikitext2", tok, args.seqlen, data_dir=args.data_dir)
    official = official_bi(model, windows, args.stride)
    bi_full, distances = full_window_scores(model, windows, ns)
    rows = []
    for method in ("shortgpt", "angular"):
        for n in ns:
            pruned = copy.deepcopy(model)
            report = llmprune.prune(pruned, tok, llmprune.PruneConfig(method=method, remove_blocks=n),
                                    windows=windows, progress=False)
            ours = report.depth["removed_blocks"]
            if method == "shortgpt":
                refs = {"official (256-token strides)": (lowest(official, n), None),
                        "literal, whole windows": (lowest(bi_full, n), bi_full)}
                mine = report.depth["block_influence"]
            else:
                start = min(range(len(distances[n])), key=lambda s: distances[n][s])
                refs = {"literal (Gromov et al.)": (list(range(start, start + n)), distances[n])}
                mine = report.depth["angular_distance"]
            ours_ppl = None
            for name, (chosen, scores) in refs.items():
                row = {"method": method, "blocks": n, "reference": name, "ours": ours,
                       "reference_blocks": chosen, "same_blocks": chosen == ours,
                       "max_score_diff": (max(abs(a - b) for a, b in zip(mine, scores)) if scores else None)}
                if chosen != ours:
                    ours_ppl = ours_ppl or ppl_without(model, ours, ids, args.seqlen, args.eval_windows)
                    row["ppl_ours"] = ours_ppl
                    row["ppl_reference"] = ppl_without(model, chosen, ids, args.seqlen, args.eval_windows)
                    row["rel_diff"] = row["ppl_ours"] / row["ppl_reference"] - 1
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_json_atomic(args.json, {"rows": rows, "official_bi_sums": official, "bi_full_windows": bi_full,
                                  "args": vars(args), "machine": machine(), "versions": versions()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
