"""Pruning methods, refiners, reconstructions and allocations: one module each, registered by name.

A method module declares a :class:`llmprune.registry.MethodSpec`: its name and table label, its
paper and official code, its options dataclass (the knobs become ``--flags`` and recipe keys),
the statistics it needs (collectors of ``llmprune.stats``), what it supports, and its per-layer
function. Importing this package imports (and so registers) every module in it, then every third-party
module named by an entry point of the group ``llmprune.methods``. Specs are read without torch
(the report and the CLI's parser read them); the per-layer functions import it when they run.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from importlib import metadata

from llmprune.errors import LlmpruneError
from llmprune.methods.base import Selection, effective_group_metric
from llmprune.registry import (
    ALLOCATIONS,
    BLOCK_STEPS,
    METHODS,
    PLUGIN_GROUP,
    RECONSTRUCTIONS,
    REFINERS,
    MethodSpec,
)

__all__ = ["ALLOCATIONS", "BLOCK_STEPS", "METHODS", "RECONSTRUCTIONS", "REFINERS", "Selection", "block_needs",
           "check_steps",
           "effective_group_metric", "get_method", "load_plugins", "needs_for"]

# every module of this package registers its spec when imported: a new method is a new file, no edit here
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

_LOADED: dict[str, str] = {}  # entry point name -> "ok" or why it failed


def load_plugins() -> dict[str, str]:
    """Import every entry point of the group ``llmprune.methods`` once (a module registers its
    specs when imported; a callable entry is called). A plugin that fails is skipped with a
    warning naming it, so one broken package cannot take the library down."""
    for entry in metadata.entry_points(group=PLUGIN_GROUP):
        if entry.name in _LOADED:
            continue
        try:
            loaded = entry.load()
            if callable(loaded):
                loaded()
            _LOADED[entry.name] = "ok"
        except Exception as exc:  # noqa: BLE001 - a third party's failure, reported, not raised
            _LOADED[entry.name] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"llmprune plugin {entry.name!r} ({entry.value}) failed to load: "
                          f"{_LOADED[entry.name]}", stacklevel=2)
    return dict(_LOADED)


def get_method(name: str) -> MethodSpec:
    """The registered method called ``name`` (case-insensitive)."""
    return METHODS.get(name)


def check_steps(config) -> None:
    """The steps around the method: permutation, refinement, reconstruction and an N:M allocation
    need the method to support them."""
    method = METHODS.get(config.method)
    pattern = config.pattern
    allocation = ALLOCATIONS.get(config.allocation)
    if pattern.structured and allocation.name != "uniform":
        nm_methods = [m.name for m in METHODS if m.supports.nm_allocation]
        if not allocation.extra.get("nm"):
            raise LlmpruneError(f"allocation {allocation.name!r} is for unstructured sparsity only (no "
                                "official code defines it for N:M): drop the N:M pattern or use "
                                "allocation uniform")
        if not method.supports.nm_allocation:
            raise LlmpruneError(f"allocation {allocation.name!r} with an N:M pattern is defined by the "
                                f"official code only for {', '.join(nm_methods)}, not for {method.name}: use "
                                "unstructured sparsity or allocation uniform")
    if config.permute:
        if not pattern.structured:
            raise LlmpruneError("permute reorders input channels for an N:M pattern: give --pattern N:M or "
                                "drop --permute")
        if not method.supports.permute:
            able = " and ".join(m.name for m in METHODS if m.supports.permute)
            raise LlmpruneError(f"permute (RIA's channel reallocation) is defined for {able}, not "
                                f"{method.name}")
    if (config.refine is not None or config.reconstruct) and method.select is None:
        raise LlmpruneError(f"method {method.name} does not expose its mask: refine/reconstruct "
                            "cannot follow it")
    if pattern.structured and not method.supports.nm:
        raise LlmpruneError(f"method {method.name} does not prune N:M patterns: drop --pattern {pattern}")


def _method_needs(config) -> set[str]:
    method = METHODS.get(config.method)
    return set(method.needs_for(config) if method.needs_for is not None else method.needs)


def block_needs(config) -> frozenset[str]:
    """Statistics each block's calibration pass collects: the method's, the refiner's and the
    reconstructions' (OWL's dense pass is separate)."""
    needs = _method_needs(config)
    if config.refine is not None:
        needs |= set(REFINERS.get(config.refine).needs)
    if config.reconstruct is not None:
        needs |= set(RECONSTRUCTIONS.get(config.reconstruct).needs)
    if config.block_reconstruct is not None:
        needs |= set(BLOCK_STEPS.get(config.block_reconstruct).needs)
    return frozenset(needs)


def needs_for(config) -> frozenset[str]:
    """Calibration statistics this config needs anywhere (e.g. wanda with metric "weight": none;
    magnitude with allocation owl: norms, for OWL's dense statistics pass)."""
    return block_needs(config) | frozenset(ALLOCATIONS.get(config.allocation).needs)


load_plugins()
