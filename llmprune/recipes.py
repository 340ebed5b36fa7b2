"""Recipes: one YAML file per table or ablation, resolved into a list of fully specified runs.

A recipe holds ``defaults`` shared by every run and a list of ``runs`` that override them
(deep merge: mappings merge key by key, lists and scalars replace). A ``grid`` expands the
product of some values into runs with generated names::

    name: smollm2_cpu
    description: what the recipe reproduces, and why its settings
    dense: true                  # also evaluate the unpruned model (once per model and eval)
    defaults:
      model: smollm2-135m        # alias, hub id, local directory or .gguf
      dtype: float32             # float32 | float16 | bfloat16 | auto
      device: auto               # cuda when available, else cpu
      prune: {method: wanda, sparsity: 0.5, pattern: unstructured,
              calib: {dataset: c4, nsamples: 32, seqlen: 2048, seed: 0}}     # PruneConfig
      eval: {datasets: [ptb], seqlen: 2048, max_windows: null, zeroshot: [], limit: null}  # EvalConfig
      seeds: [0, 1, 2]           # optional: every run that reads calibration data, once per seed
    runs:
      - {name: magnitude-50, prune: {method: magnitude}}
    grid:
      - name: "{method}-{pattern}"            # str.format over the axes' last key names
        prune: {sparsity: 0.5}                # fixed overrides for this block
        axes: {prune.method: [magnitude, wanda], prune.pattern: [unstructured, "2:4"]}

``seeds:`` (in ``defaults``, a run or a grid block; a run's list replaces the defaults', ``null``
turns it off) repeats each run whose method reads calibration data once per calibration seed:
run ``NAME`` becomes ``NAME-seed0``, ``NAME-seed1``, ... with ``prune.calib.seed`` set, and the
report shows the mean and standard deviation over the seeds. A run that needs no calibration data
(magnitude) and the dense baselines run once, under their own names. A recipe without ``seeds``
gives the very runs it gave before the key existed.

A run's ``recover:`` mapping (:class:`~llmprune.config.RecoverConfig`: method, steps, seqlen,
lr, ...) trains the pruned model towards the dense one before it is evaluated (``llmprune
recover``); the result then holds perplexity before and after.

An optional ``slurm:`` mapping (:class:`~llmprune.config.SlurmConfig`: partition, gpus_per_job,
time, mem_gb, cpus_per_task, array_parallelism) sizes the jobs of ``llmprune run --executor
slurm``; it does not change any result, so editing it does not make the results another recipe's.
Top-level keys starting with ``x-`` are ignored, to hold YAML anchors for ``<<: *anchor``.
``prune:`` keys are :class:`~llmprune.config.PruneConfig` fields and ``eval:`` keys are
:class:`~llmprune.config.EvalConfig` fields, so recipes, CLI flags and the library share one
set of defaults. Every error is an :class:`LlmpruneError` naming the key's path, such as
``runs[3].prune.calib.nsampels``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import math
import re
import reprlib
import string
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from llmprune.config import (
    CalibConfig,
    EvalConfig,
    Pattern,
    PruneConfig,
    RecoverConfig,
    SlurmConfig,
    from_dict,
    to_dict,
)
from llmprune.errors import LlmpruneError
from llmprune.methods import needs_for
from llmprune.registry import OPTION_REGISTRIES
from llmprune.results import DENSE

RECIPE_SCHEMA = "llmprune.recipe/1"
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16", "auto")

TOP_KEYS = ("name", "description", "dense", "defaults", "runs", "grid", "slurm")  # and x-* (anchors)
# bounds on what a recipe may expand to: YAML aliases share one node between many places, so a
# 420-byte file can stand for 10^9 values (a "billion laughs"); a grid multiplies its axes
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 100_000  # values once every alias is expanded (a 1000-run recipe needs ~30 000)
MAX_RUNS = 10_000
MAX_NAME_CHARS = 200  # a result file name (slug + ".json") must fit in 255 bytes
MAX_SEED = 2**32 - 1  # a result's seed must stay an integer every reader takes (the report: below 10^12)
_RUN_SCALARS = {"name": str, "model": str, "dtype": str, "device": str}


class Seeds:
    """The type of the run key ``seeds``: a non-empty list of distinct integers from 0 to
    ``MAX_SEED``, or null (each run once, with its own ``prune.calib.seed``)."""


def seed_name(name: str, seed: int) -> str:
    """The name of run ``name``'s run for calibration seed ``seed`` (``wanda-2:4`` -> ``wanda-2:4-seed1``)."""
    return f"{name}-seed{seed}"


