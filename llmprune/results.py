"""The result record: one run's settings and numbers as JSON, written and read in one place.

Writers (``llmprune eval/prune --json``, the recipe runner) build records with
:func:`result_record`; readers (the report, the runner's resume check) recognise them with
:func:`is_result` and parse them with :func:`parse_result`. Keeping both sides here means the
schema id, the dense marker and the effective group/metric cannot drift apart.

Nothing here imports torch, transformers or lm-eval: tables and plots are made from JSON alone, on
any machine (the method registry it asks for defaults holds specs, torch-free).
"""

from __future__ import annotations

import json
import os
import platform
import re
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

from llmprune.config import PLACEMENT_FIELDS, to_dict
from llmprune.errors import LlmpruneError
from llmprune.methods import effective_group_metric, get_method, needs_for

RESULT_SCHEMA = "llmprune.result/1"
DENSE = "dense"  # the method of the unpruned baseline
RECOVERED_UNKNOWN = "pruned"  # the method of a recovered model whose pruning left no record
MISSING = "-"  # how tables show a setting a run does not have
# zero-shot tasks llmprune ships, in the Wanda paper's column order (the report's order too)
AVAILABLE_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy",
                   "arc_challenge", "openbookqa", "piqa", "lambada_openai", "gsm8k")


# ---------------------------------------------------------------------------------------------
# writing


def versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers."""
    out = {}
    for package in ("llmprune", "torch", "transformers", "lm_eval", "datasets"):
        try:
            out[package] = metadata.version(package.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def machine() -> str:
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}")


def _config_columns(config) -> tuple:
    """``(method, sparsity, pattern, group, metric, nsamples, seed, config dict)`` of a record;
    the dense model's for ``config`` None."""
    if config is None:
        return DENSE, 0.0, "unstructured", None, None, None, None, None
    pattern = record_pattern(config)
    group, metric = effective_group_metric(config)
    uses_data = bool(needs_for(config))
    nsamples = config.calib.nsamples if uses_data else None
    seed = config.calib.seed if uses_data else None
    return config.method, config.sparsity, pattern, group, metric, nsamples, seed, config.to_dict()


def result_record(
    *,
    name: str,
    model: str,
    config=None,
    eval_config=None,
    perplexity: dict | None = None,
    zeroshot: dict | None = None,
    prune_report=None,
    recipe: str | None = None,
    dense: dict | None = None,
    recover: dict | None = None,
    generation: dict | None = None,
) -> dict:
    """One run's result in the shared schema (``RESULT_SCHEMA``), ready for JSON.

    ``config`` is None for the dense model. ``group``/``metric`` are the effective ones, so
    tables never have to know the methods' defaults. ``dense``: the unpruned model's numbers,
    carried by ``llmprune prune --json`` files for the report to use as the baseline.
    ``recover``: what ``llmprune recover`` did to the pruned model (its RecoverReport, with the
    teacher); ``config`` is then the pruning config, or None when the pruned model has no record.
    ``generation``: the greedy-continuation agreement with the dense model (agreement,
    first_divergence, identical, ...), stored only when given, so records without it stay as they were.
    A perplexity entry may carry its ``distance`` to the dense model (KL, top-1 agreement).
    """
    method, sparsity, pattern, group, metric, nsamples, seed, config_dict = _config_columns(config)
    report = prune_report.to_dict() if hasattr(prune_report, "to_dict") else prune_report
    record = {
        "schema": RESULT_SCHEMA,
        "name": name,
        "model": model,
        "method": method,
        "sparsity": float(sparsity),
        "pattern": pattern,
        "group": group,
        "metric": metric,
        "nsamples": nsamples,
        "seed": seed,
        "config": config_dict,
        "eval": to_dict(eval_config) if eval_config is not None else None,
        "perplexity": {k: (v.to_dict() if hasattr(v, "to_dict") else v)
                       for k, v in (perplexity or {}).items()},
        "zeroshot": zeroshot.to_dict() if hasattr(zeroshot, "to_dict") else zeroshot,
        "prune": report,
        "prune_seconds": report["seconds"] if report else None,
        "versions": versions(),
        "machine": machine(),
        "recipe": recipe,
    }
    if dense is not None:
        record["dense"] = dense
    if generation is not None:
        record["generation"] = generation.to_dict() if hasattr(generation, "to_dict") else generation
    if recover is not None:
        record["recover"] = recover
        if config is None:  # pruned by something else: not the dense baseline
            record["method"] = RECOVERED_UNKNOWN
            record["sparsity"] = float(recover.get("sparsity_after") or 0.0)
    return record


# ---------------------------------------------------------------------------------------------
# reading


def is_result(record: Any) -> bool:
    """Whether a parsed JSON file is a result record (and not, say, a recipe)."""
    return isinstance(record, dict) and record.get("schema") == RESULT_SCHEMA


