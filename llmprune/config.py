"""Frozen configuration: the one source of defaults.

CLI flags and YAML recipe keys map onto the same fields. ``from_dict`` rejects unknown keys by
name, and every value is validated once here, so the rest of the library can trust its config.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from llmprune.errors import LlmpruneError

GROUPS = ("row", "column", "layer")
METRICS = ("weight", "activation", "wanda")


@dataclass(frozen=True)
class Pattern:
    """Sparsity pattern. ``n``/``m`` are None for unstructured.

    N:M keeps exactly ``n`` weights in every ``m`` consecutive input weights of each row
    (NVIDIA's 2:4 convention), so its sparsity is ``1 - n/m``.
    """

    n: int | None = None
    m: int | None = None

    @property
    def structured(self) -> bool:
        return self.m is not None

    @property
    def sparsity(self) -> float | None:
        return None if self.m is None else 1.0 - self.n / self.m

    def __str__(self) -> str:
        return "unstructured" if self.m is None else f"{self.n}:{self.m}"


_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(text: str | Pattern) -> Pattern:
    """Parse ``"unstructured"`` or ``"N:M"`` (1 <= N < M) into a Pattern."""
    if isinstance(text, Pattern):
        return text
    s = str(text).strip().lower()
    if s in ("unstructured", "", "none"):
        return Pattern()
    match = _NM.match(s)
    if not match:
        raise LlmpruneError(
            f"pattern {text!r} is not understood: use 'unstructured' or 'N:M' such as '2:4'"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if n < 1 or n >= m:
        raise LlmpruneError(
            f"pattern {text!r} is invalid: N:M keeps N of every M weights, so it needs 1 <= N < M"
        )
    return Pattern(n, m)


def check_sparsity(value: float, name: str = "sparsity") -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise LlmpruneError(f"{name} {value!r} is not a number: give a fraction in [0, 1)")
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise LlmpruneError(f"{name} {value} is outside [0, 1): give a fraction such as 0.5")
    return value


def _opt(default: Any, help: str) -> Any:
    """A dataclass field with its help text: CLI flags take both default and help from here."""
    return field(default=default, metadata={"help": help})


def field_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of config class ``cls``."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def field_help(cls: type, name: str) -> str:
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("help", "")


def _check_positive(value: Any, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LlmpruneError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data: which windows feed the hooks."""

    dataset: str = _opt("c4", "calibration data: c4, wikitext2, ptb or a local .txt/.jsonl file")
    nsamples: int = _opt(128, "calibration windows")
    seqlen: int | None = _opt(None, "window length for calibration and evaluation (default: model context, at most 4096)")
    seed: int = _opt(0, "calibration sampling seed")
    batch_size: int = _opt(8, "calibration windows run through a block together")

    def __post_init__(self) -> None:
        _check_positive(self.nsamples, "nsamples")
        _check_positive(self.batch_size, "calibration batch size")
        if self.seqlen is not None:
            _check_positive(self.seqlen, "seqlen")
            if self.seqlen < 2:
                raise LlmpruneError(f"seqlen {self.seqlen} is too short: use at least 2")


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how. ``group``/``metric`` None means the method's own default."""

    method: str = _opt("wanda", "pruning method (see `llmprune.methods.METHODS`)")
    sparsity: float | None = _opt(None, "fraction of weights removed, in [0, 1) (None: 0.5, or 1 - N/M for an N:M pattern)")
    pattern: Pattern = field(default_factory=Pattern, metadata={
        "help": "'unstructured' or N:M = keep N of every M consecutive input weights, e.g. 2:4"})
    group: str | None = _opt(None, "comparison group: row, column or layer (None: the method's)")
    metric: str | None = _opt(None, "score: weight, activation or wanda (None: the method's)")
    use_variant: bool = _opt(False, "Wanda's alpha variant (per-row cumulative-score threshold)")
    true_sequential: bool = _opt(False, "prune q/k/v, o, gate/up, down in turn, each from inputs through the pruned stages")
    include: tuple[str, ...] = _opt((), "only layers matching these globs over 'layers.{i}.{name}', e.g. 'layers.*.mlp.*' (empty: all)")
    exclude: tuple[str, ...] = _opt((), "skip layers matching these globs")
    percdamp: float = _opt(0.01, "SparseGPT Hessian damping, as a fraction of mean diag(H)")
    blocksize: int = _opt(128, "SparseGPT column block size")
    calib: CalibConfig = field(default_factory=CalibConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", parse_pattern(self.pattern))
        object.__setattr__(self, "method", str(self.method).lower())
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if isinstance(self.calib, Mapping):
            object.__setattr__(self, "calib", from_dict(CalibConfig, self.calib, "calib"))
        if self.pattern.structured:
            implied = self.pattern.sparsity
            if self.sparsity is None:
                object.__setattr__(self, "sparsity", implied)
            elif not math.isclose(float(self.sparsity), implied, abs_tol=1e-9):
                raise LlmpruneError(
                    f"sparsity {self.sparsity} disagrees with pattern {self.pattern}, which keeps "
                    f"{self.pattern.n} of every {self.pattern.m} weights (sparsity {implied:g}): "
                    "drop --sparsity or make them agree"
                )
        elif self.sparsity is None:
            object.__setattr__(self, "sparsity", 0.5)
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
        if self.group is not None and self.group not in GROUPS:
            raise LlmpruneError(f"unknown comparison group {self.group!r}: use one of {', '.join(GROUPS)}")
        if self.metric is not None and self.metric not in METRICS:
            raise LlmpruneError(f"unknown metric {self.metric!r}: use one of {', '.join(METRICS)}")
        if not (0.0 <= float(self.percdamp) < 1e3):
            raise LlmpruneError(f"percdamp {self.percdamp} must be a small non-negative fraction such as 0.01")
        _check_positive(self.blocksize, "blocksize")

    def to_dict(self) -> dict[str, Any]:
        out = to_dict(self)
        out["pattern"] = str(self.pattern)
        return out


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity and zero-shot evaluation."""

    datasets: tuple[str, ...] = _opt(("ptb",), "perplexity datasets, comma separated: wikitext2, ptb, c4, or a local .txt/.jsonl path")
    seqlen: int | None = _opt(None, "evaluation window length (None: the model's context, at most 4096)")
    batch_size: int = _opt(1, "evaluation windows per forward pass")
    max_windows: int | None = _opt(None, "evaluate only the first K windows (None: all)")
    zeroshot: tuple[str, ...] = _opt((), "zero-shot tasks through lm-eval, e.g. boolq,rte,winogrande,arc_easy,arc_challenge,openbookqa,piqa")
    limit: int | None = _opt(None, "zero-shot documents per task (None: all)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "datasets", _as_tuple(self.datasets))
        object.__setattr__(self, "zeroshot", _as_tuple(self.zeroshot))
        _check_positive(self.batch_size, "batch size")
        _check_positive(self.max_windows, "max_windows", allow_none=True)
        _check_positive(self.limit, "limit", allow_none=True)
        if self.seqlen is not None:
            _check_positive(self.seqlen, "seqlen")
            if self.seqlen < 2:
                raise LlmpruneError(f"seqlen {self.seqlen} is too short: use at least 2")


def _as_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(str(v) for v in value)


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (patterns as text, tuples as lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Pattern):
            value = str(value)
        elif dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def from_dict(cls: type, data: Mapping[str, Any], where: str = "config") -> Any:
    """Build ``cls`` from a mapping, naming any unknown key and its path."""
    if not isinstance(data, Mapping):
        raise LlmpruneError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise LlmpruneError(
            f"unknown key {where}.{unknown[0]}: known keys are {', '.join(sorted(names))}"
        )
    kwargs = dict(data)
    if cls is PruneConfig and "calib" in kwargs and isinstance(kwargs["calib"], Mapping):
        kwargs["calib"] = from_dict(CalibConfig, kwargs["calib"], f"{where}.calib")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # wrong types that the dataclass itself trips over
        raise LlmpruneError(f"{where}: {exc}") from None