class RecipeError(LlmpruneError):
    """A user error at one place of a recipe. ``where`` is that place as the messages name it
    (``runs[3].prune.calib.nsampels``); :func:`load_recipe` adds its line in the YAML file."""

    def __init__(self, message: str, where: str = ""):
        super().__init__(message)
        self.where = where


@dataclass(frozen=True)
class Run:
    """One fully resolved run of a recipe: which model, how to prune it, how to evaluate it."""

    name: str
    model: str
    prune: PruneConfig
    eval: EvalConfig
    dtype: str = "float32"
    device: str = "auto"
    recover: RecoverConfig | None = None  # train the pruned model towards the dense one afterwards
    # the name the recipe gives a run that ``seeds:`` repeats per seed (this run is ``seed_name(base_name,
    # prune.calib.seed)``); --only takes it for all of them. Not written to recipe.json: the name says it
    base_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "model": self.model, "dtype": self.dtype, "device": self.device,
               "prune": self.prune.to_dict(), "eval": to_dict(self.eval)}
        if self.recover is not None:
            out["recover"] = to_dict(self.recover)
        return out


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    runs: tuple[Run, ...]
    dense: bool = True
    # job sizes for `llmprune run --executor slurm`; results do not depend on it
    slurm: SlurmConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe, as written to ``recipe.json`` next to the results."""
        out = {"schema": RECIPE_SCHEMA, "name": self.name, "description": self.description,
               "dense": self.dense, "runs": [run.to_dict() for run in self.runs]}
        if self.slurm is not None:
            out["slurm"] = to_dict(self.slurm)
        return out

    def run(self, name: str) -> Run:
        for run in self.runs:
            if run.name == name:
                return run
        raise LlmpruneError(f"recipe {self.name!r} has no run {name!r}: runs are {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        return [run.name for run in self.runs]


def slugify(name: str) -> str:
    """A file-name-safe form of a run name (``wanda-2:4`` -> ``wanda-2_4``, ``50%`` -> ``50pct``)."""
    text = str(name).replace("%", "pct")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "run"


# ---------------------------------------------------------------------------------------------
# YAML: YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124, so the loader below keeps
# only the decimal/hex/octal forms of ints and floats and leaves "2:4" a string.


class _Loader(yaml.SafeLoader):
    pass


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
               r"|\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _no_duplicate_keys(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor" may be overridden, by design
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise LlmpruneError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice "
                                "in one mapping")
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document that stands for more than MAX_RECIPE_NODES values once its aliases are
    expanded, or that contains itself; counted on the composed node graph (each shared node once,
    iteratively), so a bomb is refused in microseconds without being built."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            sizes[key] = min(1 + sum(sizes[id(child)] for child in _children(node)), MAX_RECIPE_NODES + 1)
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise LlmpruneError(f"line {node.start_mark.line + 1}: an alias refers to a value that contains "
                                "it: a recipe cannot contain itself")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)
    if sizes[id(root)] > MAX_RECIPE_NODES:
        raise LlmpruneError(f"the recipe expands to more than {MAX_RECIPE_NODES:,} values once its aliases "
                            "(*name) are expanded: write the runs out, or use a grid")


def read_yaml(path: str | Path) -> Any:
    """The recipe file's data, safe-loaded with the refusals above (size, aliases, duplicate keys)."""
    return _read_yaml_node(path)[0]


