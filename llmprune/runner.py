"""Run a recipe: every run's result JSON in one folder, resumable, then the report.

The dense model is loaded once per (model, dtype, device). The original weights of the prunable
layers are kept on the CPU and copied back before each pruning run, which is much faster than
reloading and gives the same numbers. The unpruned model is evaluated once per (model, eval
settings) and written as its own result (method ``dense``).

Each result is written atomically as soon as its run ends, so a crash or Ctrl-C loses at most
the run in progress; running the recipe again skips every run whose result is already there.
The folder's ``recipe.json`` (the resolved recipe) guards against mixing two recipes' results.
Which result files a recipe makes and which of them a folder already holds is decided in
:mod:`llmprune.jobs` (torch-free, shared with ``llmprune run --list``).
"""

from __future__ import annotations

import dataclasses
import gc
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from llmprune import engine
from llmprune.data import check_available
from llmprune.errors import LlmpruneError
from llmprune.evaluation import (
    DenseReference,
    check_eval_memory,
    dense_caches_ready,
    dense_reference,
    evaluate,
    needs_dense,
)
from llmprune.evaluation.generation import check_prompt_source
from llmprune.evaluation.zeroshot import build_tasks
from llmprune.io import check_output_dir, write_json_atomic
from llmprune.jobs import RECIPE_FILE, Job, claim_out_dir, comparable_recipe, matches, plan, read_json, select
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
from llmprune.progress import progress as progress_bar
from llmprune.recipes import Recipe, load_recipe
from llmprune.recover import check_inputs as check_recover
from llmprune.recover import recover
from llmprune.report import write_report
from llmprune.results import machine, result_record


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
             teacher=None, reference: DenseReference | None = None) -> dict:
    """Prune, recover when the run says so (``teacher``: the dense model), evaluate; the distances
    to the dense model compare with ``reference`` (the dense run writes its caches)."""
    report = None
    if job.prune is not None:
        report = engine.prune(model, tokenizer, job.prune, data_dir=data_dir,
                              progress=progress, model_name=job.model)
    recovered = None
    if job.recover is None:
        if reference is not None and needs_dense(job.eval):
            reference = dataclasses.replace(reference, record=job.prune is None)
        else:
            reference = None
        result = evaluate(model, tokenizer, job.eval, data_dir, progress, dense=reference)
        resolved, perplexity, zeroshot = result.config, result.perplexity, result.zeroshot
        generation = result.generation_dict()
    else:  # recover() evaluates before and after training
        result = recover(model, teacher, tokenizer, job.recover, data_dir=data_dir, progress=progress,
                         eval_config=job.eval)
        resolved = dataclasses.replace(job.eval, seqlen=resolve_seqlen(model, job.eval.seqlen))
        perplexity, zeroshot = result.curve[-1]["perplexity"], result.curve[-1].get("zeroshot")
        recovered = result.to_dict() | {"teacher": job.model, "complete": True}
        generation = None
    record = result_record(name=job.name, model=job.model, config=job.prune, eval_config=resolved,
                           perplexity=perplexity, zeroshot=zeroshot, prune_report=report, recipe=recipe.name,
                           recover=recovered, generation=generation)
    record["machine"] = _machine(device)
    return record


def _cache_setting(evaluation):
    """The part of an evaluation setting the dense caches depend on (no zero-shot tasks)."""
    return dataclasses.replace(evaluation, zeroshot=(), limit=None)


def _record_dense(model, tokenizer, jobs: list[Job], reference: DenseReference, data_dir,
                  progress: bool) -> None:
    """Write the dense model's caches for ``jobs`` where they are missing (a resumed recipe whose
    dense run was done before, its caches since deleted): one dense pass per evaluation setting,
    skipped where every cache is already there."""
    recorded = dataclasses.replace(reference, record=True)
    done = set()
    for job in jobs:
        setting = _cache_setting(job.eval)
        if setting in done or dense_caches_ready(model, tokenizer, setting, recorded, data_dir):
            continue
        done.add(setting)
        evaluate(model, tokenizer, setting, data_dir, progress, dense=recorded)


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
        if job.eval.generate:
            calib = job.prune.calib if job.prune is not None and needs_for(job.prune) else None
            checks.append(("prompts", calib.dataset if calib else None, calib.seqlen if calib else None))
        if job.recover is not None:
            checks.append(("recover", job.recover, job.eval.datasets, job.prune))
            if needs_dense(job.eval):
                raise LlmpruneError(f"run {job.name!r}: a recovered run does not measure eval.kl or "
                                    "eval.generate yet: drop them from this run")
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
            elif kind == "prompts":
                try:
                    check_prompt_source(data_dir, calib=check[1], calib_seqlen=check[2])
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
    selected = select(jobs, only, recipe_path)
    out = check_output_dir(out_dir, "--out")
    pending = [job for job in selected if not matches(read_json(out / job.filename), job)]
    _check_inputs(pending, data_dir, check_models=check_models)
    out.mkdir(parents=True, exist_ok=True)
    claim_out_dir(out, recipe, jobs, force)
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
    # the dense model's fingerprint, the key of the caches every run's distances read
    comparing = [job for job in jobs if needs_dense(job.eval)]
    reference = dense_reference(model, comparing[0].eval) if comparing else None
    if comparing and any(job.eval.kl_exact for job in comparing):
        reference = dataclasses.replace(reference, model=loader(model_name, dtype=dtype, device=device)[0])
    if comparing:
        # dense runs first: their pass writes the caches the others read; a setting whose dense run was
        # done earlier gets its caches checked (and rebuilt where missing) now
        jobs = sorted(jobs, key=lambda job: job.prune is not None or job.recover is not None)
        pending_dense = {_cache_setting(job.eval) for job in jobs
                         if job.prune is None and job.recover is None}
        _record_dense(model, tokenizer,
                      [job for job in comparing if _cache_setting(job.eval) not in pending_dense],
                      reference, data_dir, progress)
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
            record = _execute(job, model, tokenizer, recipe, device, data_dir, progress, teacher, reference)
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
    recipe, out, selected, pending = prepare(recipe_path, out_dir, data_dir, only, force,
                                             check_models=loader is None)
    if loader is None:
        loader = load_model

    bar = progress_bar(len(selected), recipe.name, "run", disable=not progress,
                       initial=len(selected) - len(pending), position=0)
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


# plan, Job, RECIPE_FILE and comparable_recipe live in llmprune.jobs (torch-free); named here as before
__all__ = ["run_recipe", "prepare", "plan", "Job", "snapshot_weights", "restore_weights", "RECIPE_FILE",
           "comparable_recipe"]
