"""Check OWL, RIA and DSnoT (and the 2023 methods) against literal re-implementations of the
official codes, end to end and block by block.

The official repositories (luuyin/OWL ``lib/prune_all.py``, biomedical-cybernetics/
Relative-importance-and-activation-pruning ``lib/prune.py``, zyxxmu/DSnoT ``lib/prune.py``) are
forks of locuslab/wanda and share its loop: calibration samples through each block one at a time
(batch 1), running-mean statistics in forward hooks, masks per Linear, the pruned block rerun to
feed the next. Their scripts do not run on today's transformers (no rotary
``position_embeddings`` in their block calls), so this script re-implements each procedure step
by step as the code does it, without any llmprune pruning code:

* OWL-Wanda (``prune_wanda_outlier``): a dense pass, per block D = 100 * share of the block's
  concatenated Wanda scores above M * their mean; numpy normalisation
  (D - min) / (max - min) * 2 lambda, minus the mean, plus 1 - s = density; then Wanda with
  ``int(in * (1 - density))`` per row (``<= 0`` -> 0.01);
* RIA (``prune_ria``, ``--prune_method ria``): score (|W| / sum_0 |W| + |W| / sum_1 |W|) *
  sqrt(scaler_row) ** a, a = 0.5; unstructured ``score <= sorted[int(numel * s)]`` over the
  matrix; N:M ``topk`` of the ``prune_n`` lowest in every M;
* DSnoT on Wanda (``prune_DSnoT --initial_method wanda``, unstructured path): its WrappedGPT
  statistics (``sum_metric_row``, the combined variance), its two index lists and pointer
  arithmetic, ``--max_cycle_time 50 --update_threshold 0.1 --pow_of_var_regrowing 1
  --skip_layer mlp``, without the same-sign test (``--without_same_sign`` defaults to True);
* Wanda, SparseGPT, magnitude: as ``benchmarks/reference_protocol.py`` (imported from there).

For every method it prunes one copy of the model with the reference procedure and one with
``llmprune.prune`` (same windows), and reports both perplexities (the reference loop on both),
whole-model mask agreement, and the **block-level check**: while the reference prunes, each
block's *reference inputs* are fed to llmprune's own per-block step (``calibrate_and_prune`` on a
dense copy of that block, with llmprune's per-block target) and the two masks are compared. That
separates algorithm differences from float noise that the sequential propagation amplifies.

    python benchmarks/reference_frontier.py --methods owl-wanda:0.5,owl-wanda:0.7,ria:0.5,ria:2:4,\\
        dsnot-wanda:0.5,dsnot-wanda:0.7 --nsamples 8 --max-windows 8 \\
        --json eval/results/reference_frontier.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from reference_protocol import (  # noqa: E402
    add_protocol_args,
    layer0_inputs,
    linears,
    load_protocol,
    ref_sparsegpt,
    ref_wanda_mask,
    reference_ppl,
)

from llmprune.config import CalibConfig, PruneConfig  # noqa: E402
from llmprune.engine import BlockPlan, prune  # noqa: E402
from llmprune.engine.mask import block_config, calibrate_and_prune  # noqa: E402
from llmprune.engine.plan import plan_layers  # noqa: E402
from llmprune.math.allocation import BlockTargets  # noqa: E402
from llmprune.methods import block_needs, get_method  # noqa: E402


@dataclass
class Spec:
    text: str
    method: str  # wanda | sparsegpt | magnitude | ria
    sparsity: float
    n: int  # kept of M (our convention); 0 for unstructured
    m: int
    owl: bool = False
    dsnot: bool = False

    @property
    def prune_n(self) -> int:  # the official codes count zeros
        return self.m - self.n if self.m else 0

    def config(self, args) -> PruneConfig:
        pattern = f"{self.n}:{self.m}" if self.m else "unstructured"
        return PruneConfig(method=self.method, pattern=pattern, sparsity=None if self.m else self.sparsity,
                           allocation="owl" if self.owl else "uniform", owl_m=args.owl_m,
                           owl_lambda=args.owl_lambda, refine="dsnot" if self.dsnot else None,
                           calib=CalibConfig(dataset=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                                             seed=args.seed))


def parse_spec(text: str) -> Spec:
    """``[owl-|dsnot-]method:sparsity`` or ``[owl-|dsnot-]method:N:M`` (N kept of M)."""
    head, *rest = text.split(":")
    owl, dsnot = head.startswith("owl-"), head.startswith("dsnot-")
    method = head.split("-", 1)[1] if owl or dsnot else head
    if len(rest) == 2:
        n, m = int(rest[0]), int(rest[1])
        return Spec(text, method, 1 - n / m, n, m, owl, dsnot)
    return Spec(text, method, float(rest[0]) if rest else 0.5, 0, 0, owl, dsnot)


class RefStats:
    """The official WrappedGPT statistics of one Linear: Wanda's running-mean ``scaler_row``,
    SparseGPT's H, and DSnoT's ``sum_metric_row`` and combined variance."""

    def __init__(self, layer, hessian: bool):
        cols = layer.in_features
        self.layer, self.nsamples, self.ntokens = layer, 0, 0
        self.scaler_row = torch.zeros(cols)
        self.sum_metric_row = torch.zeros(cols)
        self.var = torch.zeros(cols)
        self.H = torch.zeros(cols, cols) if hessian else None

    def add_batch(self, inp):
        inp = inp.reshape(-1, inp.shape[-1]).t().float()  # (cols, tokens) of one sample
        var_inp = torch.var(inp, dim=1, unbiased=False)
        num = inp.shape[1]
        self.var = (var_inp if self.ntokens == 0
                    else (self.var * self.ntokens + var_inp * num) / (self.ntokens + num))
        self.ntokens += num
        self.scaler_row *= self.nsamples / (self.nsamples + 1)
        self.sum_metric_row *= self.nsamples / (self.nsamples + 1)
        if self.H is not None:
            self.H *= self.nsamples / (self.nsamples + 1)
        self.nsamples += 1
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples
        self.sum_metric_row += torch.sum(inp, dim=1) / self.nsamples
        if self.H is not None:
            scaled = (2 / self.nsamples) ** 0.5 * inp
            self.H += scaled.matmul(scaled.t())


def hooked_pass(block, inps, kw, stats):
    handles = [s.layer.register_forward_hook(lambda mod, a, o, s=s: s.add_batch(a[0].data))
               for s in stats.values()]
    try:
        outs = torch.zeros_like(inps)
        for j in range(inps.shape[0]):
            out = block(inps[j].unsqueeze(0), **kw)
            outs[j] = (out[0] if isinstance(out, tuple) else out)[0]
    finally:
        for h in handles:
            h.remove()
    return outs


def _wanda_metric(st: RefStats) -> torch.Tensor:
    return st.layer.weight.data.abs() * torch.sqrt(st.scaler_row.reshape(1, -1))


# ---- OWL ---------------------------------------------------------------------------------------

@torch.no_grad()
def ref_owl_density(model, inps, kw, sparsity: float, hyper_m: float, lamda: float):
    """``prune_wanda_outlier``'s first half: per block D (percent) on the dense model, then the
    density per block (``all_layer_ratio``)."""
    inps = inps.clone()
    ratios = []
    for block in model.model.layers:
        stats = {n: RefStats(m, hessian=False) for n, m in linears(block).items()}
        outs = hooked_pass(block, inps, kw, stats)
        flat = torch.cat([torch.flatten(_wanda_metric(s).cpu()) for s in stats.values()])
        ratios.append(float((flat > torch.mean(flat) * hyper_m).sum().item()) / flat.numel() * 100)
        inps = outs
    d = np.array(ratios)
    r = (d - d.min()) * (1 / (d.max() - d.min()) * lamda * 2)
    r = r - np.mean(r) + (1 - sparsity)
    return ratios, r


# ---- RIA ---------------------------------------------------------------------------------------

def ref_ria_mask(st: RefStats, sparsity: float, prune_n: int, prune_m: int, a: float = 0.5) -> torch.Tensor:
    W = st.layer.weight.data
    metric = (W.abs() / torch.sum(W.abs(), dim=0) + W.abs() / torch.sum(W.abs(), dim=1).reshape(-1, 1)) \
        * torch.sqrt(st.scaler_row.reshape(1, -1)) ** a
    if prune_n:
        return ref_wanda_mask(metric, sparsity, prune_n, prune_m)
    thresh = torch.sort(metric.flatten())[0][int(W.shape[0] * W.shape[1] * sparsity)]
    return metric <= thresh


# ---- DSnoT -------------------------------------------------------------------------------------

def _reorder(values: torch.Tensor) -> torch.Tensor:
    """``return_reorder_indice``: per row, the positions of negative values ascending, then
    position 0 for every zero, then the positions of positive values descending."""
    rows, cols = values.shape
    pos = torch.arange(cols, dtype=torch.float64).repeat(rows, 1)
    neg = pos.clone()
    pos[~(values > 0)] = float("inf")
    neg[~(values < 0)] = float("inf")
    pos = torch.flip(torch.sort(pos, dim=1)[0], dims=[1])
    neg = torch.sort(neg, dim=1)[0]
    pos[pos == float("inf")] = 0
    neg[neg == float("inf")] = 0
    return (pos + neg).to(torch.int64)


def ref_dsnot_mask(name: str, st: RefStats, sparsity: float, cycles=50, threshold=0.1, pow_regrow=1.0,
                   skip="mlp") -> torch.Tensor:
    """``prune_DSnoT`` unstructured, initial method wanda."""
    W = st.layer.weight.data
    contribution = W * st.sum_metric_row.reshape(1, -1)
    initial = _wanda_metric(st)
    order = torch.sort(initial, dim=-1, stable=True)[1]
    k = int(initial.shape[1] * sparsity)
    prune_idx, keep_idx = order[:, :k], order[:, k:]
    mask = torch.zeros_like(initial, dtype=torch.bool)
    mask.scatter_(1, prune_idx, True)
    if name.split(".")[0] == skip:
        return mask
    grow = contribution.clone()
    grow.scatter_(1, keep_idx, 0)
    error = torch.sum(grow, dim=1, keepdim=True)
    if pow_regrow:
        grow /= torch.pow(st.var.reshape(1, -1), pow_regrow)
    grow_order = torch.sort(grow, dim=1, stable=True)[1]
    wanda = _wanda_metric(st)
    wanda.scatter_(1, prune_idx, float("inf"))
    kept_by_wanda = torch.sort(wanda, dim=1, stable=True)[1][:, : initial.shape[1] - k]
    prune_list = torch.gather(kept_by_wanda, 1, _reorder(torch.gather(contribution, 1, kept_by_wanda)))
    rows = error.shape[0]
    grow_ptr = torch.zeros(rows, 2, dtype=torch.long)
    grow_ptr[:, 1] = grow_order.shape[1] - 1
    prune_ptr = torch.zeros(rows, 2, dtype=torch.long)
    prune_ptr[:, 1] = prune_list.shape[1] - 1
    step = torch.ones(rows, 2, dtype=torch.long)
    step[:, 1] = -1
    update = torch.ones_like(error, dtype=torch.bool)
    cycle = 0
    while not (torch.all(~update) or cycle >= cycles):
        cycle += 1
        side = (error > 0).long()
        at = torch.gather(grow_ptr, 1, side)
        grow_idx = torch.gather(grow_order, 1, at)
        grow_metric = contribution.gather(1, grow_idx)
        grow_ptr.scatter_(1, side, at + step.gather(1, side))
        pside = (error < 0).long()
        at_p = torch.gather(prune_ptr, 1, pside)
        prune_idx_now = torch.gather(prune_list, 1, at_p)
        prune_metric = contribution.gather(1, prune_idx_now)
        prune_ptr.scatter_(1, pside, at_p + step.gather(1, pside))
        update = update & (error.abs() > threshold)
        mask.scatter_(1, prune_idx_now, update)
        mask.scatter_(1, grow_idx, ~update)
        error += torch.where(update, prune_metric, torch.zeros_like(prune_metric))
        error -= torch.where(update, grow_metric, torch.zeros_like(grow_metric))
    return mask


# ---- the reference loop ------------------------------------------------------------------------

@torch.no_grad()
def reference_prune(model, windows, spec: Spec, args, on_block=None) -> dict:
    """Prune ``model`` in place by the official procedure for ``spec``; returns OWL's numbers."""
    layers = model.model.layers
    extra: dict = {}
    if spec.method == "magnitude":
        for block in layers:
            for layer in linears(block).values():
                W = layer.weight.data
                if spec.prune_n:
                    mask = ref_wanda_mask(W.abs(), spec.sparsity, spec.prune_n, spec.m)
                else:
                    mask = W.abs() <= torch.sort(W.abs().flatten())[0][int(W.numel() * spec.sparsity)]
                W[mask] = 0
        return extra
    inps, kw = layer0_inputs(model, windows)
    density = None
    if spec.owl:
        extra["outlier_ratio_percent"], density = ref_owl_density(model, inps, kw, spec.sparsity, args.owl_m,
                                                                  args.owl_lambda)
        extra["block_sparsity"] = [float(1 - d) for d in density]
    for i, block in enumerate(layers):
        dense = copy.deepcopy(block) if on_block else None
        block_inputs = inps.clone() if on_block else None
        stats = {n: RefStats(m, hessian=spec.method == "sparsegpt") for n, m in linears(block).items()}
        hooked_pass(block, inps, kw, stats)
        sparsity = spec.sparsity
        if density is not None:
            sparsity = 1 - density[i]
            if sparsity <= 0:
                sparsity = 0.01
        for name, st in stats.items():
            W = st.layer.weight.data
            if spec.method == "sparsegpt":
                ref_sparsegpt(st.layer, st.H, sparsity, spec.prune_n, spec.m)
                continue
            if spec.dsnot:
                mask = ref_dsnot_mask(name, st, sparsity)
            elif spec.method == "ria":
                mask = ref_ria_mask(st, sparsity, spec.prune_n, spec.m)
            else:
                mask = ref_wanda_mask(_wanda_metric(st), sparsity, spec.prune_n, spec.m)
            W[mask] = 0
        if on_block:
            on_block(i, dense, block_inputs, kw, block)
        inps = hooked_pass(block, inps, kw, {})
    return extra


