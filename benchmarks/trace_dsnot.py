"""Trace where llmprune's DSnoT masks and the literal official procedure's part, on block 0.

The block check of ``reference_frontier.py`` finds DSnoT layers that differ by tens of weights
from identical block inputs. Block 0 reads the embeddings, which both sides compute alike, so
the only thing that can differ there is the statistics: the official WrappedGPT keeps running
means (one sample at a time), llmprune sums and divides once. This script collects both on
block 0 of SmolLM2 and, per layer and sparsity, runs llmprune's ``refine.dsnot``

* on the reference's own statistics (the procedure alone: 0 weights should differ), and
* on llmprune's statistics (what the block check compares),

reporting how far the statistics differ (relative), how many weights of the initial Wanda masks
differ, and how many weights and rows of the DSnoT masks differ from the reference's.

    python benchmarks/trace_dsnot.py --data-dir ../shared/data > eval/results/dsnot_trace_block0.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_frontier import RefStats, hooked_pass, ref_dsnot_mask  # noqa: E402
from reference_protocol import add_protocol_args, layer0_inputs, load_protocol  # noqa: E402

from llmprune.math.dsnot import dsnot  # noqa: E402
from llmprune.stats import Accumulator  # noqa: E402


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()


def _masks(weight, x_mean, var, norm, sparsity):
    """The official initial Wanda mask (lowest int(in * s) per row, stable order) and DSnoT's."""
    wanda = weight.abs() * torch.sqrt(norm).reshape(1, -1)
    k = int(weight.shape[1] * sparsity)
    lowest = torch.sort(wanda, dim=1, stable=True)[1][:, :k]
    start = torch.zeros_like(weight, dtype=torch.bool).scatter_(1, lowest, True)
    return start, dsnot(weight, start, x_mean, var, wanda)[0]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers",
                        default="self_attn.q_proj,self_attn.k_proj,self_attn.v_proj,self_attn.o_proj")
    parser.add_argument("--sparsities", default="0.5,0.7")
    add_protocol_args(parser, nsamples=8, max_windows=8)
    args = parser.parse_args()
    base, _, windows, _ = load_protocol(args)
    inps, kw = layer0_inputs(base, windows)
    block = base.model.layers[0]
    layers = {n: block.get_submodule(n) for n in args.layers.split(",")}
    ref = {n: RefStats(m, hessian=False) for n, m in layers.items()}
    ours = {n: Accumulator(m.in_features, m.weight.device, ("norms", "moments"))
            for n, m in layers.items()}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: ours[n].add(a[0].detach()))
             for n, m in layers.items()]
    try:
        hooked_pass(block, inps, kw, ref)  # one window at a time, as llmprune at calibration batch 1
    finally:
        for h in hooks:
            h.remove()
    print(f"{args.model} block 0, {len(windows)} x {args.seqlen} {args.calib} windows, seed {args.seed}")
    for name, layer in layers.items():
        r, o = ref[name], ours[name]
        mine = (o.x_sum / o.windows, o.var_sum / o.windows, o.sq_norm / o.windows)
        print(f"{name}: statistics, largest relative difference: mean {_rel(mine[0], r.sum_metric_row):.1e}, "
              f"variance {_rel(mine[1], r.var):.1e}, squared norm {_rel(mine[2], r.scaler_row):.1e}")
        for s in map(float, args.sparsities.split(",")):
            reference = ref_dsnot_mask(name, r, s)
            start_ref, on_ref = _masks(layer.weight, r.sum_metric_row, r.var, r.scaler_row, s)
            start_own, on_own = _masks(layer.weight, *mine, s)
            differ = on_own != reference
            print(f"  {s:.0%}: on the reference's statistics {int((on_ref != reference).sum())} weights "
                  "differ; on llmprune's: initial Wanda masks differ in "
                  f"{int((start_own != start_ref).sum())} weights, DSnoT masks in {int(differ.sum())} "
                  f"weights of {int(differ.any(dim=1).sum())} row(s)")


if __name__ == "__main__":
    main()