def _read_yaml_node(path: str | Path) -> tuple[Any, yaml.Node | None]:
    """``read_yaml``'s data and the composed YAML node it was built from (for line numbers)."""
    path = Path(path)
    if not path.is_file():
        raise LlmpruneError(f"recipe {path} does not exist: give the path of a recipe YAML such as "
                            "recipes/smollm2_cpu.yaml")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise LlmpruneError(f"recipe {path} is {path.stat().st_size:,} bytes, more than a recipe needs "
                            f"({MAX_RECIPE_BYTES:,} at most): give the recipe YAML, not data")
    try:
        loader = _Loader(path.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            if node is None:
                return None, None
            _check_expansion(node)
            return loader.construct_document(node), node
        finally:
            loader.dispose()
    except RecursionError:
        raise LlmpruneError(f"{path}: values nested too deeply for a recipe") from None
    except UnicodeDecodeError as exc:
        raise LlmpruneError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): "
                            "give a recipe YAML") from None
    except LlmpruneError as exc:  # "line 5: key 'name' appears twice ...": "r.yaml line 5: ..."
        text = str(exc)
        raise LlmpruneError(f"{path} {text}" if text.startswith("line ") else f"{path}: {text}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise LlmpruneError(f"{path}: invalid YAML{where}: {problem}") from None


# ---------------------------------------------------------------------------------------------
# key and type checks, derived from the config dataclasses so that they never drift from them


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def run_schema() -> dict[str, Any]:
    """Allowed keys of a run (and of ``defaults`` and a grid block): a leaf is a type hint, a
    nested dict a sub-mapping. Derived from the config dataclasses and every registered
    component's options; docs/recipes.md's key tables are checked against it."""
    prune = {name: hint for name, hint in _hints(PruneConfig).items() if name != "options"}
    for registry in OPTION_REGISTRIES:  # every registered method's and step's knobs, by name
        for spec in registry:
            prune.update(_hints(spec.options))
    prune["calib"] = dict(_hints(CalibConfig))
    return {**_RUN_SCALARS, "prune": prune, "eval": dict(_hints(EvalConfig)),
            "recover": dict(_hints(RecoverConfig)), "seeds": Seeds}


def describe_type(hint: Any) -> str:
    """What a key takes, in words (``an integer or null``), as errors and docs/recipes.md say it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if hint is Pattern:
        return 'a pattern such as unstructured or "2:4"'
    if hint is Seeds:
        return "a list of integers or null"
    if origin is tuple:
        return "a list of strings"
    return getattr(hint, "__name__", str(hint))


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Pattern:
        return isinstance(value, (str, Pattern))
    if origin is tuple:
        return isinstance(value, str) or (isinstance(value, (list, tuple))
                                          and all(isinstance(v, str) for v in value))
    return True


def _unknown_key(where: str, key: Any, known: Iterable[str], there: str = "there") -> RecipeError:
    """``unknown key runs[0].prune.sparsty (did you mean 'sparsity'?)``, else the known keys."""
    known = sorted(map(str, known))
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.75)
    if close:
        return RecipeError(f"unknown key {where} (did you mean {close[0]!r}?)", where)
    return RecipeError(f"unknown key {where}: known keys {there} are {', '.join(known)}", where)


def _check_keys(data: Any, schema: Mapping[str, Any], path: str) -> None:
    """Name the first unknown key or wrongly typed value under ``data`` by its full path."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"{path} must be a mapping, got {_show(data)}", path)
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in schema:
            raise _unknown_key(where, key, schema)
        sub = schema[key]
        if isinstance(sub, dict):
            _check_keys(value, sub, where)
        else:
            _check_value(value, sub, where)


def _check_seeds(value: Any, where: str) -> None:
    """``seeds``: null, or a non-empty list of distinct integers from 0 to MAX_SEED."""
    if value is None:
        return
    shown = f"got {_show(value)}"
    if not isinstance(value, list) or not value:
        raise RecipeError(f"{where} must be a non-empty list of calibration seeds such as [0, 1, 2] (null: "
                          f"each run once, with its own prune.calib.seed), {shown}", where)
    for seed in value:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise RecipeError(f"{where} must list integers from 0 to {MAX_SEED}, got {_show(seed)} in "
                              f"{_SHOWN.repr(value)}", where)
    seen: set[int] = set()
    for seed in value:
        if seed in seen:
            raise RecipeError(f"{where} lists seed {seed} twice: each seed makes one run", where)
        seen.add(seed)


def _check_value(value: Any, hint: Any, where: str) -> None:
    if hint is Seeds:
        return _check_seeds(value, where)
    if _fits(value, hint):
        return
    hint_text = ""
    if hint is Pattern and isinstance(value, int):
        hint_text = ' (quote N:M patterns, e.g. pattern: "2:4")'
    raise RecipeError(f"{where} must be {describe_type(hint)}, got {_show(value)}{hint_text}", where)


_SHOWN = reprlib.Repr()  # a value in a message: a few items of a few levels, never the whole of it
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 3, 60, 60, 40
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 6


def _show(value: Any) -> str:
    return f"{_SHOWN.repr(value)} ({type(value).__name__})" if value is not None else "null"


def _clip(text: str, limit: int = 1000) -> str:
    """A message of at most ``limit`` characters on one line (a value it quotes may be huge)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " …"


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``override``: mappings merge recursively; anything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ---------------------------------------------------------------------------------------------
# grid expansion


def _set_path(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value


def _check_axis_path(dotted: Any, schema: Mapping[str, Any], where: str) -> Any:
    if not isinstance(dotted, str) or not dotted:
        raise RecipeError(f"{where}: axis names are dotted keys such as prune.sparsity, got "
                          f"{_show(dotted)}", where)
    sub: Any = schema
    path = where
    for part in dotted.split("."):
        path = f"{path}.{part}"
        if not isinstance(sub, dict):
            raise RecipeError(f"unknown key {path}: {path.rsplit('.', 1)[0]} is not a mapping", path)
        if part not in sub:
            raise _unknown_key(path, part, sub)
        sub = sub[part]
    if isinstance(sub, dict):
        raise RecipeError(f"{path} is a mapping: an axis must name a single value such as {dotted}.<key>",
                          path)
    if dotted == "name":
        raise RecipeError(f"{path}: the run name cannot be an axis; set the grid's name template instead",
                          path)
    if sub is Seeds:
        raise RecipeError(f"{path}: seeds cannot be an axis; write seeds: [0, 1, 2] in the grid block (each "
                          "of its runs is then made once per seed)", path)
    return sub


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class _Field:
    """A template value that formats numbers with a spec and is plain text otherwise."""

    def __init__(self, value: Any):
        self.value = value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec) if spec else _format_value(self.value)

    def __str__(self) -> str:
        return _format_value(self.value)


# a format spec of a number or text: fill/align, sign, width and precision of at most two digits
_FORMAT_SPEC = re.compile(r"(?:[^{}]?[<>=^])?[-+ ]?#?0?(?:[1-9][0-9]?)?[,_]?(?:\.[0-9]{1,2})?"
                          r"[bcdeEfFgGnosxX%]?")


class _Template(string.Formatter):
    """str.format for run names, limited to what names need: plain axis names (no attribute,
    index or position: ``{method.__init__.__globals__}`` would read the module's globals), no
    conversion, and small format specs (``{sparsity:.2f}``, not a width of a billion)."""

    def __init__(self, where: str, template: str):
        self.where, self.template = where, template

    def _refuse(self, what: str) -> LlmpruneError:
        return RecipeError(f"{self.where}.name template {_clip(repr(self.template), 200)} uses "
                           f"{_clip(what, 100)}: a name template may only name axes, such as "
                           "{method}-{sparsity:.2f}", f"{self.where}.name")

    def get_field(self, field_name: str, args, kwargs):
        if not field_name.isidentifier():
            raise self._refuse("{" + field_name + "}")
        return self.get_value(field_name, args, kwargs), field_name

    def convert_field(self, value, conversion):
        if conversion is not None:
            raise self._refuse(f"the conversion !{conversion}")
        return value

    def format_field(self, value, format_spec: str) -> str:
        if not _FORMAT_SPEC.fullmatch(format_spec):
            raise self._refuse(f"the format spec {format_spec!r}")
        return format(value, format_spec)


def _expand_grid(block: Any, index: int, schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    where = f"grid[{index}]"
    if not isinstance(block, Mapping):
        raise RecipeError(f"{where} must be a mapping with axes, got {_show(block)}", where)
    block = dict(block)
    axes = block.pop("axes", None)
    template = block.pop("name", None)
    _check_keys(block, {k: v for k, v in schema.items() if k != "name"}, where)
    if not isinstance(axes, Mapping) or not axes:
        raise RecipeError(f"{where}.axes must be a mapping of dotted keys to lists, such as "
                          "prune.sparsity: [0.5, 0.6]", f"{where}.axes")
    for dotted, values in axes.items():
        hint = _check_axis_path(dotted, schema, f"{where}.axes")
        if not isinstance(values, list) or not values:
            raise RecipeError(f"{where}.axes.{dotted} must be a non-empty list of values, got "
                              f"{_show(values)}", f"{where}.axes.{dotted}")
        for value in values:
            _check_value(value, hint, f"{where}.axes.{dotted}")
    keys = list(axes)
    leaves: dict[str, list[str]] = {}
    for dotted in keys:
        leaves.setdefault(dotted.split(".")[-1], []).append(dotted)
    if template is None:
        template = "-".join("{" + (k.split(".")[-1] if len(leaves[k.split(".")[-1]]) == 1
                                   else k.replace(".", "_")) + "}"
                            for k in keys)
    if not isinstance(template, str):
        raise RecipeError(f"{where}.name must be a template string such as \"{{method}}-{{sparsity}}\"",
                          f"{where}.name")
    count = math.prod(len(axes[k]) for k in keys)
    if count > MAX_RUNS:
        raise RecipeError(f"{where} makes {count:,} runs, more than {MAX_RUNS:,}: split it into "
                          "several recipes", f"{where}.axes")
    formatter = _Template(where, template)
    runs = []
    for combo in itertools.product(*(axes[k] for k in keys)):
        override = copy.deepcopy(block)
        fields: dict[str, _Field] = {}
        for dotted, value in zip(keys, combo):
            _set_path(override, dotted, value)
            fields[dotted.replace(".", "_")] = _Field(value)
            leaf = dotted.split(".")[-1]
            if len(leaves[leaf]) == 1:
                fields[leaf] = _Field(value)
        try:
            name = formatter.vformat(template, (), fields)
        except (KeyError, IndexError) as exc:
            raise RecipeError(
                f"{where}.name template {template!r} uses {{{exc.args[0]}}}, which is not an axis: "
                f"use one of {', '.join('{' + f + '}' for f in sorted(fields))}", f"{where}.name"
            ) from None
        except ValueError as exc:
            raise RecipeError(f"{where}.name template {template!r}: {exc}", f"{where}.name") from None
        override["name"] = name
        runs.append((f"{where} (run {name!r})", override))
    return runs


# ---------------------------------------------------------------------------------------------
# resolving


def _wrap(where: str, fn, *args, **kwargs):
    """Call ``fn``; prefix any LlmpruneError it raises with the path it concerns."""
    try:
        return fn(*args, **kwargs)
    except RecipeError:
        raise
    except LlmpruneError as exc:
        message = str(exc)
        if message.startswith("unknown key "):
            raise RecipeError(message, where) from None
        raise RecipeError(f"{where}: {message}", where) from None


def _check_method(prune: Any, where: str) -> None:
    """The one prune setting a PruneConfig cannot refuse in the recipe's words (the rest it checks
    itself when it is made)."""
    if isinstance(prune, Mapping) and prune.get("method") == DENSE:
        raise RecipeError(
            f"{where}.method: dense baselines are evaluated automatically once per model and eval "
            "settings (set `dense: false` at the top of the recipe to skip them)", f"{where}.method"
        )


def _resolve_run(data: dict[str, Any], where: str) -> Run:
    for key in ("name", "model"):
        if data.get(key) in (None, ""):
            raise RecipeError(f"{where}.{key} is missing: set it in the run or in defaults", where)
    name = data["name"]
    dtype = data.get("dtype", "float32")
    device = data.get("device", "auto")
    if dtype not in DTYPES:
        raise RecipeError(f"{where}.dtype {dtype!r} is unknown: use one of {', '.join(DTYPES)}",
                          f"{where}.dtype")
    if device not in DEVICES and not re.fullmatch(r"cuda:\d+", device):
        raise RecipeError(f"{where}.device {device!r} is unknown: use one of {', '.join(DEVICES)} or "
                          "cuda:N", f"{where}.device")
    _check_method(data.get("prune") or {}, f"{where}.prune")
    prune = _wrap(f"{where}.prune", from_dict, PruneConfig, data.get("prune") or {}, f"{where}.prune")
    evaluation = _wrap(f"{where}.eval", from_dict, EvalConfig, data.get("eval") or {}, f"{where}.eval")
    recover = None
    if data.get("recover") is not None:
        recover = _wrap(f"{where}.recover", from_dict, RecoverConfig, data["recover"], f"{where}.recover")
    return Run(name=name, model=data["model"], prune=prune, eval=evaluation, dtype=dtype, device=device,
               recover=recover)


def _check_run_name(name_value: Any, where: str, seen: dict[str, str],
                    slugs: dict[str, str], dense: bool) -> None:
    """A run name is given, unique, and so is its result file's name (``seen``, ``slugs``: the
    names so far, updated); the dense baselines' names are kept for them."""
    if not isinstance(name_value, str) or not name_value.strip():
        raise RecipeError(f"{where}.name is missing: every run needs a name", where)
    at = f"{where}.name"
    if name_value in seen:
        raise RecipeError(f"{where}.name {name_value!r} is used twice (first at {seen[name_value]}): run "
                          "names must be unique", at)
    slug = slugify(name_value)
    if len(slug) > MAX_NAME_CHARS:
        raise RecipeError(f"{where}.name is {len(name_value):,} characters long: its result file name "
                          "would be longer than a file system allows; keep names under "
                          f"{MAX_NAME_CHARS} characters", at)
    if slug in slugs:
        raise RecipeError(
            f"{where}.name {name_value!r} gives the same result file name ({slug}.json) as run "
            f"{slugs[slug]!r}: rename one", at
        )
    if dense and (name_value == DENSE or name_value.startswith(DENSE + "-")):
        raise RecipeError(f"{where}.name {name_value!r}: names starting with 'dense' are kept for the "
                          "dense baselines (the unpruned model's results, made once per model and "
                          "evaluation setting; `dense: false` turns them off)", at)
    seen[name_value], slugs[slug] = where, name_value


