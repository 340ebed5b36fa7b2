"""What a method receives for one layer: the statistics of its input (and of its block)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LayerStats:
    """Calibration statistics of one Linear layer's input. The built-in collectors fill the named
    fields; any other collector's values are in ``extra`` under the names it gives them."""

    FIELDS = ("sq_norm", "hessian", "x_sum", "var_sum", "windows")

    tokens: int  # calibration tokens seen
    sq_norm: torch.Tensor | None = None  # (in,) float32: sum over tokens of x_j**2
    hessian: torch.Tensor | None = None  # (in, in) float32: 2/tokens * sum x x^T
    x_sum: torch.Tensor | None = None  # (in,) float32: sum over tokens of x_j
    var_sum: torch.Tensor | None = None  # (in,) float32: sum over windows of the window's variance of x_j
    windows: int = 0  # calibration windows seen (moments)
    extra: dict[str, Any] = field(default_factory=dict)  # other collectors' values, e.g. "regional_grad"
