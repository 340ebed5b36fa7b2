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
import contextlib
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

from official_admm import official_admm, official_admm_fixed_mask  # noqa: E402
from official_alps import official_alps  # noqa: E402
from official_blockopt import free_lunch_block  # noqa: E402
from official_sparsellm import official_llama_mlp  # noqa: E402
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
from llmprune.data import eval_tokens  # noqa: E402
from llmprune.engine import BlockPlan, prune  # noqa: E402
from llmprune.engine.inputs import PhaseTimer  # noqa: E402
from llmprune.engine.mask import block_config, block_updates, calibrate_and_prune  # noqa: E402
from llmprune.engine.plan import plan_layers  # noqa: E402
from llmprune.math.allocation import BlockTargets  # noqa: E402
from llmprune.methods import block_needs, get_method  # noqa: E402


@dataclass
class Spec:
    text: str
    method: str  # wanda | sparsegpt | magnitude | ria | admm | alps | sparsellm
    sparsity: float
    n: int  # kept of M (our convention); 0 for unstructured
    m: int
    owl: bool = False
    dsnot: bool = False
    reconstruct: str | None = None  # "admm": the ADMM update after the method's mask
    block_step: str | None = None  # "lunch": the free-lunch block reconstruction after the masks

    @property
    def prune_n(self) -> int:  # the official codes count zeros
        return self.m - self.n if self.m else 0

    def config(self, args) -> PruneConfig:
        pattern = f"{self.n}:{self.m}" if self.m else "unstructured"
        owl = {"owl_m": args.owl_m, "owl_lambda": args.owl_lambda} if self.owl else {}
        calib = CalibConfig(dataset=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
        return PruneConfig(method=self.method, pattern=pattern, sparsity=None if self.m else self.sparsity,
                           allocation="owl" if self.owl else "uniform",
                           refine="dsnot" if self.dsnot else None, reconstruct=self.reconstruct,
                           block_reconstruct=self.block_step, calib=calib, **owl)


# a step before the method's name: (field of Spec, value)
STEP_HEADS = {"owl": ("owl", True), "dsnot": ("dsnot", True), "admm": ("reconstruct", "admm"),
              "lunch": ("block_step", "lunch")}


def parse_spec(text: str) -> Spec:
    """``[step-]method:sparsity`` or ``[step-]method:N:M`` (N kept of M); a step is owl, dsnot,
    admm (the ADMM update after the method's mask) or lunch (the block reconstruction):
    ``admm-wanda:0.5`` is Wanda's mask with the ADMM update, ``admm:0.5`` gradual ADMM."""
    head, *rest = text.split(":")
    steps = {}
    step, _, method = head.partition("-")
    if method and step in STEP_HEADS:
        field_name, value = STEP_HEADS[step]
        steps[field_name] = value
    else:
        method = head
    if len(rest) == 2:
        n, m = int(rest[0]), int(rest[1])
        return Spec(text, method, 1 - n / m, n, m, **steps)
    return Spec(text, method, float(rest[0]) if rest else 0.5, 0, 0, **steps)


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
    dense_inps = inps.clone() if spec.block_step == "lunch" else None  # the free lunch's dense stream
    for i, block in enumerate(layers):
        dense = copy.deepcopy(block) if on_block else None
        block_inputs = inps.clone() if on_block else None
        hessian = spec.method in SOLVERS or spec.reconstruct == "admm"
        stats = {n: RefStats(m, hessian=hessian) for n, m in linears(block).items()}
        mlp_inputs = _mlp_inputs(block) if spec.method == "sparsellm" else None
        with mlp_inputs or contextlib.nullcontext():
            hooked_pass(block, inps, kw, stats)
        sparsity = spec.sparsity
        if density is not None:
            sparsity = 1 - density[i]
            if sparsity <= 0:
                sparsity = 0.01
        masks = {}
        for name, st in stats.items():
            masks[name] = _prune_layer(name, st, spec, sparsity)
        if spec.method == "sparsellm":
            _sparsellm_mlp(block, mlp_inputs.rows(), spec, sparsity, args.nsamples)
        if spec.block_step == "lunch":
            dense_inps = _free_lunch(block, masks, dense_inps, kw, args.lunch_batch)
        if on_block:
            on_block(i, dense, block_inputs, kw, block)
        inps = hooked_pass(block, inps, kw, {})
    return extra


SOLVERS = ("sparsegpt", "admm", "alps", "sparsellm")  # the methods that read the Hessian


def _prune_layer(name: str, st: RefStats, spec: Spec, sparsity: float) -> torch.Tensor | None:
    """One Linear by the official procedure for ``spec``; its mask (True = pruned) where one is
    chosen before an update (the free lunch retrains with it)."""
    W = st.layer.weight.data
    if spec.method == "sparsegpt" or (spec.method == "sparsellm" and not name.startswith("mlp.")):
        ref_sparsegpt(st.layer, st.H, sparsity, spec.prune_n, spec.m)
        return None
    if spec.method == "sparsellm":  # the MLP: jointly, after the block's hooks (_sparsellm_mlp)
        return None
    if spec.method == "admm":  # lib/prune.py prune_admm: fasterprune(percdamp=0.1), 2:4 only
        W.copy_(official_admm(W.float(), st.H, sparsity, spec.prune_n, spec.m)[0])
        return None
    if spec.method == "alps":  # llama.py: ALPS_admm(sp, nm_n, nm_m, rho=0.1)
        W.copy_(official_alps(W.float(), sparsity, spec.n, spec.m, XtX=st.H)[0])
        return None
    if spec.dsnot:
        mask = ref_dsnot_mask(name, st, sparsity)
    elif spec.method == "ria":
        mask = ref_ria_mask(st, sparsity, spec.prune_n, spec.m)
    else:
        mask = ref_wanda_mask(_wanda_metric(st), sparsity, spec.prune_n, spec.m)
    if spec.reconstruct == "admm":  # the official update with the mask given (iterative_prune=0)
        W.copy_(official_admm_fixed_mask(W.float(), st.H, mask))
    else:
        W[mask] = 0
    return mask


class _mlp_inputs:
    """The MLP's inputs in the block's hooked pass (SparseLLM's X), one sample at a time."""

    def __init__(self, block):
        self.block, self.seen = block, []

    def __enter__(self):
        self.handle = self.block.mlp.register_forward_pre_hook(
            lambda _m, a: self.seen.append(a[0].reshape(-1, a[0].shape[-1]).float()))
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def rows(self) -> torch.Tensor:
        return torch.cat(self.seen)


def _sparsellm_mlp(block, x_rows, spec: Spec, sparsity: float, nsamples: int) -> None:
    """llama_sparsellm's MLP part on the dense pass's X (model_utils.py:435-635), 4 epochs."""
    mlp = block.mlp
    new, _ = official_llama_mlp(mlp.gate_proj.weight.data, mlp.up_proj.weight.data,
                                mlp.down_proj.weight.data, x_rows, None, sparsity, spec.prune_n, spec.m,
                                nsamples=nsamples)
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(mlp, name).weight.data.copy_(new[name.split("_")[0]])


def _free_lunch(block, masks: dict, dense_inps: torch.Tensor, kw: dict, batch: int) -> torch.Tensor:
    """The free lunch on one block (prune_methods.py: attention then MLP, dense inputs and targets,
    one epoch in batches of ``batch``); returns the dense stream's next inputs."""
    batches = [dense_inps[j:j + batch] for j in range(0, dense_inps.shape[0], batch)]
    with torch.enable_grad():
        outs = free_lunch_block(block, masks, batches, kw, initial_lr=1e-5, n_iterations=len(batches))
    for p in block.parameters():
        p.requires_grad_(False)
    return torch.cat(outs).detach()


def _timer() -> PhaseTimer:
    timer = PhaseTimer()
    timer.new_block()
    return timer


def _agreement(a: torch.nn.Module, b: torch.nn.Module) -> list[float]:
    return [((p == 0) == (q == 0)).float().mean().item()
            for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()) if p.dim() == 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods",
                        default="owl-wanda:0.5,owl-wanda:0.7,ria:0.5,ria:2:4,dsnot-wanda:0.5,dsnot-wanda:0.7")
    parser.add_argument("--owl-m", type=float, default=5.0)
    parser.add_argument("--owl-lambda", type=float, default=0.08)
    parser.add_argument("--also-eval", default="",
                        help="more evaluation data sets (comma separated), reported under each row's 'also'")
    parser.add_argument("--lunch-batch", type=int, default=2,
                        help="the free lunch's calibration windows per step (official 2), one epoch")
    parser.add_argument("--no-ppl", action="store_true", help="block-level check and mask agreement only")
    parser.add_argument("--no-block-check", action="store_true",
                        help="skip the block-level check (for procedures whose masks are not deterministic "
                             "under float rounding, ALPS and SparseLLM, it shows no more than the whole "
                             "model)")
    parser.add_argument("--noise-floor", action="store_true",
                        help="instead: llmprune at several calibration batch sizes (--noise-batches; 1 is "
                             "the reference's), same algorithm, only the float summation order differs")
    parser.add_argument("--noise-batches", default="8,4,2,1",
                        help="calibration batch sizes of the noise-floor run; the first is the one masks "
                             "are compared to")
    add_protocol_args(parser, nsamples=8, max_windows=8)
    args = parser.parse_args()
    base, tokenizer, windows, tokens = load_protocol(args)
    also = {name: eval_tokens(name, tokenizer, args.seqlen, args.data_dir)
            for name in args.also_eval.split(",") if name}
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
                before = copy.deepcopy(dense) if method.block is not None else None
                reports = calibrate_and_prune(dense, i, plan, inputs, kw, block_config(config, targets, i),
                                              method, needs)
                if before is not None:  # SparseLLM's MLP: the engine's block pass on the same inputs
                    block_updates(before, dense, i, plan, inputs, kw, block_config(config, targets, i),
                                  method, reports, _timer(), inputs.device, {})
            agree = [((dense.get_submodule(n).weight == 0) == (ref_block.get_submodule(n).weight == 0))
                     .float().mean().item() for n in names]
            per_block.append({"block": i, "min": min(agree), "mean": sum(agree) / len(agree),
                              "layers": dict(zip(names, agree))})

        ref = copy.deepcopy(base)
        t0 = time.perf_counter()
        extra = reference_prune(ref, windows, spec, args,
                                on_block=check_block if spec.method != "magnitude" and not args.no_block_check
                                else None)
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
            for name, stream in also.items():  # the same two models on the other data sets
                a, b = (reference_ppl(x, stream, args.seqlen, args.max_windows) for x in (ref, ours))
                row.setdefault("also", {})[name] = {"reference_ppl": a, "llmprune_ppl": b,
                                                    "rel_diff": (b - a) / a}
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
