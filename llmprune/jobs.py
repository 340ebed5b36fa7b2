"""The result files a recipe makes, and what a results folder already holds of them.

A recipe's runs become *jobs*: one result file each, plus the dense baselines (the unpruned
model, evaluated once per model and distinct evaluation setting, shared by the runs with that
setting). Whether a job's file in a folder is still its result (``done``), a result of other
settings (``stale``: it will be redone), or not there (``missing``) is decided here, once, for
``llmprune run`` (which skips the done ones) and ``llmprune run --list`` (which shows them).

Nothing here imports torch or transformers: ``llmprune run RECIPE --list`` answers at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from llmprune.config import PLACEMENT_FIELDS, EvalConfig, PruneConfig, RecoverConfig, from_dict, to_dict
from llmprune.errors import LlmpruneError
from llmprune.methods import METHODS, needs_for
from llmprune.recipes import RECIPE_SCHEMA, Recipe, Run, load_recipe, slugify
from llmprune.registry import field_default
from llmprune.results import DENSE, is_result, percent, record_pattern

RECIPE_FILE = "recipe.json"
STALE_SUFFIX = ".stale"
DONE, STALE, MISSING, DAMAGED = "done", "stale", "missing", "damaged"


@dataclass(frozen=True)
class Job:
    """One result file to produce: a pruning run, or the dense baseline (``prune`` None)."""

    name: str
    model: str
    dtype: str
    device: str
    eval: EvalConfig
    prune: PruneConfig | None
    recover: RecoverConfig | None = None  # recovery after pruning (llmprune.recover)
    base_name: str | None = None  # the recipe's name of a run that seeds: repeats (Run.base_name)

    @property
    def model_key(self) -> tuple[str, str, str]:
        return (self.model, self.dtype, self.device)

    @property
    def filename(self) -> str:
        return f"{slugify(self.name)}.json"


def plan(recipe: Recipe) -> list[Job]:
    """All result files of ``recipe``, grouped by model in order of first use; within a model the
    dense baselines come first, then the runs in recipe order."""
    models: dict[tuple[str, str, str], list[Run]] = {}
    for run in recipe.runs:
        models.setdefault((run.model, run.dtype, run.device), []).append(run)
    distinct_models = {run.model for run in recipe.runs}
    jobs: list[Job] = []
    for (model, dtype, device), runs in models.items():
        if recipe.dense:
            evals: list[EvalConfig] = []
            for run in runs:
                if run.eval not in evals:
                    evals.append(run.eval)
            # the dense name says only what is needed to tell the baselines apart
            keys_for_model = [k for k in models if k[0] == model]
            for j, evaluation in enumerate(evals):
                name = DENSE
                if len(distinct_models) > 1:
                    name += f"-{slugify(model.rstrip('/').split('/')[-1])}"
                if len(keys_for_model) > 1:
                    name += f"-{dtype}-{device}"
                if len(evals) > 1:
                    name += f"-eval{j}"
                jobs.append(Job(name, model, dtype, device, evaluation, None))
        jobs.extend(Job(run.name, run.model, run.dtype, run.device, run.eval, run.prune, run.recover,
                        run.base_name) for run in runs)
    _check_file_names(jobs)
    return jobs


def _check_file_names(jobs: list[Job]) -> None:
    """Every file the recipe writes has a name of its own, dense baselines and the folder's
    recipe.json included, after slugging (``_dense`` and ``/dense`` become ``dense.json``) and
    without regard to case (one file on macOS and Windows): otherwise each run overwrites the
    other's result and the folder never completes."""
    def label(job: Job | None) -> str:
        if job is None:
            return f"the folder's {RECIPE_FILE}"
        return f"the dense baseline {job.name!r}" if job.prune is None else f"run {job.name!r}"

    owners: dict[str, Job | None] = {RECIPE_FILE.casefold(): None}
    for job in jobs:
        key = job.filename.casefold()
        if key in owners:
            other = owners[key]
            raise LlmpruneError(f"{label(job)} and {label(other)} would both write {job.filename}: rename "
                                f"the run (names are turned into file names: {job.name!r} -> {job.filename})")
        owners[key] = job


