"""Shrink methods' channel arithmetic: KV-group scores from head-dimension scores, and the top-k kept.

Pure math: tensors in, tensors out.
"""

from __future__ import annotations

import torch


def group_scores(channel: torch.Tensor, heads: int, kv_heads: int, head_dim: int, power: int) -> torch.Tensor:
    """Scores of the KV groups (kv_heads,) from o_proj's input-channel scores (heads * head_dim,):
    per head the sum of S_j ** power over its dimensions, per group the sum over its query heads
    (query head h belongs to KV head h // (heads / kv_heads), transformers' repeat_kv order)."""
    per_head = channel.float().pow(power).reshape(heads, head_dim).sum(dim=1)  # (heads,)
    return per_head.reshape(kv_heads, heads // kv_heads).sum(dim=1)  # (kv_heads,)


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of the ``keep`` highest scores; among equal scores the lower index."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return torch.sort(order[:keep]).values


# ---- FLAP's global structure search (its "AL-AM" structure) --------------------------------------

def standardised(scores: torch.Tensor) -> torch.Tensor:
    """(S - mean S) / std S over one layer's channels (FLAP's ``standarlization``: torch.std, the
    unbiased one), so that scores of different layers and modules can be ranked together; zeros
    where every score is equal (the official code divides by zero there)."""
    x = scores.float()
    std = x.std() if x.numel() > 1 else torch.tensor(0.0)
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(x)
    return (x - x.mean()) / std


def standardised_group_scores(channel: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                              power: int) -> torch.Tensor:
    """A KV group's score in the global ranking (kv_heads,): S_j ** power standardised over the
    layer's heads * head_dim inputs, then the mean over the group's dimensions (FLAP: over one
    head's; here a KV group is heads // kv_heads query heads, which go together)."""
    z = standardised(channel.float().pow(power))  # (heads * head_dim,)
    return z.reshape(kv_heads, (heads // kv_heads) * head_dim).mean(dim=1)


def global_keep(channel_scores: list[torch.Tensor] | None, group_scores: list[torch.Tensor] | None,
                channel_params: int, group_params: int, remove_params: float) -> tuple[list[int], list[int]]:
    """FLAP's adaptive structure search over all blocks: every MLP channel and KV group of every
    block in one ranking by standardised score, each weighted by the parameters it holds; the
    highest-ranked prefix whose parameters come closest to what must stay is kept. Each block's
    best channel and best KV group always stay (and are not ranked). ``channel_scores`` /
    ``group_scores``: per block, (intermediate,) / (kv_heads,) standardised scores, or None where
    that kind is not removed. Returns the kept channels and KV groups per block (None lists: 0)."""
    entries = []  # (block, scores, parameters of one, is a KV group); attention first, as the official code
    for is_group, lists, params in ((1, group_scores, group_params), (0, channel_scores, channel_params)):
        entries += [(b, s, params, is_group) for b, s in enumerate(lists or [])]
    blocks = max(len(channel_scores or []), len(group_scores or []))
    scores, weights, owner, kind, forced = [], [], [], [], []
    for block, s, params, is_group in entries:
        best = torch.zeros(len(s), dtype=torch.bool)
        best[int(torch.argmax(s))] = True  # the first highest
        scores.append(s.float().cpu())
        weights.append(torch.full((len(s),), float(params), dtype=torch.float64))
        owner.append(torch.full((len(s),), block))
        kind.append(torch.full((len(s),), is_group))
        forced.append(best)
    scores, weights, owner, kind, forced = (torch.cat(x) for x in (scores, weights, owner, kind, forced))
    order = torch.sort(scores[~forced], descending=True, stable=True).indices
    ranked = weights[~forced][order]  # (candidates,)
    keep_target = max(float(ranked.sum()) - remove_params, 0.0)
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(ranked, 0)])  # (candidates + 1,)
    cut = int(torch.argmin((prefix - keep_target).abs()))  # the first of equally close prefixes
    kept = forced.clone()
    kept[torch.nonzero(~forced).flatten()[order[:cut]]] = True
    counts = [[int(((owner == b) & (kind == k) & kept).sum()) for b in range(blocks)] for k in (0, 1)]
    return counts[0], counts[1]
