"""The registries: names -> specs for methods, refiners, reconstructions, allocations, statistics
collectors and save formats. The bottom floor of the house: no torch, no other llmprune module but
``errors``, so the report (JSON only) and the CLI's parser can read every spec cheaply.

A spec is a frozen dataclass. Its ``options`` (a frozen dataclass of its own knobs, each field
with a default and ``metadata["help"]``) become CLI flags (``--ria-a``) and recipe keys
(``ria_a:``) with the field's name, so two specs that declare the same option name must agree on
its default (``percdamp`` is SparseGPT's and the reconstruction's). A name registered twice is an
error. Third-party methods arrive through the entry-point group ``llmprune.methods``: each entry
point names a module (or a callable) that registers its specs when loaded
(``llmprune.methods.load_plugins``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

from llmprune.errors import LlmpruneError

T = TypeVar("T")
PLUGIN_GROUP = "llmprune.methods"


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with its help text: flags, recipe keys and docs take both from here."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class NoOptions:
    """A spec without knobs."""


@dataclass(frozen=True)
class Supports:
    """What a method can do; the plan refuses anything else before calibration."""

    unstructured: bool = True  # a sparsity fraction, exact counts per comparison group
    nm: bool = True  # N:M patterns
    shrink: bool = False  # removes whole channels and heads (the engine's shrink strategy)
    drop: bool = False  # removes whole decoder blocks (the engine's drop strategy: depth pruning)
    permute: bool = False  # RIA's channel reallocation before an N:M mask
    nm_allocation: bool = False  # per-block N:M kept counts (OWL's N:M allocation)
    select: bool = True  # exposes its mask, so refiners and reconstructions can follow it


@dataclass(frozen=True)
class MethodSpec:
    """A pruning method. ``select(weight, stats, config) -> Selection`` (mask methods) or
    ``channel_score(weight, moments, config) -> (in,)`` (shrink methods) is its per-layer function."""

    name: str
    label: str  # as tables show it, e.g. "SparseGPT"
    paper: str  # authors, year, title, venue
    code: str  # the official repository
    summary: str  # one line: what it does
    options: type = NoOptions
    needs: tuple[str, ...] = ()  # collector names (``stats``); empty: no calibration at all
    supports: Supports = field(default_factory=Supports)
    select: Callable | None = None
    channel_score: Callable | None = None
    check: Callable | None = None  # check(config): option combinations refused before calibration
    default_group: str = "row"
    default_metric: str | None = None  # None: the method does not rank by a scores metric
    needs_for: Callable | None = None  # needs_for(config) -> collector names, when they depend on options
    structured: Any = None  # shrink methods: the engine's StructuredSpec-like description
    # block(dense_block, block, layers, hidden, kwargs, config, state) -> info: after every layer of a block
    # has its mask, the method's own pass over the whole block (SparseLLM's MLP coupling)
    block: Callable | None = None
    # check_blocks(blocks) with the plan's per-block layers: what the model must have, refused before
    # calibration (SparseLLM: a gated MLP)
    check_blocks: Callable | None = None
    order: int = 100  # tables list methods by this, then by name


@dataclass(frozen=True)
class StepSpec:
    """A refiner (changes a method's mask), a reconstruction (re-solves the kept weights for a
    fixed mask, one layer at a time), a block reconstruction (the kept weights of a whole block
    toward the dense block's outputs) or an allocation (per-block sparsity targets)."""

    name: str
    label: str
    paper: str
    code: str
    summary: str
    options: type = NoOptions
    needs: tuple[str, ...] = ()
    run: Callable | None = None  # the step's function (see each registry's users)
    check: Callable | None = None
    prefix: str = ""  # how tables mark it: "OWL-" before the method label ...
    suffix: str = ""  # ... or "+DSnoT" after it
    order: int = 100
    extra: dict = field(default_factory=dict)  # kind-specific facts (an allocation's N:M methods ...)


@dataclass(frozen=True)
class CollectorSpec:
    """A statistic of a layer's input (``layer_input``: forward hooks) or of the whole block
    (``backward``: a block-local backward pass per calibration batch)."""

    name: str
    summary: str
    kind: str  # "layer_input" | "block"
    factory: Callable | None = None  # builds the accumulator (see llmprune.stats)
    backward: bool = False  # needs gradients through the block
    memory: Callable | None = None  # memory(in_features, tokens_per_batch, block_params) -> bytes


@dataclass(frozen=True)
class FormatSpec:
    """A checkpoint format: ``save(model, tokenizer, folder, metadata, **options)`` and
    ``load(path, **kwargs)``; ``detect(path)`` says whether a folder holds one."""

    name: str
    summary: str
    save: Callable | None = None
    load: Callable | None = None
    detect: Callable | None = None
    extra: dict = field(default_factory=dict)


class Registry(Generic[T]):
    """Specs by name (lower case); registering a name twice is an error. ``flag`` is how a user
    picks a spec on the command line (``--method wanda``); ``flag_is_switch``: the flag alone picks
    the first spec (``--reconstruct`` is ``--reconstruct obs``)."""

    def __init__(self, kind: str, flag: str = "", flag_is_switch: bool = False):
        self.kind = kind
        self.flag = flag
        self.flag_is_switch = flag_is_switch
        self._specs: dict[str, T] = {}

    def add(self, spec: T) -> T:
        name = spec.name.lower()
        if name in self._specs:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        _check_options(spec, self.kind)
        self._specs[name] = spec
        return spec

    def get(self, name: Any) -> T:
        spec = self._specs.get(str(name).strip().lower())
        if spec is None:
            raise LlmpruneError(f"unknown {self.kind} {name!r}: use one of {', '.join(self.names())}")
        return spec

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests that register a throwaway spec clean up with this)."""
        self._specs.pop(name.lower(), None)

    def names(self) -> list[str]:
        return sorted(self._specs, key=lambda n: (getattr(self._specs[n], "order", 100), n))

    def __contains__(self, name: object) -> bool:
        return str(name).lower() in self._specs

    def __iter__(self) -> Iterator[T]:
        return iter([self._specs[n] for n in self.names()])

    def __len__(self) -> int:
        return len(self._specs)


METHODS: Registry[MethodSpec] = Registry("pruning method", "--method")
REFINERS: Registry[StepSpec] = Registry("refinement", "--refine")
RECONSTRUCTIONS: Registry[StepSpec] = Registry("reconstruction", "--reconstruct", flag_is_switch=True)
BLOCK_STEPS: Registry[StepSpec] = Registry("block reconstruction", "--block-reconstruct")
ALLOCATIONS: Registry[StepSpec] = Registry("allocation", "--allocation")
COLLECTORS: Registry[CollectorSpec] = Registry("statistics collector")
FORMATS: Registry[FormatSpec] = Registry("save format", "--save-format")
# the registries whose specs carry options, in the order flags are listed
OPTION_REGISTRIES = (METHODS, ALLOCATIONS, REFINERS, RECONSTRUCTIONS, BLOCK_STEPS)


def _check_options(spec: Any, kind: str) -> None:
    options = getattr(spec, "options", NoOptions)
    if not (dataclasses.is_dataclass(options) and isinstance(options, type)):
        raise ValueError(f"{kind} {spec.name!r}: options must be a dataclass type")
    for f in dataclasses.fields(options):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{kind} {spec.name!r}: option {f.name!r} has no default")
        known = option_fields().get(f.name)
        if known is not None and field_default(known) != field_default(f):
            raise ValueError(f"{kind} {spec.name!r}: option {f.name!r} defaults to {field_default(f)!r}, but "
                             f"another spec declares it with default {field_default(known)!r}")


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def option_fields() -> dict[str, dataclasses.Field]:
    """Every registered option, by name (the first spec declaring a name gives its help)."""
    out: dict[str, dataclasses.Field] = {}
    for registry in OPTION_REGISTRIES:
        for spec in registry._specs.values():
            for f in dataclasses.fields(spec.options):
                out.setdefault(f.name, f)
    return out


def owners(option_name: str) -> list[str]:
    """'kind name' of every spec declaring ``option_name`` (for error messages)."""
    return [f"{registry.kind} {spec.name}" for registry in OPTION_REGISTRIES
            for spec in registry._specs.values()
            if option_name in {f.name for f in dataclasses.fields(spec.options)}]