def select(jobs: list[Job], only: str | Iterable[str] | None, recipe_path: Any = "RECIPE") -> list[Job]:
    """The jobs named in ``only`` (all when None), in plan order; the name a recipe gives a run
    that ``seeds:`` repeats selects all its seeds (``wanda`` for ``wanda-seed0``, ``wanda-seed1``). An
    unknown name is an error that lists the names and points to ``--list``."""
    if only is None:
        return jobs
    wanted = [only] if isinstance(only, str) else list(only)
    names = [job.name for job in jobs]
    bases = [job.base_name for job in jobs if job.base_name is not None]
    unknown = [name for name in wanted if name not in names and name not in bases]
    if unknown:
        close = difflib.get_close_matches(unknown[0], names + list(dict.fromkeys(bases)), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        shown = ", ".join(names[:12]) + (f", … ({len(names)} in all)" if len(names) > 12 else "")
        raise LlmpruneError(f"--only {unknown[0]!r} is not a run of this recipe{hint}: runs are {shown}; "
                            f"`llmprune run {recipe_path} --list` lists them with what each one is")
    return [job for job in jobs if job.name in wanted or (job.base_name or job.name) in wanted]


# ---------------------------------------------------------------------------------------------
# is a result file still the result of its job?


def _normal(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(obj))


def _resolved(data: Any, cls: type) -> Any:
    """A stored config as today's dataclass reads it: fields added since the file was written
    take their defaults, so a new option does not make every earlier result stale."""
    if not isinstance(data, dict):
        return data
    try:
        return _normal(to_dict(from_dict(cls, data)))
    except LlmpruneError:  # a key that no longer exists, or a value no longer valid: a different config
        return data


def _unplaced(config: Any) -> Any:
    """A prune config without where the work ran (--offload, --activations): pruning with the
    blocks on disk gives the very same weights, so a result stays valid when only that changes."""
    if not isinstance(config, dict):
        return config
    return {k: v for k, v in config.items() if k not in PLACEMENT_FIELDS}


def _shown(value: Any) -> str:
    text = "null" if value is None else json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:60] + "…"


def _difference(stored: Any, wanted: Any, where: str) -> str | None:
    """The first setting at which ``stored`` (the result's) differs from ``wanted`` (the recipe's)."""
    if stored == wanted:
        return None
    if isinstance(stored, dict) and isinstance(wanted, dict):
        for key in list(wanted) + [k for k in stored if k not in wanted]:
            if key not in stored or key not in wanted:
                return (f"{where}.{key} is not in the result" if key not in stored
                        else f"the result has {where}.{key}, which the recipe no longer has")
            found = _difference(stored[key], wanted[key], f"{where}.{key}")
            if found is not None:
                return found
    return f"{where} is {_shown(stored)} in the result, {_shown(wanted)} in the recipe"


def mismatch(record: Any, job: Job) -> str | None:
    """Why ``record`` is not this job's finished result, in words; None when it is."""
    if not is_result(record):
        return "not a result file"
    if record.get("name") != job.name:
        return f"it is the result of run {_shown(record.get('name'))}"
    if record.get("model") != job.model:
        return f"model is {_shown(record.get('model'))} in the result, {job.model} in the recipe"
    if (job.prune is None) != (record.get("method") == DENSE):
        return f"the result is of {'the dense' if job.prune is not None else 'a pruned'} model"
    expected_config = None if job.prune is None else _normal(job.prune.to_dict())
    why = _difference(_unplaced(_resolved(record.get("config"), PruneConfig)), _unplaced(expected_config),
                      "prune")
    if why is None:
        recovered = _resolved((record.get("recover") or {}).get("config"), RecoverConfig)
        wanted_recovery = None if job.recover is None else _normal(to_dict(job.recover))
        why = _difference(recovered, wanted_recovery, "recover")
    if why is None:
        stored = _resolved(record.get("eval"), EvalConfig)
        wanted = _normal(to_dict(job.eval))
        if not isinstance(stored, dict):
            return "the result has no evaluation settings"
        if wanted.get("seqlen") is None:  # the recipe left it to the model: any resolved value fits
            stored = {**stored, "seqlen": None}
        why = _difference(stored, wanted, "eval")
    return why


def matches(record: Any, job: Job) -> bool:
    """Whether ``record`` is this job's finished result."""
    return mismatch(record, job) is None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def result_status(out: Path, job: Job) -> tuple[str, str]:
    """``(state, why)`` of ``job``'s result file in folder ``out``: done (its result: ``llmprune
    run`` skips it), stale (a result of other settings; ``why`` says which), damaged (not a
    result) or missing. Every state but done is redone by ``llmprune run``."""
    path = out / job.filename
    if not path.exists():
        return MISSING, ""
    record = read_json(path)
    if not is_result(record):
        return DAMAGED, "not a result record (unreadable, or another kind of JSON)"
    why = mismatch(record, job)
    return (DONE, "") if why is None else (STALE, why)


# ---------------------------------------------------------------------------------------------
# the folder's recipe.json: whose results a folder holds


