"""Run a recipe: every run's result JSON in one folder, resumable, then the report.

The dense model is loaded once per (model, dtype, device). The original weights of the prunable
layers are kept on the CPU and copied back before each pruning run, which is much faster than
reloading and gives the same numbers. The unpruned model is evaluated once per (model, eval
settings) and written as its own result (method ``dense``).

Each result is written atomically as soon as its run ends, so a crash or Ctrl-C loses at most
the run in progress; running the recipe again skips every run whose result is already there.
The folder's ``recipe.json`` (the resolved recipe) guards against mixing two recipes' results.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from llmprune import engine
from llmprune.config import PLACEMENT_FIELDS, EvalConfig, PruneConfig, RecoverConfig, from_dict, to_dict
from llmprune.data import check_available
from llmprune.errors import LlmpruneError
from llmprune.evaluation import check_eval_memory, evaluate
from llmprune.evaluation.zeroshot import build_tasks
from llmprune.io import check_output_dir, write_json_atomic
from llmprune.methods import needs_for
from llmprune.models import (
    check_device,
    check_model_source,
    get_blocks,
    load_model,
    prunable_linears,
    resolve_seqlen,
)
from llmprune.offload import check_offload_dir
from llmprune.recipes import RECIPE_SCHEMA, Recipe, Run, load_recipe, slugify
from llmprune.recover import check_inputs as check_recover
from llmprune.recover import recover
from llmprune.report import write_report
from llmprune.results import DENSE, is_result, machine, result_record

RECIPE_FILE = "recipe.json"
STALE_SUFFIX = ".stale"


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
        jobs.extend(Job(run.name, run.model, run.dtype, run.device, run.eval, run.prune, run.recover)
                    for run in runs)
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


def _matches(record: Any, job: Job) -> bool:
    """Whether ``record`` is this job's finished result."""
    if not is_result(record):
        return False
    if record.get("name") != job.name or record.get("model") != job.model:
        return False
    expected_config = None if job.prune is None else _normal(job.prune.to_dict())
    if _unplaced(_resolved(record.get("config"), PruneConfig)) != _unplaced(expected_config):
        return False
    if (job.prune is None) != (record.get("method") == DENSE):
        return False
    recovered = _resolved((record.get("recover") or {}).get("config"), RecoverConfig)
    if recovered != (None if job.recover is None else _normal(to_dict(job.recover))):
        return False
    stored = _resolved(record.get("eval"), EvalConfig)
    wanted = _normal(to_dict(job.eval))
    if not isinstance(stored, dict):
        return False
    if wanted.get("seqlen") is None:  # the recipe left it to the model: any resolved value fits
        stored = {**stored, "seqlen": None}
    return stored == wanted


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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


def _claim_out_dir(out_dir: Path, recipe: Recipe, jobs: list[Job], force: bool) -> None:
    """Refuse a folder holding another recipe's results unless ``force``; with ``force``,
    results that no longer match a run are renamed ``*.json.stale`` so reports skip them."""
    new = _normal(recipe.to_dict())
    recipe_file = out_dir / RECIPE_FILE
    old = _read_json(recipe_file) if recipe_file.exists() else None
    results = [p for p in sorted(out_dir.glob("*.json"))
               if p.name != RECIPE_FILE and is_result(_read_json(p))]
    if old is not None and comparable_recipe(old) == comparable_recipe(new):
        return
    if old is None and not results:
        return
    if not force:
        if old is None:
            why = f"it holds {len(results)} result file(s) but no {RECIPE_FILE}"
        elif not isinstance(old, dict) or old.get("schema") != RECIPE_SCHEMA:
            why = f"its {RECIPE_FILE} is not a recipe llmprune wrote"
        else:
            why = f"it holds results of a different recipe ({_recipe_differences(old, new)})"
        raise LlmpruneError(
            f"refusing to write into {out_dir}: {why}; choose another --out, or pass --force to reuse it "
            "(results that still match a run are kept, the others are renamed *.json.stale)"
        )
    by_file = {job.filename: job for job in jobs}
    for path in results:
        job = by_file.get(path.name)
        if job is None or not _matches(_read_json(path), job):
            os.replace(path, path.with_name(path.name + STALE_SUFFIX))