def _agreement(a: torch.nn.Module, b: torch.nn.Module) -> list[float]:
    return [((p == 0) == (q == 0)).float().mean().item()
            for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()) if p.dim() == 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods",
                        default="owl-wanda:0.5,owl-wanda:0.7,ria:0.5,ria:2:4,dsnot-wanda:0.5,dsnot-wanda:0.7")
    parser.add_argument("--owl-m", type=float, default=5.0)
    parser.add_argument("--owl-lambda", type=float, default=0.08)
    parser.add_argument("--no-ppl", action="store_true", help="block-level check and mask agreement only")
    parser.add_argument("--noise-floor", action="store_true",
                        help="instead: llmprune at several calibration batch sizes (--noise-batches; 1 is "
                             "the reference's), same algorithm, only the float summation order differs")
    parser.add_argument("--noise-batches", default="8,4,2,1",
                        help="calibration batch sizes of the noise-floor run; the first is the one masks "
                             "are compared to")
    add_protocol_args(parser, nsamples=8, max_windows=8)
    args = parser.parse_args()
    base, tokenizer, windows, tokens = load_protocol(args)
    previous = {}
    if args.json and Path(args.json).is_file():  # resumable: keep the rows already measured
        previous = {r["method"]: r for r in json.loads(Path(args.json).read_text()).get("rows", [])}
    if args.noise_floor:
        return noise_floor(args, base, tokenizer, windows, tokens, previous)
    rows = []
    for text in args.methods.split(","):
        if text in previous:
            rows.append(previous[text])
            print(f"{text:<18} (kept from {args.json})", flush=True)
            write_rows(args, rows, previous)
            continue
        spec = parse_spec(text)
        config = spec.config(args)
        ours = copy.deepcopy(base)
        report = prune(ours, tokenizer, config, windows=windows, progress=False)
        alloc = report.allocation or {}
        targets = BlockTargets(alloc.get("allocation", "uniform"), alloc.get("block_sparsity", []),
                               alloc.get("block_keep"))
        plans = plan_layers(base, config)
        method, needs = get_method(config.method), block_needs(config)
        per_block = []

        def check_block(i, dense, inputs, kw, ref_block, plans=plans, needs=needs, config=config,
                        targets=targets, method=method, per_block=per_block):
            names = list(plans[i].layers)
            plan = BlockPlan({n: dense.get_submodule(n) for n in names}, plans[i].stages, plans[i].passes)
            if needs:
                calibrate_and_prune(dense, i, plan, inputs, kw,
                                    block_config(config, targets, i), method, needs)
            agree = [((dense.get_submodule(n).weight == 0) == (ref_block.get_submodule(n).weight == 0))
                     .float().mean().item() for n in names]
            per_block.append({"block": i, "min": min(agree), "mean": sum(agree) / len(agree),
                              "layers": dict(zip(names, agree))})

        ref = copy.deepcopy(base)
        t0 = time.perf_counter()
        extra = reference_prune(ref, windows, spec, args,
                                on_block=check_block if spec.method != "magnitude" else None)
        ref_seconds = time.perf_counter() - t0
        agree = _agreement(ref.model.layers, ours.model.layers)
        row = {"method": text, "mask_agreement_min": min(agree),
               "mask_agreement_mean": sum(agree) / len(agree),
               "reference_seconds": ref_seconds, "llmprune_seconds": report.seconds,
               "block_check_min": min((b["min"] for b in per_block), default=None),
               "block_check_mean": ((sum(b["mean"] for b in per_block) / len(per_block)) if per_block
                                    else None),
               "block_check": per_block,
               "llmprune_zeros": _zeros_share(ours), "reference_zeros": _zeros_share(ref),
               "llmprune_calib_batch": config.calib.batch_size}
        if spec.owl:
            ours_d = [100 * d for d in alloc.get("outlier_ratio", [])]
            row.update(reference_outlier_ratio_percent=extra["outlier_ratio_percent"],
                       llmprune_outlier_ratio_percent=ours_d,
                       reference_block_sparsity=extra["block_sparsity"],
                       llmprune_block_sparsity=alloc.get("block_sparsity"),
                       max_block_sparsity_diff=max(abs(a - b) for a, b in zip(extra["block_sparsity"],
                                                                               alloc["block_sparsity"])))
        if not args.no_ppl:
            row["reference_ppl"] = reference_ppl(ref, tokens, args.seqlen, args.max_windows)
            row["llmprune_ppl"] = reference_ppl(ours, tokens, args.seqlen, args.max_windows)
            row["rel_diff"] = (row["llmprune_ppl"] - row["reference_ppl"]) / row["reference_ppl"]
        del ref, ours
        rows.append(row)
        ppl = "" if args.no_ppl else (f"reference {row['reference_ppl']:9.3f}  "
                                      f"llmprune {row['llmprune_ppl']:9.3f}  diff {row['rel_diff']:+.3%}  ")
        block = "" if row["block_check_min"] is None else f"  block check min {row['block_check_min']:.5f}"
        print(f"{text:<18} {ppl}whole-model mask agreement min {row['mask_agreement_min']:.5f}{block}  "
              f"prune s: ref {ref_seconds:.0f} / ours {report.seconds:.0f}", flush=True)
        write_rows(args, rows, previous)


