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
