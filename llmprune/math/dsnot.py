"""Mask refinement after a method has chosen its mask.

dsnot  Dynamic Sparse No Training: Zhang et al., "Dynamic Sparse No Training: Training-Free
       Fine-tuning for Sparse LLMs", ICLR 2024, arXiv:2310.08915; official code zyxxmu/DSnoT
       ``lib/prune.py`` ``prune_DSnoT``. Training-free prune-and-grow: per output row, swap a
       pruned weight back in for a kept one whenever that shrinks the row's expected
       reconstruction error

           e_r = sum over pruned j of W_rj * xbar_j          xbar_j = mean over windows of sum_t x_tj

       (the official ``sum_metric_row``: per-window token sums averaged over the windows; the
       update threshold is in these units). Each cycle, every row still updating
         * grows the pruned weight at the end of its list sorted by W_rj xbar_j / var_j ** p
           (p = 1; var_j is the mean over windows of the per-window population variance of x_j):
           the largest when e_r > 0, the most negative otherwise;
         * prunes, unstructured: the kept weight of the opposite sign of W_rj xbar_j with the
           lowest Wanda score |W_rj| ||X_j|| (negative contributions when e_r > 0, positive
           ones when e_r < 0); N:M: the kept weight with the lowest score of the *initial*
           method (``score``) in the grown weight's group of M, so every group keeps N;
         * stops for good once |e_r| <= threshold (0.1), or, for N:M, once a swap would flip
           the sign of e_r (the official unstructured path skips that test: its
           ``--without_same_sign`` defaults to True); at most ``cycles`` (50) cycles.
       Counts per row (and N:M groups) stay exact: every swap prunes one and grows one.
       The official default ``--skip_layer mlp`` refines attention layers only (``skip``).
       The official ``--pow_of_var_pruning`` is parsed but never used; there is no such knob
       here. When a row has used up the kept weights of the sign it needs, the pointer walks on
       into the other sign, as the official single list does (this happens on SmolLM2). Edge
       cases handled differently, so that counts stay exact: a growing candidate that is already
       kept (the list reached its kept entries, e.g. NaN from 0/0 on a dead input) or pointers
       that meet make the row skip the cycle (the official code would prune one weight more);
       kept weights with a zero contribution sit between the two signs (the official code puts
       the row's lowest-Wanda kept weight there); an N:M group with no untouched kept weight
       makes the row skip the cycle (the official ``topk`` would pick an arbitrary one).

Pure math: tensors in, tensors out.
"""

from __future__ import annotations

import torch

from llmprune.errors import LlmpruneError

SKIPS = ("mlp", "self_attn", "none")


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys in the same order (-0.0 equal to 0.0; finite values only)."""
    bits = (x.float() + 0.0).contiguous().view(torch.int32).long()
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)


class _Ends:
    """A list of column indices per row of which only the ``front`` first entries and the
    ``width - front`` last ones are stored: each DSnoT pointer moves at most one step a cycle,
    so with ``cycles`` steps it never reads further in. Stable-sort order is ascending
    (value, column); unique int64 keys make ``topk`` return exactly those ends, which costs far
    less than sorting whole rows. ``cols`` (out, width); ``length`` the full list's length."""

    def __init__(self, cols: torch.Tensor, front: int, length):
        self.cols, self.front, self.length = cols, front, length
        self.width = cols.shape[1]
        self.base = torch.arange(cols.shape[0], device=cols.device) * self.width
        self.flat = cols.reshape(-1)

    @classmethod
    def of(cls, key: torch.Tensor, k: int, length, last_key: torch.Tensor | None = None) -> "_Ends":
        """The first ``k`` of each row's ascending ``key`` order and the last ``k`` of
        ``last_key``'s (default ``key``); keys unique per row. Entries that are not in the list
        carry keys past its end in ``key`` and before its start in ``last_key``."""
        low = key.topk(k, dim=1, largest=False).indices
        high = (key if last_key is None else last_key).topk(k, dim=1).indices.flip(1)
        return cls(torch.cat([low, high], dim=1), k, length)

    def take(self, position: torch.Tensor) -> torch.Tensor:
        """Column at each row's ``position`` in the full list (positions within the ends)."""
        col = torch.where(position < self.front, position, position - self.length + self.width)
        return self.flat.take(self.base + col.clamp(0, self.width - 1))


