"""Check llmprune against an independent, literal re-implementation of the reference protocol.

locuslab/wanda's scripts no longer run on today's transformers (their decoder-layer call lacks
the rotary ``position_embeddings`` that transformers >= 4.45 requires). This script re-implements
their procedure as its README and code describe it, deliberately the slow, literal way and
without any llmprune pruning code:

* calibration samples go through each block one at a time (batch 1);
* Wanda's ``scaler_row`` is a running mean over samples of per-sample sums of x² (``add_batch``);
  SparseGPT's Hessian is the running ``2/nsamples Σ x xᵀ`` of its ``add_batch``;
* masks as the reference computes them: Wanda's stable sort per row; ``prune_n`` *zeros* chosen by
  ``topk`` in every M columns; magnitude's ``|W| <= sorted[int(numel·s)]``; SparseGPT's
  ``fasterprune`` with its ``<= threshold`` block masks, damping 0.01·mean(diag H), block 128;
* perplexity as ``eval_ppl_wikitext``: non-overlapping windows, nll = loss·seqlen, exp(Σ/(n·seqlen)).

It prunes a fresh copy of the model with this code and another with ``llmprune.prune``, then
prints both perplexities, their relative difference and the mask agreement.

    python benchmarks/reference_protocol.py --methods magnitude,wanda,wanda:2:4,wanda:4:8,sparsegpt
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmprune.config import CalibConfig, PruneConfig  # noqa: E402
from llmprune.data import calibration_windows, eval_tokens  # noqa: E402
from llmprune.engine import prune  # noqa: E402
from llmprune.models import load_model  # noqa: E402


class _Caught(Exception):
    pass


def linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def layer0_inputs(model, windows):
    """The reference's Catcher: record block 0's input (one sample at a time) and its kwargs."""
    layers = model.model.layers
    inps, kw = [], {}

    class Catcher(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, hidden, **kwargs):
            inps.append(hidden[0])
            kw.update(kwargs)
            raise _Caught

    layers[0] = Catcher(layers[0])
    try:
        for j in range(windows.shape[0]):
            try:
                model(windows[j:j + 1], use_cache=False)
            except _Caught:
                pass
    finally:
        layers[0] = layers[0].inner
    kw = {k: v for k, v in kw.items() if k not in ("cache", "past_key_values", "past_key_value")}
    return torch.stack(inps), kw


class _Wrapped:
    """Running statistics of one Linear's input, as the reference's add_batch keeps them."""

    def __init__(self, layer: nn.Linear, hessian: bool):
        self.layer, self.nsamples = layer, 0
        # the reference's WrappedGPT: on the layer's device
        cols, dev = layer.in_features, layer.weight.device
        self.scaler_row = torch.zeros(cols, device=dev)
        self.H = torch.zeros(cols, cols, device=dev) if hessian else None

    def add_batch(self, inp):
        inp = inp.reshape(-1, inp.shape[-1]).t().float()  # (cols, tokens) of one sample
        self.scaler_row *= self.nsamples / (self.nsamples + 1)
        if self.H is not None:
            self.H *= self.nsamples / (self.nsamples + 1)
        self.nsamples += 1
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples
        if self.H is not None:
            scaled = math.sqrt(2 / self.nsamples) * inp
            self.H += scaled.matmul(scaled.t())


def ref_wanda_mask(metric, sparsity, prune_n, prune_m):
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if prune_n:
        for col in range(0, metric.shape[1], prune_m):
            part = metric[:, col:col + prune_m].float()
            mask.scatter_(1, col + torch.topk(part, prune_n, dim=1, largest=False)[1], True)
    else:
        order = torch.sort(metric, dim=-1, stable=True)[1]
        mask.scatter_(1, order[:, :int(metric.shape[1] * sparsity)], True)
    return mask


def ref_sparsegpt(layer: nn.Linear, H, sparsity, prune_n, prune_m, percdamp=0.01, blocksize=128):
    W = layer.weight.data.clone().float()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H[range(cols), range(cols)] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for c1 in range(0, cols, blocksize):
        c2 = min(c1 + blocksize, cols)
        W1, Hinv1 = W[:, c1:c2].clone(), Hinv[c1:c2, c1:c2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        if prune_n == 0:
            crit = W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            mask1 = crit <= torch.sort(crit.flatten())[0][int(crit.numel() * sparsity)]
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(c2 - c1):
            w, d = W1[:, i], Hinv1[i, i]
            if prune_n and i % prune_m == 0:
                crit = W1[:, i:i + prune_m] ** 2 / torch.diag(Hinv1)[i:i + prune_m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(crit, prune_n, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, c1:c2] = Q1
        W[:, c2:] -= Err1.matmul(Hinv[c1:c2, c2:])
    layer.weight.data = W.to(layer.weight.dtype)


@torch.no_grad()
def reference_prune(model, windows, method: str, sparsity: float, prune_n: int, prune_m: int):
    layers = model.model.layers
    if method == "magnitude":
        for block in layers:
            for layer in linears(block).values():
                W = layer.weight.data
                metric = W.abs()
                if prune_n:
                    mask = ref_wanda_mask(metric, sparsity, prune_n, prune_m)
                else:
                    thresh = torch.sort(metric.flatten())[0][int(W.numel() * sparsity)]
                    mask = metric <= thresh
                W[mask] = 0
        return
    inps, kw = layer0_inputs(model, windows)
    outs = torch.zeros_like(inps)
    for block in layers:
        wrapped = {n: _Wrapped(m, hessian=method == "sparsegpt") for n, m in linears(block).items()}
        handles = [wrapped[n].layer.register_forward_hook(lambda mod, a, o, n=n, wrapped=wrapped:
                                                          wrapped[n].add_batch(a[0].data))
                   for n in wrapped]
        for j in range(inps.shape[0]):
            block(inps[j].unsqueeze(0), **kw)
        for h in handles:
            h.remove()
        for _name, wr in wrapped.items():
            if method == "wanda":
                metric = wr.layer.weight.data.abs() * torch.sqrt(wr.scaler_row.reshape(1, -1))
                wr.layer.weight.data[ref_wanda_mask(metric, sparsity, prune_n, prune_m)] = 0
            else:
                ref_sparsegpt(wr.layer, wr.H, sparsity, prune_n, prune_m)
        for j in range(inps.shape[0]):
            out = block(inps[j].unsqueeze(0), **kw)
            outs[j] = (out[0] if isinstance(out, tuple) else out)[0]
        inps, outs = outs, inps


@torch.no_grad()
def reference_ppl(model, tokens, seqlen, max_windows=None):
    n = tokens.numel() // seqlen
    if max_windows:
        n = min(n, max_windows)
    nlls = []
    for i in range(n):
        inputs = tokens[i * seqlen:(i + 1) * seqlen].reshape(1, seqlen)
        logits = model(inputs).logits
        loss = nn.CrossEntropyLoss()(logits[:, :-1, :].reshape(-1, logits.shape[-1]).float(),
                                     inputs[:, 1:].reshape(-1))
        nlls.append(loss.float() * seqlen)
    return torch.exp(torch.stack(nlls).sum() / (n * seqlen)).item()


def add_protocol_args(parser: argparse.ArgumentParser, nsamples: int, max_windows: int | None) -> None:
    """The model, calibration and evaluation flags every reference comparison shares."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=nsamples)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib", default="c4")
    parser.add_argument("--eval", default="ptb")
    parser.add_argument("--max-windows", type=int, default=max_windows)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--json", default=None)