def snapshot_weights(model: torch.nn.Module) -> dict[tuple[int, str], torch.Tensor]:
    """A CPU copy of the weights (and biases) of every prunable layer, to undo pruning later."""
    saved: dict[tuple[int, str], torch.Tensor] = {}
    for i in range(len(get_blocks(model))):
        for name, module in prunable_linears(model, i).items():
            saved[(i, name)] = module.weight.detach().to("cpu", copy=True)
            if module.bias is not None:
                saved[(i, name + ".bias")] = module.bias.detach().to("cpu", copy=True)
    return saved


@torch.no_grad()
def restore_weights(model: torch.nn.Module, saved: dict[tuple[int, str], torch.Tensor]) -> None:
    """Copy the snapshot back in place (into whatever Parameter each layer holds now)."""
    for i in range(len(get_blocks(model))):
        for name, module in prunable_linears(model, i).items():
            module.weight.copy_(saved[(i, name)])
            if module.bias is not None:
                module.bias.copy_(saved[(i, name + ".bias")])


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LlmpruneError(f"the recipe asks for device {device!r} but CUDA is not available: set "
                            "device: auto or cpu")
    return device


def _machine(device: str) -> str:
    text = machine()
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(torch.device(device))}"
    return text


def _execute(job: Job, model, tokenizer, recipe: Recipe, device: str, data_dir, progress: bool,
             teacher=None) -> dict:
    """Prune, recover when the run says so (``teacher``: the dense model), evaluate."""
    report = None
    if job.prune is not None:
        report = engine.prune(model, tokenizer, job.prune, data_dir=data_dir,
                              progress=progress, model_name=job.model)
    recovered = None
    if job.recover is None:
        resolved, perplexity, zeroshot = evaluate(model, tokenizer, job.eval, data_dir, progress)
    else:  # recover() evaluates before and after training
        result = recover(model, teacher, tokenizer, job.recover, data_dir=data_dir, progress=progress,
                         eval_config=job.eval)
        resolved = dataclasses.replace(job.eval, seqlen=resolve_seqlen(model, job.eval.seqlen))
        perplexity, zeroshot = result.curve[-1]["perplexity"], result.curve[-1].get("zeroshot")
        recovered = result.to_dict() | {"teacher": job.model, "complete": True}
    record = result_record(name=job.name, model=job.model, config=job.prune, eval_config=resolved,
                           perplexity=perplexity, zeroshot=zeroshot, prune_report=report, recipe=recipe.name,
                           recover=recovered)
    record["machine"] = _machine(device)
    return record


def _select(jobs: list[Job], only: str | Iterable[str] | None) -> list[Job]:
    if only is None:
        return jobs
    wanted = [only] if isinstance(only, str) else list(only)
    names = [job.name for job in jobs]
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise LlmpruneError(f"--only {unknown[0]!r} is not a run of this recipe: runs are {', '.join(names)}")
    return [job for job in jobs if job.name in wanted]


def _check_inputs(jobs: list[Job], data_dir, check_models: bool = True) -> None:
    """Every run's model name, device, data and zero-shot tasks, before the first model loads:
    a typo in the last run of a sweep must not surface hours into it."""
    seen: set = set()
    for job in jobs:
        checks = [("device", job.device), ("data", job.eval.datasets, "eval"), ("tasks", job.eval.zeroshot)]
        if check_models:
            checks.append(("model", job.model))
        if job.prune is not None and needs_for(job.prune):
            checks.append(("data", (job.prune.calib.dataset,), "calibration"))
        if job.prune is not None and job.prune.offload == "disk":
            checks.append(("offload", job.prune.offload_dir))
        if job.recover is not None:
            checks.append(("recover", job.recover, job.eval.datasets, job.prune))
        for check in checks:
            if check in seen:
                continue
            seen.add(check)
            kind = check[0]
            if kind == "model":
                check_model_source(job.model)
            elif kind == "device":
                check_device(_resolve_device(job.device))
            elif kind == "data":
                for name in check[1]:
                    check_available(name, data_dir, split=check[2])
            elif kind == "offload":
                try:
                    check_offload_dir(check[1])
                except LlmpruneError as exc:
                    raise LlmpruneError(f"run {job.name!r}: {exc}") from None
            elif kind == "recover":
                try:
                    check_recover(check[1], data_dir, check[2], check[3])
                except LlmpruneError as exc:
                    raise LlmpruneError(f"run {job.name!r}: {exc}") from None
            elif job.eval.zeroshot:
                build_tasks(job.eval.zeroshot, data_dir)