def _per_seed(run: Run, merged: dict[str, Any], override: Mapping[str, Any], seeds: list[int], where: str,
              seen: dict[str, str], slugs: dict[str, str]) -> list[Run]:
    """``run`` once per calibration seed: ``NAME-seedK`` with ``prune.calib.seed`` K, resolved from
    the run's keys as if written out by hand (so its result is checked like any other). A run that
    sets its own seed as well is refused: which of the two would win is a guess."""
    own_calib = (override.get("prune") or {}).get("calib") or {}
    if "seed" in own_calib:
        raise RecipeError(
            f"{where}.prune.calib.seed: run {run.name!r} sets its own calibration seed, and seeds: "
            f"{_SHOWN.repr(seeds)} sets one for each run it makes of it: drop one (seeds: null in the run "
            "keeps its own seed)", f"{where}.prune.calib.seed")
    runs = []
    for seed in seeds:
        name = seed_name(run.name, seed)
        slug = slugify(name)
        if name in seen or slug in slugs:
            other = seen.get(name) or seen[slugs[slug]]
            raise RecipeError(f"{where}: seeds: makes run {name!r} of run {run.name!r}, but {other} has that "
                              f"name or result file ({slug}.json): rename one", where)
        if len(slug) > MAX_NAME_CHARS:
            raise RecipeError(f"{where}.name is too long for its seeds: its runs' result file names would "
                              f"be longer than a file system allows; keep names under {MAX_NAME_CHARS - 25} "
                              "characters", f"{where}.name")
        seen[name], slugs[slug] = f"{where} (its seeds:)", name
        data = deep_merge(merged, {"name": name, "prune": {"calib": {"seed": seed}}})
        runs.append(dataclasses.replace(_resolve_run(data, where), base_name=run.name))
    return runs