def task_order(tasks: Iterable[str]) -> tuple[str, ...]:
    """Zero-shot tasks in the Wanda paper's column order, any others after them by name."""
    return tuple(sorted(tasks, key=lambda t: (AVAILABLE_TASKS.index(t) if t in AVAILABLE_TASKS
                                              else len(AVAILABLE_TASKS), t)))


def percent(fraction: float) -> str:
    """``0.5`` -> ``"50%"``, without float noise."""
    return f"{round(fraction * 100, 6):g}%"


@dataclass(frozen=True)
class Result:
    """The fields of one result record that tables and plots use."""

    file: str
    name: str
    recipe: str | None
    model: str
    method: str
    sparsity: float
    pattern: str
    group: str | None
    metric: str | None
    nsamples: int | None
    seed: int | None
    calib: str | None
    eval_seqlen: int | None
    max_windows: int | None
    ppl: dict[str, float]
    acc: dict[str, float]
    mean_acc: float | None
    zs_limit: int | None
    prune_seconds: float | None
    actual_sparsity: float | None
    versions: str
    machine: str
    structured: bool = False
    nm: tuple[int, int] | None = None
    # issue 8: non-uniform allocation and the steps around the method, in the order they run
    # (e.g. ("owl", "dsnot", "reconstruct")), and the measured sparsity of each block
    variant: tuple[str, ...] = ()
    block_sparsity: tuple[float, ...] = ()
    # issue 22: the run's settings without its calibration seed; results that differ only in their
    # seed share it, and the report shows their mean and standard deviation
    seed_group: str = ""
    # the distance to the dense model per perplexity dataset (kl_mean, kl_p90, kl_p99, kl_p999,
    # top1_agreement, topk_mass, ...), the greedy-continuation agreement (agreement,
    # first_divergence, identical, ...) and the perplexity a zero-shot task reports (lambada_openai):
    # each where the record has it, as plain JSON values
    distance: dict[str, dict[str, Any]] = field(default_factory=dict)
    generation: dict[str, Any] | None = None
    task_ppl: dict[str, float] = field(default_factory=dict)
    # the pruning time in forwards of the decoder stack on the calibration windows, both measured in
    # the same run (``stack_forwards``); None without a propagation pass to measure it by
    cost: float | None = None

    @property
    def dense(self) -> bool:
        return self.method == DENSE

    @property
    def setting(self) -> tuple:
        """Sort key of the pattern/sparsity column: unstructured by sparsity, then N:M, then
        structured (whole channels and heads removed) by sparsity."""
        if self.pattern == "structured":
            return (2, round(self.sparsity, 9), 0, 0)
        if self.nm is None:
            return (0, round(self.sparsity, 9), 0, 0)
        n, m = self.nm
        return (1, round(self.sparsity, 9), -m, n)

    @property
    def setting_label(self) -> str:
        if self.pattern == "structured":
            return f"{percent(self.sparsity)} structured"
        return self.pattern if self.nm is not None else percent(self.sparsity)

    def knob(self, name: str) -> Any:
        return self.setting if name == "setting" else getattr(self, name)

    def knob_label(self, name: str) -> str:
        if name == "setting":
            return self.setting_label
        value = getattr(self, name)
        return MISSING if value is None else str(value)

    @property
    def zs_key(self) -> tuple:
        """Which zero-shot table the run belongs in: the same tasks and document limit."""
        return (task_order(self.acc), self.zs_limit)


def _float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _numbers(entries: Any, key: str) -> dict[str, float]:
    """``{name: number}`` from ``{name: {key: number, ...}}`` (or ``{name: number}``), skipping
    entries without a number."""
    out = {}
    for name, value in (entries.items() if isinstance(entries, dict) else ()):
        number = _float(value.get(key) if isinstance(value, dict) else value)
        if number is not None:
            out[str(name)[:200]] = number
    return out


_PATTERN = re.compile(r"([1-9][0-9]{0,5}):([1-9][0-9]{0,5})")


class _Fields:
    """Typed reads of a record's fields; a wrong type names the file and the field in one line."""

    def __init__(self, record: dict, file: str):
        self.record, self.file = record, file

    def bad(self, key: str, wanted: str) -> LlmpruneError:
        shown = repr(self.record.get(key))
        shown = shown if len(shown) <= 60 else shown[:60] + "…"
        return LlmpruneError(f"result file {self.file}: field {key!r} must be {wanted}, got {shown}; fix or "
                             "delete the file")

    def need(self, key: str) -> str:
        if key not in self.record:
            raise LlmpruneError(f"result file {self.file} has no {key!r}: it is not a complete "
                                "llmprune result")
        return self.text(key)

    def text(self, key: str, default: str | None = None, section: dict | None = None) -> str | None:
        value = (self.record if section is None else section).get(key)
        if value is None:
            return default
        if not isinstance(value, str) or len(value) > 1000:
            raise self.bad(key, "a string (of at most 1000 characters)")
        return value

    def integer(self, key: str, section: dict | None = None, where: str | None = None) -> int | None:
        value = (self.record if section is None else section).get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 10**12:
            raise LlmpruneError(f"result file {self.file}: field {where or key!r} must be an integer, got "
                                f"{str(value)[:60]!r}; fix or delete the file")
        return value

    def mapping(self, key: str) -> dict:
        value = self.record.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.bad(key, "a mapping")
        return value


