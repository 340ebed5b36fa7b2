"""Depth pruning's arithmetic: how much a block changes the residual stream, and which blocks go.

Pure math: tensors in, tensors out. ``x`` and ``y`` are a block's input and output hidden states
(windows, tokens, hidden); the angular distance is ``arccos(cos) / pi`` in [0, 1].
"""

from __future__ import annotations

import torch


def cosine_sum(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """Sum over every token of cos(x_t, y_t), in float64, and the number of tokens (ShortGPT's
    Block Influence is 1 - the mean)."""
    cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)  # (windows, tokens)
    return float(cos.sum()), cos.numel()


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos(a_k, b_k)) / pi for each row k of ``a`` and ``b`` (rows, hidden), float64."""
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)  # (rows,)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / torch.pi


def lowest(scores: list[float], n: int) -> list[int]:
    """Indices (ascending) of the ``n`` lowest scores; among equal scores the lower index."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[:n])


def run_distances(states: list[torch.Tensor], n: int) -> list[float]:
    """Gromov et al.'s d(x^l, x^(l+n)) for every start l in 0..L-n: the angular distance between
    the hidden states entering block l and those leaving block l+n-1, averaged over the rows.
    ``states``: L+1 tensors (rows, hidden), the stream before block 0 ... after block L-1."""
    return [float(angular_distance(states[start], states[start + n]).mean())
            for start in range(len(states) - n)]


def best_run(states: list[torch.Tensor], n: int) -> tuple[list[int], list[float]]:
    """The ``n`` consecutive blocks whose removal joins the closest states (the smallest
    distance; the earliest start on a tie), and the distance of every start."""
    distances = run_distances(states, n)
    start = lowest(distances, 1)[0]
    return list(range(start, start + n)), distances