def _recipe_differences(old: dict, new: dict) -> str:
    old_runs = {r.get("name"): r for r in old.get("runs", []) if isinstance(r, dict)}
    new_runs = {r["name"]: r for r in new["runs"]}
    parts = []
    if old.get("name") != new["name"]:
        parts.append(f"recipe {old.get('name')!r}, not {new['name']!r}")
    added = [n for n in new_runs if n not in old_runs]
    removed = [n for n in old_runs if n not in new_runs]
    changed = [n for n in new_runs if n in old_runs and old_runs[n] != new_runs[n]]
    for label, names in (("runs added", added), ("removed", removed), ("changed", changed)):
        if names:
            shown = ", ".join(map(str, names[:3])) + (", …" if len(names) > 3 else "")
            parts.append(f"{label}: {shown}")
    if old.get("dense") != new["dense"]:
        parts.append("dense baselines switched " + ("on" if new["dense"] else "off"))
    return "; ".join(parts) or "different settings"


def comparable_recipe(recipe_dict: dict) -> dict:
    # the description is prose and slurm sizes jobs: editing them does not make the results a
    # different recipe's; nor does an option added to the configs since (its default applies)
    out = {k: v for k, v in recipe_dict.items() if k not in ("description", "slurm")}
    runs = out.get("runs")
    if isinstance(runs, list):
        out["runs"] = [{**run, "prune": _unplaced(_resolved(run.get("prune"), PruneConfig)),
                        "eval": _resolved(run.get("eval"), EvalConfig),
                        **({"recover": _resolved(run["recover"], RecoverConfig)} if "recover" in run else {})}
                       if isinstance(run, dict) else run for run in runs]
    return out


def _results_in(out_dir: Path) -> list[Path]:
    return [p for p in sorted(out_dir.glob("*.json")) if p.name != RECIPE_FILE and is_result(read_json(p))]


def folder_conflict(out_dir: Path, recipe: Recipe) -> str | None:
    """Why ``out_dir`` holds another recipe's results (then ``llmprune run`` refuses it without
    --force); None when it is this recipe's folder, or a new or empty one."""
    new = _normal(recipe.to_dict())
    recipe_file = out_dir / RECIPE_FILE
    old = read_json(recipe_file) if recipe_file.exists() else None
    if old is not None and comparable_recipe(old) == comparable_recipe(new):
        return None
    results = _results_in(out_dir) if out_dir.is_dir() else []
    if old is None and not results:
        return None
    if old is None:
        return f"it holds {len(results)} result file(s) but no {RECIPE_FILE}"
    if not isinstance(old, dict) or old.get("schema") != RECIPE_SCHEMA:
        return f"its {RECIPE_FILE} is not a recipe llmprune wrote"
    return f"it holds results of a different recipe ({_recipe_differences(old, new)})"


def claim_out_dir(out_dir: Path, recipe: Recipe, jobs: list[Job], force: bool) -> None:
    """Refuse a folder holding another recipe's results unless ``force``; with ``force``,
    results that no longer match a run are renamed ``*.json.stale`` so reports skip them."""
    why = folder_conflict(out_dir, recipe)
    if why is None:
        return
    if not force:
        raise LlmpruneError(
            f"refusing to write into {out_dir}: {why}; choose another --out, or pass --force to reuse it "
            "(results that still match a run are kept, the others are renamed *.json.stale)"
        )
    by_file = {job.filename: job for job in jobs}
    for path in _results_in(out_dir):
        job = by_file.get(path.name)
        if job is None or not matches(read_json(path), job):
            os.replace(path, path.with_name(path.name + STALE_SUFFIX))


# ---------------------------------------------------------------------------------------------
# llmprune run RECIPE --list: what each job is, in one line


def _non_default(config: PruneConfig) -> list[str]:
    """The settings besides method, sparsity, pattern and calibration that differ from their
    defaults: allocation, refine, reconstruct, quantize ..., then the components' options."""
    parts = []
    for f in dataclasses.fields(PruneConfig):
        if f.name in ("method", "sparsity", "pattern", "calib", "options"):
            continue
        parts.append(_setting(f, getattr(config, f.name)))
    for spec in config.components():
        parts.extend(_setting(f, config.options.get(f.name)) for f in dataclasses.fields(spec.options))
    return [part for part in parts if part]


def _setting(f: dataclasses.Field, value: Any) -> str:
    """``reconstruct``, ``allocation owl``: a setting as --list shows it; empty at its default."""
    if value == field_default(f):
        return ""
    return f.name if value is True else f"{f.name} {_shown(_normal(value))}"


def _describe_eval(evaluation: EvalConfig) -> str:
    tokens = f"{evaluation.seqlen} tokens" if evaluation.seqlen else "the model's context"
    windows = f"first {evaluation.max_windows} windows" if evaluation.max_windows else "all windows"
    parts = []
    if evaluation.datasets:
        parts.append(f"eval {', '.join(evaluation.datasets)} ({windows} of {tokens})")
    if evaluation.zeroshot:
        docs = f"first {evaluation.limit} documents each" if evaluation.limit else "all documents"
        parts.append(f"zero-shot {', '.join(evaluation.zeroshot)} ({docs})")
    return " + ".join(parts) or "no evaluation"