def record_pattern(config) -> str:
    """The pattern a result shows: ``structured`` for methods that remove whole channels and heads,
    ``depth`` for those that remove whole blocks (their config keeps the default ``unstructured``,
    which would misname them), else the config's."""
    supports = get_method(config.method).supports
    if supports.drop:
        return "depth"
    return "structured" if supports.shrink else str(config.pattern)


def parse_result(record: dict, file: str) -> Result:
    """The :class:`Result` of one record; ``file`` names it in errors and tables. A field of the
    wrong type or out of range (a damaged or hand-edited file) is an LlmpruneError naming the
    file and the field."""
    f = _Fields(record, file)
    pattern = f.text("pattern", "unstructured")
    nm = None
    if ":" in pattern:
        found = _PATTERN.fullmatch(pattern)
        if found is None or int(found.group(1)) >= int(found.group(2)):
            raise f.bad("pattern", 'unstructured, structured or "N:M" with 0 < N < M')
        nm = (int(found.group(1)), int(found.group(2)))
    sparsity = _float(record.get("sparsity") if record.get("sparsity") is not None else 0.0)
    if sparsity is None or not 0.0 <= sparsity <= 1.0:
        raise f.bad("sparsity", "a number from 0 to 1")
    config, evaluation, zeroshot, prune = (f.mapping(key) for key in ("config", "eval", "zeroshot", "prune"))
    versions = f.mapping("versions")
    calib = config.get("calib") if isinstance(config.get("calib"), dict) else {}
    nsamples = f.integer("nsamples")
    return Result(
        file=file,
        name=f.need("name"),
        recipe=f.text("recipe"),
        model=f.need("model"),
        method=f.need("method"),
        sparsity=sparsity,
        pattern=pattern,
        group=f.text("group"),
        metric=f.text("metric"),
        nsamples=nsamples,
        seed=f.integer("seed"),
        calib=f.text("dataset", section=calib) if nsamples is not None else None,
        eval_seqlen=f.integer("seqlen", evaluation, "eval.seqlen"),
        max_windows=f.integer("max_windows", evaluation, "eval.max_windows"),
        ppl=_numbers(record.get("perplexity"), "ppl"),
        acc=_numbers(zeroshot.get("tasks"), "acc"),
        mean_acc=_float(zeroshot.get("mean_acc")) if zeroshot else None,
        zs_limit=f.integer("limit", evaluation, "eval.limit"),
        prune_seconds=_float(record.get("prune_seconds")),
        actual_sparsity=_float(prune.get("overall_sparsity")),
        variant=_variant(config) + _recovered(record.get("recover")),
        block_sparsity=_block_sparsity(prune.get("layers")),
        versions=", ".join(f"{k} {versions[k]}" for k in sorted(map(str, versions)))[:1000],
        machine=str(record.get("machine") or "")[:1000],
        structured=nm is not None,
        nm=nm,
        seed_group=_seed_group(record, config, evaluation),
        distance=_distances(record.get("perplexity")),
        generation=_plain(record["generation"]) if isinstance(record.get("generation"), dict) else None,
        task_ppl=_numbers(zeroshot.get("tasks"), "ppl"),
        cost=stack_forwards(record.get("prune_seconds"), prune.get("phase_seconds")),
    )


def stack_forwards(seconds: Any, phases: Any) -> float | None:
    """``seconds`` of pruning in forwards of the decoder stack, measured in the same run: the
    engine's propagation pass is that forward, block by block on the calibration windows (every
    block but the last, which has no next block: its time is the mean of the others'). None
    when the run had no propagation (no calibration, or a depth method's single pass)."""
    total = _float(seconds)
    times = phases.get("propagate") if isinstance(phases, dict) else None
    if total is None or not isinstance(times, list):
        return None
    ran = [t for t in (_float(v) for v in times[:-1]) if t is not None and t > 0]
    if not ran or len(ran) < len(times) - 1:
        return None
    stack = sum(ran) / len(ran) * len(times)  # (blocks,) the last block's turn at the others' mean
    return total / stack if stack > 0 else None