def _check_shapes(jobs: list[Job], model) -> None:
    """Checks that need the model's shapes (layers matched, N:M divisibility, a shrink method's
    counts, sequence length, memory), for every run on this model, before the first of them runs."""
    for job in jobs:
        try:
            if job.prune is not None:
                engine.plan(model, job.prune)  # the same preflight as `llmprune prune`
            check_eval_memory(model, job.eval)
        except LlmpruneError as exc:
            raise LlmpruneError(f"run {job.name!r}: {exc}") from None


def prepare(recipe_path, out_dir, data_dir=None, only=None, force: bool = False, check_models: bool = True
            ) -> tuple[Recipe, Path, list[Job], list[Job]]:
    """Everything before the first run, shared by every executor: read the recipe, check the
    output folder and every pending run's inputs, claim the folder (``recipe.json``).

    Returns ``(recipe, out folder, selected jobs, pending jobs)``; pending ones have no result yet.
    """
    recipe = load_recipe(recipe_path)
    jobs = plan(recipe)
    selected = _select(jobs, only)
    out = check_output_dir(out_dir, "--out")
    pending = [job for job in selected if not _matches(_read_json(out / job.filename), job)]
    _check_inputs(pending, data_dir, check_models=check_models)
    out.mkdir(parents=True, exist_ok=True)
    _claim_out_dir(out, recipe, jobs, force)
    write_json_atomic(out / RECIPE_FILE, recipe.to_dict())
    return recipe, out, selected, pending


def _run_on_model(model_name: str, dtype: str, device: str, jobs: list[Job], loader, recipe: Recipe,
                  out: Path, data_dir, progress: bool, bar) -> None:
    """Load the model once and run ``jobs`` on it in turn, its original weights restored between
    runs; each result file is written as soon as its run ends."""
    device = _resolve_device(device)
    bar.set_postfix_str(f"loading {model_name}")
    model, tokenizer = loader(model_name, dtype=dtype, device=device)
    _check_shapes(jobs, model)
    saved = snapshot_weights(model)
    dirty = False
    teacher = None  # the dense model, loaded again for the first run that recovers
    try:
        for job in jobs:
            bar.set_postfix_str(job.name)
            if dirty:
                restore_weights(model, saved)
                dirty = False
            dirty = job.prune is not None  # set before running: a failure leaves it pruned
            if job.recover is not None and teacher is None:
                teacher = loader(model_name, dtype=dtype, device=device)[0]
            record = _execute(job, model, tokenizer, recipe, device, data_dir, progress, teacher)
            write_json_atomic(out / job.filename, record)
            bar.update(1)
    finally:
        del model, tokenizer, saved, teacher
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_recipe(
    recipe_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    only: str | Iterable[str] | None = None,
    force: bool = False,
    progress: bool = True,
    loader: Callable[..., tuple[Any, Any]] | None = None,
    report: bool = True,
) -> list[Path]:
    """Run every run of the recipe at ``recipe_path`` that has no result in ``out_dir`` yet.

    ``only``: run names (one or several) to restrict to; dense baselines run only when named
    (``dense``, ``dense-…``). ``force``: reuse a folder that holds another recipe's results.
    ``loader(name, dtype=, device=) -> (model, tokenizer)`` defaults to
    :func:`llmprune.models.load_model`. Returns the result files of the selected runs, in
    plan order, and writes the report (``summary.md`` …) over the whole folder at the end.
    """
    from tqdm.auto import tqdm

    recipe, out, selected, pending = prepare(recipe_path, out_dir, data_dir, only, force,
                                             check_models=loader is None)
    if loader is None:
        loader = load_model

    bar = tqdm(total=len(selected), initial=len(selected) - len(pending), desc=recipe.name, unit="run",
               disable=not progress, position=0)
    try:
        groups: dict[tuple[str, str, str], list[Job]] = {}
        for job in pending:
            groups.setdefault(job.model_key, []).append(job)
        for (model_name, dtype, device), model_jobs in groups.items():
            _run_on_model(model_name, dtype, device, model_jobs, loader, recipe, out, data_dir, progress, bar)
    finally:
        bar.close()

    if report:
        write_report(out)
    return [out / job.filename for job in selected]


__all__ = ["run_recipe", "prepare", "plan", "Job", "snapshot_weights", "restore_weights", "RECIPE_FILE"]