def _describe_model(job: Job) -> str:
    return f"{job.model} ({job.dtype}, {job.device})"


def describe(job: Job) -> str:
    """What a pruning run is: model; method (label), sparsity or pattern, the other settings;
    calibration; recovery; evaluation."""
    config = job.prune
    pattern = record_pattern(config)
    amount = (f"{pattern} ({percent(config.sparsity)})" if config.pattern.structured
              else f"{percent(config.sparsity)} {pattern}")
    method = METHODS.get(config.method)
    parts = [_describe_model(job), ", ".join([f"{config.method} ({method.label})", amount]
                                             + _non_default(config))]
    calib = config.calib
    if needs_for(config):
        parts.append(f"calib {calib.dataset} {calib.nsamples}×{calib.seqlen or 'context'} seed {calib.seed}")
    else:
        parts.append("no calibration")
    if job.recover is not None:
        rec = job.recover
        parts.append(f"then recover {rec.method} {rec.steps} steps of {rec.batch_size}×{rec.seqlen} "
                     f"on {rec.data}")
    parts.append(_describe_eval(job.eval))
    return "; ".join(parts)


def describe_dense(job: Job, jobs: list[Job]) -> str:
    """What a dense baseline is, and which runs share it."""
    users = [j.name for j in jobs
             if j.prune is not None and j.model_key == job.model_key and j.eval == job.eval]
    if len(users) == 1:
        shared = f"used by {users[0]}, the one run with this evaluation"
    else:
        shown = ", ".join(users[:3]) + (", …" if len(users) > 3 else "")
        shared = f"shared by the {len(users)} runs with this evaluation ({shown})"
    return (f"dense baseline: the unpruned {_describe_model(job)}, evaluated once per evaluation setting, "
            f"{shared}; {_describe_eval(job.eval)}")


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns, two spaces apart, indented; the last column as it is."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  " + "  ".join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]).rstrip()
            for row in rows]


def list_runs(recipe_path: str | os.PathLike, out_dir: str | os.PathLike | None = None,
              only: str | Iterable[str] | None = None) -> list[str]:
    """The lines ``llmprune run RECIPE --list`` prints: each job's name, with ``out_dir`` its
    result's state there, and what it is. Reads the recipe and the folder's JSON only."""
    recipe = load_recipe(recipe_path)
    jobs = plan(recipe)
    selected = select(jobs, only, recipe_path)
    runs = sum(job.prune is not None for job in jobs)
    head = f"{recipe.name} ({recipe_path}): {runs} run{'s' * (runs != 1)}"
    if len(jobs) > runs:
        head += f" and {len(jobs) - runs} dense baseline{'s' * (len(jobs) - runs != 1)}"
    out = None if out_dir is None else Path(out_dir).expanduser()
    if out is not None and out.exists() and not out.is_dir():
        raise LlmpruneError(f"--out {out} is a file: give the results folder")
    rows: list[tuple[str, ...]] = [("run", "what it is") if out is None else ("run", "result", "what it is")]
    notes: list[str] = []
    counts: dict[str, int] = {}
    for job in selected:
        what = describe(job) if job.prune is not None else describe_dense(job, jobs)
        if out is None:
            rows.append((job.name, what))
            continue
        state, why = result_status(out, job)
        counts[state] = counts.get(state, 0) + 1
        rows.append((job.name, state, what))
        if why and state == STALE:
            notes.append(f"{job.name} is stale: {why}")
        elif why:
            notes.append(f"{job.name} is {state}: {why}")
    lines = [head]
    if out is None:
        lines.append("(add --out DIR to see which results are already in DIR)")
    else:
        there = "" if out.is_dir() else " (not made yet)"
        summary = ", ".join(f"{counts[s]} {s}" for s in (DONE, STALE, DAMAGED, MISSING) if s in counts)
        lines.append(f"results in {out}{there}: {summary}")
    lines += _table(rows) + notes
    if out is not None:
        conflict = folder_conflict(out, recipe) if out.is_dir() else None
        if conflict:
            lines.append(f"note: `llmprune run` refuses {out} without --force: {conflict}; with --force "
                         "it keeps the done results and renames the others *.json.stale")
        lines.append("done: its result is there and valid (`llmprune run` skips it); stale: a result of "
                     "other settings, redone; missing: not run yet")
    return lines


__all__ = ["Job", "plan", "select", "matches", "mismatch", "result_status", "folder_conflict",
           "claim_out_dir", "comparable_recipe", "list_runs", "describe", "RECIPE_FILE", "STALE_SUFFIX"]