_KEY_BITS = 20  # columns per row below 2**20: a float's key times the column count fits int64


def _regrow_order(contribution: torch.Tensor, mask: torch.Tensor, var: torch.Tensor,
                  var_power: float, cycles: int) -> tuple[torch.Tensor, _Ends]:
    """Official growing list: e_r per row, and the columns sorted by W xbar / var**p with
    kept weights at 0 (they sit in the middle; only pruned ones are taken)."""
    metric = contribution.masked_fill(~mask, 0.0)  # (out, in): pruned weights' contributions
    error = metric.sum(dim=1)  # (out,)
    if var_power:
        metric = metric / var.pow(var_power).unsqueeze(0)
    in_f = metric.shape[1]
    if 2 * cycles < in_f < 2 ** _KEY_BITS and bool(torch.isfinite(metric).all()):
        key = _ordered(metric) * in_f + torch.arange(in_f, device=metric.device)
        return error, _Ends.of(key, cycles, in_f)
    return error, _Ends(torch.sort(metric, dim=1, stable=True).indices, in_f, in_f)


def _prune_order(contribution: torch.Tensor, mask: torch.Tensor, wanda: torch.Tensor,
                 cycles: int) -> tuple[_Ends, torch.Tensor]:
    """Official pruning list for unstructured: kept weights by Wanda score ascending, those with
    negative contribution first (in that order), positive ones last (in reverse). The front
    pointer walks forward, the back pointer backward; one that has used up its sign walks on
    into the other (as the official single list does). Returns the list and the kept count."""
    out_f, in_f = mask.shape
    kept_count = (~mask).sum(dim=1)
    if (2 * cycles <= int(kept_count.min()) and in_f < 2 ** _KEY_BITS
            and bool(torch.isfinite(contribution).all()) and bool(torch.isfinite(wanda).all())):
        within = _ordered(wanda) * in_f + torch.arange(in_f, device=mask.device)  # (wanda, column)
        group = (contribution > 0).long() + (contribution >= 0).long()  # 0 negative, 1 zero, 2 positive
        key = group * 2 ** 53 + torch.where(group == 2, -within, within)
        ends = _Ends.of(key.masked_fill(mask, 2 ** 62), cycles, kept_count,
                        last_key=key.masked_fill(mask, -2 ** 62))
        return ends, kept_count
    order = torch.sort(wanda.masked_fill(mask, float("inf")), dim=1, stable=True).indices  # kept first
    c = contribution.gather(1, order)
    kept = (~mask).gather(1, order)
    group = torch.full_like(order, 3)
    group[kept & (c < 0)] = 0
    group[kept & (c == 0)] = 1
    group[kept & (c > 0)] = 2
    rank = torch.arange(in_f, device=mask.device).expand(out_f, in_f)
    key = group * in_f + torch.where(group == 2, in_f - 1 - rank, rank)
    listing = order.gather(1, torch.sort(key, dim=1, stable=True).indices)
    return _Ends(listing, in_f, in_f), kept_count