def _top_level(data: Any, default_name: str) -> tuple[str, str, bool]:
    """The recipe's name, description and ``dense``, after refusing unknown top-level keys."""
    if not isinstance(data, Mapping):
        raise LlmpruneError(f"a recipe must be a mapping with runs:, got {_show(data)}")
    # top-level "x-..." keys are free for YAML anchors ("x-wanda: &wanda {...}"), as in compose files
    unknown = sorted(k for k in set(map(str, data)) - set(TOP_KEYS) if not k.startswith("x-"))
    if "seeds" in unknown:
        raise RecipeError("seeds is a run key: write it in defaults: for every run (or in a run or a grid "
                          "block for those runs only)", "seeds")
    if unknown:
        raise _unknown_key(unknown[0], unknown[0], TOP_KEYS, "at the top")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise RecipeError(f"name must be a non-empty string, got {_show(name)}", "name")
    description = data.get("description", "") or ""
    if not isinstance(description, str):
        raise RecipeError(f"description must be a string, got {_show(description)}", "description")
    dense = data.get("dense", True)
    if not isinstance(dense, bool):
        raise RecipeError(f"dense must be true or false, got {_show(dense)}", "dense")
    return name.strip(), " ".join(description.split()), dense


def parse_recipe(data: Any, default_name: str = "recipe") -> Recipe:
    """Validate and resolve a recipe mapping (as read from YAML) into a :class:`Recipe`."""
    name, description, dense = _top_level(data, default_name)
    schema = run_schema()
    defaults = data.get("defaults") or {}
    _check_keys(defaults, {k: v for k, v in schema.items() if k != "name"}, "defaults")

    overrides: list[tuple[str, dict[str, Any]]] = []
    runs = data.get("runs") or []
    if not isinstance(runs, list):
        raise RecipeError(f"runs must be a list of mappings, got {_show(runs)}", "runs")
    for i, run in enumerate(runs):
        _check_keys(run, schema, f"runs[{i}]")
        overrides.append((f"runs[{i}]", dict(run)))
    grid = data.get("grid") or []
    if isinstance(grid, Mapping):
        grid = [grid]
    if not isinstance(grid, list):
        raise RecipeError(f"grid must be a mapping or a list of mappings, got {_show(grid)}", "grid")
    for j, block in enumerate(grid):
        overrides.extend(_expand_grid(block, j, schema))
    if not overrides:
        raise LlmpruneError("the recipe has no runs: add runs: or grid:")
    if len(overrides) > MAX_RUNS:
        raise LlmpruneError(f"the recipe has {len(overrides):,} runs, more than {MAX_RUNS:,}: split it into "
                            "several recipes")

    resolved: list[Run] = []
    seen: dict[str, str] = {}
    slugs: dict[str, str] = {}
    for where, override in overrides:
        _check_run_name(override.get("name"), where, seen, slugs, dense)
        merged = deep_merge(defaults, override)
        seeds = merged.pop("seeds", None)
        run = _resolve_run(merged, where)
        if seeds is None or not needs_for(run.prune):  # a run without calibration data runs once
            resolved.append(run)
        else:
            resolved.extend(_per_seed(run, merged, override, seeds, where, seen, slugs))
        if len(resolved) > MAX_RUNS:
            raise LlmpruneError(f"the recipe makes more than {MAX_RUNS:,} runs once seeds: repeats them per "
                                "seed: split it into several recipes")
    slurm = data.get("slurm")
    if slurm is not None:
        _check_keys(slurm, _hints(SlurmConfig), "slurm")
        slurm = _wrap("slurm", from_dict, SlurmConfig, slurm, "slurm")
    return Recipe(name=name, description=description, runs=tuple(resolved), dense=dense, slurm=slurm)


