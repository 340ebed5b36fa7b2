"""Executors for a recipe's runs: in this process, or one job per run through submitit.

``local`` (the default) is :func:`llmprune.runner.run_recipe`: every run in this process, one
model load shared by the runs on that model. ``slurm`` submits one SLURM job per pending run as
a job array through submitit (facebookincubator/submitit, the launcher researchers use);
``submitit-local`` does the same with submitit's local executor, each run a separate process on
this machine (a dry run of a SLURM sweep, or parallel runs on a multi-GPU box).

Every job runs ``run_recipe(recipe, out, only=[its run])``, so results are the same per-run
files as with ``local``, written atomically by the job that computed them: a half-finished sweep
resubmits only the runs without a result, and ``llmprune report`` reads the folder as before.
submitit's own files (pickled calls, logs) go to ``OUT/.submitit/``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

from llmprune.config import EXECUTORS, SlurmConfig
from llmprune.errors import LlmpruneError
from llmprune.progress import progress as progress_bar
from llmprune.report import write_report

SUBMITIT_INSTALL = "pip install submitit"
SUBMITIT_FOLDER = ".submitit"


def _submitit():
    try:
        import submitit
    except ImportError:
        raise LlmpruneError("the slurm executors need submitit, which is not installed: run "
                            f"`{SUBMITIT_INSTALL}`") from None
    return submitit


def check_executor(executor: str, slurm_options_given: bool = False) -> None:
    """A known executor whose package is installed; SLURM options only with ``slurm``."""
    if executor not in EXECUTORS:
        raise LlmpruneError(f"unknown executor {executor!r}: use one of {', '.join(EXECUTORS)}")
    if slurm_options_given and executor != "slurm":  # submitit-local would ignore them silently
        raise LlmpruneError("SLURM options (--partition, --gpus-per-job, --time, ...) need --executor slurm, "
                            f"not {executor}")
    if executor == "local":
        return
    _submitit()
    if executor == "slurm" and shutil.which("sbatch") is None:
        raise LlmpruneError("--executor slurm needs SLURM's sbatch, which is not on PATH: run from a SLURM "
                            "login node, or use --executor submitit-local to run each job as a local process")


def run_one(recipe_path: str, out_dir: str, name: str, data_dir: str | None) -> str:
    """One job: the run called ``name``. Top level, so submitit can pickle it by reference."""
    from llmprune.runner import run_recipe

    (path,) = run_recipe(recipe_path, out_dir, data_dir=data_dir, only=[name], progress=False, report=False)
    return str(path)


def slurm_parameters(slurm: SlurmConfig, cluster: str, recipe_name: str) -> dict:
    params = {"name": f"llmprune-{recipe_name}", "timeout_min": slurm.time}
    if cluster == "slurm":
        params.update(gpus_per_node=slurm.gpus_per_job, slurm_array_parallelism=slurm.array_parallelism)
        if slurm.partition:
            params["slurm_partition"] = slurm.partition
        if slurm.mem_gb:
            params["mem_gb"] = slurm.mem_gb
        if slurm.cpus_per_task:
            params["cpus_per_task"] = slurm.cpus_per_task
    return params


def run_recipe_submitit(
    recipe_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    only: str | Iterable[str] | None = None,
    force: bool = False,
    executor: str = "slurm",
    slurm: SlurmConfig | None = None,
    progress: bool = True,
    report: bool = True,
) -> list[Path]:
    """Submit one job per pending run of the recipe, wait for them all, then write the report.

    ``slurm`` sizes the jobs; None takes the recipe's ``slurm:`` block, else the defaults. A job
    that fails does not stop the others; when any failed, the error names them and their logs
    after the others have finished and the report has been written over what landed.
    """
    from llmprune.runner import prepare

    check_executor(executor)
    submitit = _submitit()
    recipe_path = Path(recipe_path).resolve()
    recipe, out, selected, pending = prepare(recipe_path, out_dir, data_dir, only, force)
    out = out.resolve()
    slurm = slurm or recipe.slurm or SlurmConfig()
    cluster = "slurm" if executor == "slurm" else "local"
    failures: list[str] = []
    if pending:
        pool = submitit.AutoExecutor(folder=out / SUBMITIT_FOLDER, cluster=cluster)
        pool.update_parameters(**slurm_parameters(slurm, cluster, recipe.name))
        names = [job.name for job in pending]
        n = len(names)
        data = str(Path(data_dir).resolve()) if data_dir is not None else None
        jobs = pool.map_array(run_one, [str(recipe_path)] * n, [str(out)] * n, names, [data] * n)
        bar = progress_bar(len(selected), f"{recipe.name} ({executor})", "run", disable=not progress,
                           initial=len(selected) - n)
        try:
            for name, job in zip(names, jobs):
                try:
                    job.result()
                except Exception as exc:  # noqa: BLE001 — a failed job is reported with its log, not raised
                    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                    failures.append(f"{name} (job {job.job_id}: {reason}; log {job.paths.stderr})")
                bar.update(1)
        finally:
            bar.close()
    if report and any((out / job.filename).exists() for job in selected):
        write_report(out)
    if failures:
        raise LlmpruneError(f"{len(failures)} of {len(pending)} jobs failed: " + "; ".join(failures))
    return [out / job.filename for job in selected]


__all__ = ["run_recipe_submitit", "check_executor", "run_one"]
