"""Value checks shared by the configs and the specs' options: each raises one LlmpruneError that names
the value and the fix. Torch-free."""

from __future__ import annotations

import math
from typing import Any

from llmprune.errors import LlmpruneError


def check_sparsity(value: float, name: str = "sparsity") -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise LlmpruneError(f"{name} {value!r} is not a number: give a fraction in [0, 1)") from None
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise LlmpruneError(f"{name} {value} is outside [0, 1): give a fraction such as 0.5")
    return value


def check_positive(value: Any, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LlmpruneError(f"{name} must be a positive integer, got {value!r}")


def choice(value: Any, allowed: tuple[str, ...], what: str) -> str:
    name = str(value).strip().lower()
    if name not in allowed:
        raise LlmpruneError(f"unknown {what} {value!r}: use {', '.join(allowed)}")
    return name


def none_or_choice(value: Any, allowed: tuple[str, ...], what: str) -> str | None:
    """None for None, '' or 'none' (the default place), else one of ``allowed``."""
    if value is None or str(value).strip().lower() in ("", "none"):
        return None
    return choice(value, allowed, what)


def as_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(str(v) for v in value)


def check_number(value: Any, name: str, low: float | None = None, high: float | None = None,
                 hint: str = "") -> float:
    """A finite number in [low, high] (either bound may be open-ended)."""
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    if not math.isfinite(number) or (low is not None and number < low) \
            or (high is not None and number > high):
        span = f" in [{low:g}, {high:g}]" if low is not None and high is not None else (
            f" >= {low:g}" if low is not None else (f" <= {high:g}" if high is not None else ""))
        raise LlmpruneError(f"{name} {value!r} must be a finite number{span}{hint}")
    return number


def check_positive_number(value: Any, name: str, high: float, example: str) -> float:
    """A finite number in (0, high]: a penalty or a learning rate (``example``: a good value)."""
    number = check_number(value, name, 0.0, high, hint=f": a positive number such as {example}")
    if number <= 0:
        raise LlmpruneError(f"{name} {value!r} must be positive: use e.g. {example}")
    return number