def load_protocol(args):
    """(model float32, tokenizer, calibration windows, evaluation token stream) for ``args``."""
    base, tokenizer = load_model(args.model, dtype="float32", seqlen=args.seqlen)
    windows = calibration_windows(args.calib, tokenizer, args.nsamples, args.seqlen, args.seed, args.data_dir)
    return base, tokenizer, windows, eval_tokens(args.eval, tokenizer, args.seqlen, args.data_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="magnitude,wanda,wanda:2:4,wanda:4:8,sparsegpt",
                        help="method or method:N:M (N kept of M), comma separated")
    parser.add_argument("--sparsity", type=float, default=0.5)
    add_protocol_args(parser, nsamples=32, max_windows=None)
    args = parser.parse_args()
    base, tokenizer, windows, tokens = load_protocol(args)
    rows = []
    # dense: llmprune's evaluator against the literal reference loop on the same stream
    from llmprune.evaluation.perplexity import evaluate_perplexity

    ref = reference_ppl(base, tokens, args.seqlen, args.max_windows)
    mine = evaluate_perplexity(base, tokenizer, args.eval, args.seqlen, data_dir=args.data_dir,
                               max_windows=args.max_windows, progress=False).ppl
    rows.append({"method": "dense", "reference_ppl": ref, "llmprune_ppl": mine,
                 "rel_diff": (mine - ref) / ref})
    print(f"{'dense':<14} reference {ref:10.3f}  llmprune {mine:10.3f}  diff {rows[0]['rel_diff']:+.4%}"
          "  (llmprune's evaluate_perplexity vs the reference loop)", flush=True)
    for spec in args.methods.split(","):
        method, *nm = spec.split(":")
        n, m = (int(nm[0]), int(nm[1])) if nm else (0, 0)
        config = PruneConfig(method=method, pattern=f"{n}:{m}" if nm else "unstructured",
                             sparsity=None if nm else args.sparsity,
                             calib=CalibConfig(dataset=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                                               seed=args.seed))
        ref_model = copy.deepcopy(base)
        t0 = time.perf_counter()
        # the reference's prune_n counts zeros: N:M keeps N, so it prunes M - N
        reference_prune(ref_model, windows, method, args.sparsity, m - n if nm else 0, m)
        ref_seconds = time.perf_counter() - t0
        ours = copy.deepcopy(base)
        report = prune(ours, tokenizer, config, windows=windows, progress=False)
        agree = []
        for (_n1, p1), (_, p2) in zip(ref_model.model.layers.named_parameters(),
                                      ours.model.layers.named_parameters()):
            if p1.dim() == 2:
                agree.append(((p1 == 0) == (p2 == 0)).float().mean().item())
        ref = reference_ppl(ref_model, tokens, args.seqlen, args.max_windows)
        del ref_model
        mine = reference_ppl(ours, tokens, args.seqlen, args.max_windows)
        del ours
        row = {"method": spec, "reference_ppl": ref, "llmprune_ppl": mine, "rel_diff": (mine - ref) / ref,
               "mask_agreement": min(agree), "reference_seconds": ref_seconds,
               "llmprune_seconds": report.seconds}
        rows.append(row)
        print(f"{spec:<14} reference {ref:10.3f}  llmprune {mine:10.3f}  diff {row['rel_diff']:+.4%}  "
              f"min mask agreement {row['mask_agreement']:.6f}  prune s: ref {ref_seconds:.0f} / ours "
              f"{report.seconds:.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