def write_rows(args, rows: list[dict], previous: dict) -> None:
    """The rows so far, then the file's earlier rows this run has not reached or does not
    measure, after each method: a late failure or a shorter ``--methods`` loses nothing."""
    if args.json:
        done = {r["method"] for r in rows}
        rows = rows + [r for method, r in previous.items() if method not in done]
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")


def noise_floor(args, base, tokenizer, windows, tokens, previous: dict) -> None:
    """How far perplexity moves when only the order of float sums changes: the same llmprune
    procedure with the windows batched ``--noise-batches`` at a time through each block (batch
    1 is the reference's loop). Several batch sizes give a spread, not one pair; batch sizes
    already measured for a method (``previous``) are kept."""
    batches = [int(b) for b in args.noise_batches.split(",")]
    rows = []
    for text in args.methods.split(","):
        spec, old = parse_spec(text), previous.get(text, {})
        ppl = {int(b): v for b, v in old.get("ppl_by_batch", {}).items()}
        for key in ("ppl_batch8", "ppl_batch1"):  # rows written before the spread was measured
            if key in old:
                ppl.setdefault(int(key[len("ppl_batch"):]), old[key])
        models = {}
        for batch in batches:
            if batch in ppl and batch != batches[0]:
                continue
            config = spec.config(args)
            config = PruneConfig(**{**{f: getattr(config, f) for f in config.__dataclass_fields__},
                                    "calib": CalibConfig(dataset=args.calib, nsamples=args.nsamples,
                                                         seqlen=args.seqlen, seed=args.seed,
                                                         batch_size=batch)})
            models[batch] = copy.deepcopy(base)
            prune(models[batch], tokenizer, config, windows=windows, progress=False)
            if batch not in ppl:
                ppl[batch] = reference_ppl(models[batch], tokens, args.seqlen, args.max_windows)
            print(f"{text:<18} llmprune calibration batch {batch}: ppl {ppl[batch]:9.3f}", flush=True)
        first = models.pop(batches[0])
        agree = [min(_agreement(first.model.layers, other.model.layers)) for other in models.values()]
        values = [ppl[b] for b in sorted(ppl)]
        row = {"method": text, "ppl_by_batch": {str(b): ppl[b] for b in sorted(ppl)},
               "spread": (max(values) - min(values)) / min(values),
               "mask_agreement_min": min(agree + [old.get("mask_agreement_min", 1.0)])}
        rows.append(row)
        print(f"{text:<18} spread {row['spread']:.3%} over batches {sorted(ppl)}, lowest mask agreement "
              f"{row['mask_agreement_min']:.5f}", flush=True)
        write_rows(args, rows, previous)
        del first, models


def _zeros_share(model) -> float:
    ws = [p for p in model.model.layers.parameters() if p.dim() == 2]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


if __name__ == "__main__":
    main()