def dsnot(weight: torch.Tensor, mask: torch.Tensor, x_mean: torch.Tensor, var: torch.Tensor,
          wanda: torch.Tensor, score: torch.Tensor | None = None, n: int | None = None, m: int | None = None,
          cycles: int = 50, threshold: float = 0.1, var_power: float = 1.0,
          same_sign: bool | None = None) -> tuple[torch.Tensor, dict]:
    """DSnoT on one layer. ``weight`` (out, in) dense; ``mask`` (out, in) True = pruned (the
    initial mask); ``x_mean`` (in,) per-window input sums averaged over windows; ``var`` (in,);
    ``wanda`` (out, in) Wanda scores (unstructured pruning order); ``score`` (out, in) the
    initial method's scores, higher = keep (N:M: which weight of a group to prune); ``n``/``m``
    the N:M pattern (N kept) or None. ``same_sign`` None: the official choice (N:M yes,
    unstructured no). Returns (new mask, info)."""
    w = weight.detach().float()
    mask = mask.contiguous().clone()
    out_f, in_f = w.shape
    structured = m is not None
    if same_sign is None:
        same_sign = structured
    contribution = w * x_mean.float().unsqueeze(0)  # (out, in) W_rj * xbar_j
    error, regrow = _regrow_order(contribution, mask, var.float(), var_power, cycles)
    start_error = error.clone()
    sign0 = torch.sign(error)
    # Per-row state as flat (out * in) indices: take / index_put_ on 1-D views are the cheapest
    # gathers and scatters for the 50 small steps (bit-identical to 2-D indexing).
    base = torch.arange(out_f, device=w.device) * in_f
    mask_flat, contrib_flat = mask.view(-1), contribution.reshape(-1)
    front, back = torch.zeros_like(base), torch.full_like(base, in_f - 1)  # growing pointers
    if structured:
        if score is None:
            raise ValueError("DSnoT for N:M needs the initial method's scores")
        group_score = score.detach().float().masked_fill(mask, float("inf")).contiguous()  # (out, in)
        offsets = torch.arange(m, device=w.device)
    else:
        listing, kept_count = _prune_order(contribution, mask, wanda.detach().float(), cycles)
        p_front, p_back = torch.zeros_like(base), kept_count - 1  # pruning pointers
    update = torch.ones(out_f, dtype=torch.bool, device=w.device)
    swaps = torch.zeros(out_f, dtype=torch.long, device=w.device)
    used = 0
    for _ in range(cycles):
        if not bool(update.any()):
            break
        used += 1
        side = error > 0  # grow from the end (largest) when the error is positive
        at = torch.where(side, back, front)
        valid = (at >= 0) & (at < in_f)
        grow = regrow.take(at.clamp(0, in_f - 1))
        valid &= mask_flat.take(base + grow)  # the list reached kept weights: used up
        back -= side.long()
        front += (~side).long()
        if structured:
            first = grow - grow % m
            cols = first.unsqueeze(1) + offsets  # (out, m) the grown weight's group
            best, j = group_score.gather(1, cols).min(dim=1)
            cut = first + j
            valid &= torch.isfinite(best)
            group_score.view(-1)[(base + cut)[valid]] = float("inf")
        else:
            pside = error < 0  # prune a positive contribution when the error is negative
            at_p = torch.where(pside, p_back, p_front)
            valid &= (at_p >= 0) & (at_p < kept_count)
            cut = listing.take(at_p.clamp(0, in_f - 1))
            valid &= ~mask_flat.take(base + cut)  # the pointers met: nothing left to prune
            p_back -= pside.long()
            p_front += (~pside).long()
        cut_at, grow_at = base + cut, base + grow
        delta = contrib_flat.take(cut_at) - contrib_flat.take(grow_at)
        update &= error.abs() > threshold
        if same_sign:
            update &= torch.sign(error + delta) == sign0
        do = update & valid
        # where do: prune cut, grow grow (distinct: grow was pruned, cut kept); elsewhere unchanged
        mask_flat.index_put_((cut_at,), mask_flat.take(cut_at) | do)
        mask_flat.index_put_((grow_at,), mask_flat.take(grow_at) & ~do)
        error = error + torch.where(do, delta, torch.zeros_like(delta))
        swaps += do.long()
    info = {"cycles": used, "swaps": int(swaps.sum().item()),
            "error_before": float(start_error.abs().sum().item()),
            "error_after": float(error.abs().sum().item())}
    return mask, info


def skipped(layer: str, skip: str) -> bool:
    """Whether DSnoT leaves layer ``layers.{i}.{part}.{proj}`` alone under ``skip``
    (the official ``--skip_layer``: mlp, self_attn or no_skip)."""
    if skip not in SKIPS:
        raise LlmpruneError(f"unknown dsnot_skip {skip!r}: use one of {', '.join(SKIPS)}")
    parts = layer.split(".")
    part = parts[2] if len(parts) > 2 and parts[0] == "layers" else parts[0]
    return skip != "none" and part == skip

