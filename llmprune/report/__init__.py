"""Tables and plots, generated only from the result JSON files in a folder.

``write_report(folder)`` reads every ``*.json`` there that is a result record
(``llmprune.results``) and writes:

* ``summary.md``: per model and perplexity dataset a paper-style table (rows: methods,
  columns: patterns/sparsities, or the ablated knob when only that varies), the same for mean
  zero-shot accuracy and per task when present, and one row per run with every setting;
* ``summary.csv``: one row per run;
* PNG plots (``plots.py``): perplexity vs sparsity, vs calibration samples, bars per pattern or
  per group/metric, each when that comparison is in the folder;
* ``hides.md`` and ``hides.png`` (``hides.py``) when the runs measured their distance to the
  dense model (``eval.kl``, ``eval.generate``).

Everything is sorted and free of timestamps, so the same files give byte-identical tables. No
torch, transformers or lm-eval import on this path: a report can be made on any machine.
``readme.py`` fills the generated tables of the README and the docs from the same files
(``python -m llmprune.report.readme FILE...``).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from llmprune.errors import LlmpruneError
from llmprune.io import write_text_atomic
from llmprune.report.hides import write_hides
from llmprune.report.plots import PLOTS
from llmprune.report.tables import (
    choose_layout,
    pivot,
    ppl_scopes,
    run_table,
    scope_slugs,
    scope_title,
    sort_key,
    summary_csv,
    zeroshot_sections,
)
from llmprune.results import RESULT_SCHEMA, Result, embedded_dense, is_result, parse_result

SUMMARY_MD = "summary.md"
COST_LINE = ("Pruning cost of the runs above, in forwards of the decoder stack on the calibration windows "
             "(each run's pruning time over its own propagation pass, measured in the same run):")
SUMMARY_CSV = "summary.csv"


class ReportWarning(UserWarning):
    """A file of the folder left out of the report (damaged, hand-edited or not JSON); the
    message names the file and the field, and the report is made from the other files."""


MAX_RESULT_BYTES = 64 << 20  # a result file is kilobytes; anything this large is not one


def _read(path: Path) -> tuple[object, str | None]:
    """The parsed JSON of ``path``, or None and why it cannot be read."""
    try:
        if path.stat().st_size > MAX_RESULT_BYTES:
            return None, f"{path.stat().st_size:,} bytes, too large for a result file"
        return json.loads(path.read_text(encoding="utf-8")), None
    # ValueError: bad JSON, bad UTF-8, a 5000-digit number
    except (OSError, ValueError, RecursionError) as exc:
        return None, f"not valid JSON ({' '.join(str(exc).split())[:200]})"


def load_results(results_dir: str | os.PathLike, skipped: list[str] | None = None) -> list[Result]:
    """Every result in ``results_dir`` (not its subfolders), sorted for display.

    A file that cannot be read or parsed is left out with a :class:`ReportWarning` naming it and
    the field (and listed in ``skipped`` when given): one damaged file must not cost the report
    of all the others."""
    folder = Path(results_dir)
    if not folder.is_dir():
        raise LlmpruneError(f"{folder} is not a folder: give the --out folder of `llmprune run`")
    results: list[Result] = []
    embedded: list[Result] = []
    problems: list[str] = []
    for path in sorted(folder.glob("*.json")):
        record, problem = _read(path)
        if problem is None and is_result(record):
            try:
                parsed = parse_result(record, path.name)
                dense = embedded_dense(record, path.name)
            except LlmpruneError as exc:
                problem = str(exc)
            except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
                problem = f"result file {path.name} cannot be read ({type(exc).__name__}: {str(exc)[:200]})"
            else:
                results.append(parsed)
                if dense is not None:
                    embedded.append(dense)
        elif problem is not None:
            problem = f"{path.name} is {problem}"
        if problem is not None:
            problems.append(f"skipped {problem}")
    # `llmprune prune --json` files carry the dense model's numbers inside: use them where the
    # folder has no dense result of its own for that model and evaluation
    have = {(r.model, r.eval_seqlen, r.max_windows) for r in results if r.dense}
    for r in embedded:
        if (r.model, r.eval_seqlen, r.max_windows) not in have:
            have.add((r.model, r.eval_seqlen, r.max_windows))
            results.append(r)
    if not results:
        why = f" ({'; '.join(problems)})" if problems else ""
        raise LlmpruneError(f"{folder} holds no result files (*.json with schema {RESULT_SCHEMA}){why}: run "
                            "a recipe first, or fix the files")
    for message in problems:
        if skipped is not None:
            skipped.append(message)
        warnings.warn(message, ReportWarning, stacklevel=2)
    return sorted(results, key=sort_key)


def _recipe_description(folder: Path, results: list[Result]) -> str:
    recipe_file = folder / "recipe.json"
    if not recipe_file.is_file():
        return ""
    try:
        recipe = json.loads(recipe_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    names = {r.recipe for r in results}
    if isinstance(recipe, dict) and recipe.get("name") in names:
        return str(recipe.get("description") or "")
    return ""


def write_report(results_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``summary.md``, ``summary.csv`` and the plots into ``results_dir``; return
    ``{file name: path}`` of everything written."""
    folder = Path(results_dir)
    skipped: list[str] = []
    results = load_results(folder, skipped)
    written: dict[str, Path] = {}

    recipes = sorted({r.recipe for r in results if r.recipe})
    title = ", ".join(recipes) if recipes else folder.name
    lines = [f"# Results: {title}", ""]
    description = _recipe_description(folder, results)
    if description:
        lines += [description, ""]
    files = len({r.file.split("#")[0] for r in results})
    lines += [f"Generated by `llmprune report` from {files} result files in this folder "
              "(tables and plots come only from those files).", ""]
    if skipped:
        lines += [f"Left out (fix or delete them): {'; '.join(skipped)}.", ""]
    for label, values in (("Versions", sorted({r.versions for r in results if r.versions})),
                          ("Machine", sorted({r.machine for r in results if r.machine}))):
        if values:
            lines += [f"{label}: {'; '.join(values)}.", ""]

    plots: list[tuple[str, Path]] = []
    scopes = ppl_scopes(results)
    slugs = scope_slugs(scopes)
    for scope, rows in scopes.items():
        dataset = scope[1]
        heading = scope_title(*scope)
        lines += [f"## {heading}", ""]
        lines += pivot(rows, lambda r, d=dataset: r.ppl.get(d)) + [""]
        if any(r.cost is not None for r in rows):
            lines += [COST_LINE, ""]
            lines += pivot([r for r in rows if not r.dense], lambda r: r.cost, digits=1) + [""]
        for kind, plot in PLOTS:
            path = plot(rows, dataset, heading, folder / f"{kind}_{slugs[scope]}.png")
            if path is not None:
                plots.append((heading, path))
                written[path.name] = path

    lines += zeroshot_sections(results)
    compared = sorted({d for r in results for d in r.distance}) or (
        sorted({d for r in results for d in r.ppl}) if any(r.generation for r in results) else [])
    if compared:  # distances to the dense model: the "what perplexity hides" table and plot
        dataset = "wikitext2" if "wikitext2" in compared else compared[0]
        hides = write_hides(folder, dataset)
        written.update({path.name: path for path in hides.values()})
        lines += ["## What perplexity hides", "",
                  f"[hides.md](hides.md): {dataset} perplexity beside the KL to the dense model, top-1 "
                  "agreement, the zero-shot mean, LAMBADA and greedy-continuation agreement, with their rank "
                  "correlations.", ""]
    lines += ["## All runs", ""] + run_table(results) + [""]
    if plots:
        lines += ["## Plots", ""]
        for heading, path in plots:
            lines += [f"![{heading}]({path.name})", ""]
    md = write_text_atomic(folder / SUMMARY_MD, "\n".join(lines).rstrip("\n") + "\n")
    csv_path = write_text_atomic(folder / SUMMARY_CSV, summary_csv(results))
    return {SUMMARY_MD: md, SUMMARY_CSV: csv_path, **dict(sorted(written.items()))}


__all__ = ["write_report", "load_results", "ReportWarning", "pivot", "choose_layout", "summary_csv", "Result"]