def _line_of(root: yaml.Node | None, where: str) -> int | None:
    """The line (from 1) of the YAML file where the place ``where`` (``runs[3].prune.calib.nsampels``,
    ``grid[0] (run 'wanda-2:4').prune``, ``grid[0].axes.prune.sparsity``) is written: its key's
    line, else that of the nearest enclosing entry written in the file (a key that is missing, or
    a value that comes from defaults). Read on the composed nodes, through aliases and merge keys."""
    where = re.sub(r" \(run .*\)((?:\.\w+)*)$", r"\1", where)  # a grid's run: its grid block
    tokens: list[Any] = [int(index) if index else key
                         for key, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", where)]
    node, line = root, None
    while tokens and node is not None:
        token = tokens.pop(0)
        if isinstance(token, int):
            if isinstance(node, yaml.SequenceNode) and token < len(node.value):
                node = node.value[token]
                line = node.start_mark.line + 1
            elif token != 0 or not isinstance(node, yaml.MappingNode):  # `grid: {...}` is grid[0]
                break
            continue
        if not isinstance(node, yaml.MappingNode):
            break
        found = None
        for extra in range(len(tokens), -1, -1):  # the longest dotted key first: axes' prune.sparsity
            parts = [token, *tokens[:extra]]
            found = _entry(node, ".".join(parts)) if all(isinstance(p, str) for p in parts) else None
            if found is not None:
                del tokens[:extra]
                break
        if found is None:
            break
        line, node = found[0].start_mark.line + 1, found[1]
    return line


def _entry(node: yaml.MappingNode, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    """The (key, value) nodes of ``key`` in a mapping node; once merge keys are flattened (as
    constructing the document does), the last entry of a key is the one in effect."""
    return next(((k, v) for k, v in reversed(node.value) if getattr(k, "value", None) == key), None)


def load_recipe(path: str | Path) -> Recipe:
    """Read, validate and resolve a recipe YAML file. Errors name the file, the line and the key's
    path: ``r.yaml line 12: unknown key runs[0].prune.sparsty (did you mean 'sparsity'?)``."""
    path = Path(path)
    data, root = _read_yaml_node(path)
    try:
        return parse_recipe(data, default_name=path.stem)
    except RecipeError as exc:
        line = _line_of(root, exc.where) if exc.where else None
        where = f"{path} line {line}" if line is not None else str(path)
        raise LlmpruneError(f"{where}: {_clip(str(exc))}") from None
    except LlmpruneError as exc:
        raise LlmpruneError(f"{path}: {_clip(str(exc))}") from None


__all__ = ["Recipe", "Run", "RecipeError", "load_recipe", "parse_recipe", "deep_merge", "slugify",
           "read_yaml", "run_schema", "describe_type", "seed_name", "Seeds", "TOP_KEYS", "RECIPE_SCHEMA"]