def _seed_group(record: dict, config: dict, evaluation: dict) -> str:
    """What a result is besides its calibration seed, as canonical JSON: model, method, sparsity,
    pattern, the prune config without ``calib.seed`` and without where the work ran, the
    evaluation and the recovery settings. The run's name, versions and timings are not part of it."""
    config = {k: v for k, v in config.items() if k not in PLACEMENT_FIELDS}
    if isinstance(config.get("calib"), dict):
        config["calib"] = {k: v for k, v in config["calib"].items() if k != "seed"}
    recovered = record.get("recover")
    key = {key: record.get(key) for key in ("model", "method", "sparsity", "pattern")} | {
        "config": config, "eval": evaluation,
        "recover": recovered.get("config") if isinstance(recovered, dict) else None}
    return json.dumps(key, sort_keys=True, default=str)


_PLAIN_DEPTH, _PLAIN_ITEMS = 4, 10_000  # bounds on what a damaged or hand-edited record may hold


def _plain(value: Any, depth: int = 0) -> Any:
    """A record's section as plain, bounded JSON values (numbers, strings, true/false, lists and
    mappings of them); anything else, or nested too deeply, becomes None."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value if isinstance(value, int) and abs(value) < 10**15 else _float(value)
    if isinstance(value, str):
        return value[:1000]
    if depth >= _PLAIN_DEPTH:
        return None
    if isinstance(value, list):
        return [_plain(v, depth + 1) for v in value[:_PLAIN_ITEMS]]
    if isinstance(value, dict):
        return {str(k)[:200]: _plain(v, depth + 1) for k, v in list(value.items())[:_PLAIN_ITEMS]}
    return None


def _distances(perplexity: Any) -> dict[str, dict[str, Any]]:
    """``{dataset: distance section}`` of the perplexity entries that carry one (a mapping)."""
    out = {}
    for dataset, entry in (perplexity.items() if isinstance(perplexity, dict) else ()):
        distance = entry.get("distance") if isinstance(entry, dict) else None
        if isinstance(distance, dict):
            out[str(dataset)[:200]] = _plain(distance)
    return out


def _variant(config: dict) -> tuple[str, ...]:
    """Allocation (when not uniform), permutation, refinement, reconstructions of a run's config."""
    out = []
    if config.get("allocation") not in (None, "uniform"):
        out.append(str(config["allocation"])[:100])
    if config.get("permute"):
        out.append("permute")
    if config.get("refine"):
        out.append(str(config["refine"])[:100])
    reconstruct = config.get("reconstruct")
    if reconstruct:  # True (records before the choice) and "obs" are the OBS sweep
        out.append("reconstruct" if reconstruct in (True, "obs") else str(reconstruct)[:100])
    if config.get("block_reconstruct"):
        out.append(str(config["block_reconstruct"])[:100])
    return tuple(out)


def _recovered(section) -> tuple[str, ...]:
    """``("kd",)`` / ``("lora",)`` for a run that ``llmprune recover`` trained after pruning."""
    inner = section.get("config") if isinstance(section, dict) else None
    method = inner.get("method") if isinstance(inner, dict) else None
    return (str(method)[:100],) if method else ()


def _block_sparsity(layers: Any) -> tuple[float, ...]:
    """Zeros / weights per block from the record's per-layer counts ("layers.{i}.{name}"); entries
    that are not such counts are skipped (the plot is the only reader)."""
    counts: dict[int, list[float]] = {}
    for layer in layers if isinstance(layers, list) else ():
        if not isinstance(layer, dict):
            continue
        parts = str(layer.get("name", ""))[:100].split(".")
        zeros, numel = _float(layer.get("zeros") or 0), _float(layer.get("numel") or 0)
        if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit() and len(parts[1]) < 7 \
                and zeros is not None and numel is not None:
            zeros_numel = counts.setdefault(int(parts[1]), [0.0, 0.0])
            zeros_numel[0] += zeros
            zeros_numel[1] += numel
    return tuple(z / n if n else 0.0 for _, (z, n) in sorted(counts.items()))


def embedded_dense(record: dict, file: str) -> Result | None:
    """The dense baseline a ``llmprune prune --json`` record carries inside, as its own result
    (file ``<file>#dense``); None when there is none."""
    dense = record.get("dense")
    if record.get("method") == DENSE or not isinstance(dense, dict) or not dense.get("perplexity"):
        return None
    keep = ("model", "eval", "versions", "machine", "recipe")
    synthetic = {key: record.get(key) for key in keep} | {
        "schema": RESULT_SCHEMA, "name": DENSE, "method": DENSE, "sparsity": 0.0, "pattern": "unstructured",
        "perplexity": dense.get("perplexity"), "zeroshot": dense.get("zeroshot")}
    return parse_result(synthetic, f"{file}#dense")


__all__ = ["RESULT_SCHEMA", "DENSE", "AVAILABLE_TASKS", "Result", "result_record", "effective_group_metric",
           "versions", "machine", "is_result", "parse_result", "embedded_dense", "task_order", "percent"]
