"""Zero-shot accuracy with lm-eval 0.4, on the model in memory (no save and reload).

The Wanda paper (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language
Models", Table 2) judges a pruned model by lm-eval's zero-shot accuracy on BoolQ, RTE, HellaSwag,
WinoGrande, ARC-e, ARC-c and OBQA, and reports their mean; PIQA is offered too. Two tasks of
another kind sit beside them:

- ``lambada_openai`` (loglikelihood of a passage's last word): ``acc`` is the share of passages
  whose last word is the greedy continuation, ``ppl`` lm-eval's perplexity of that word.
- ``gsm8k`` (generate until a stop string, greedy): ``acc`` is the exact match of the
  ``strict-match`` filter ("#### <number>"), and ``metrics`` keeps the ``flexible-extract`` one
  too. Offline there is no train split to draw lm-eval's 5 examples from, so it runs zero-shot
  like every task here; its numbers are not the published 5-shot ones. Generation is slow on a
  CPU: ``max_gen_toks`` (default :data:`MAX_GEN_TOKS`, lm-eval's) caps the answer length.

Where the tasks come from:
- with a data dir (``data_dir=`` or ``$LLMPRUNE_DATA_DIR``): the task YAMLs shipped in the
  package, ``llmprune/tasks/`` (or ``$LLMPRUNE_TASKS_DIR``). Each copies the prompt, choices,
  target and metrics of lm-eval's registered task and reads the original release file from the
  data dir, converted row by row to the hub schema the registered task expects. The data dir
  reaches the readers as lm-eval task metadata (``TaskManager(metadata={"data_dir": ...})``, the
  same as ``lm_eval --metadata``).
- without one: lm-eval's registered tasks by name (they download their datasets from the hub).

The model is wrapped in lm-eval's ``HFLM(pretrained=model, tokenizer=tokenizer)``, which never
touches the hub when given both objects; lm-eval's ``evaluate`` runs one task at a time so each
task gets its own timing. ``simple_evaluate`` is not used: it asks the hub for the model's sha.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import llmprune
from llmprune.data import resolve_data_dir
from llmprune.errors import LlmpruneError
from llmprune.progress import progress as progress_bar
from llmprune.results import AVAILABLE_TASKS  # defined there: reports order tasks without torch

TASKS_DIR_ENV = "LLMPRUNE_TASKS_DIR"
REGISTRY_SOURCE = "lm-eval registry"
MAX_GEN_TOKS = 256  # lm-eval's HFLM default: tokens a generative task may produce per answer
# (metric, filter) reported as a task's ``acc`` where it is not lm-eval's plain "acc,none"
PRIMARY_METRIC = {"gsm8k": ("exact_match", "strict-match")}

# lm-eval says these on every call with an in-memory model or a local reader; none needs action.
_BENIGN_LOG_MESSAGES = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
    "Custom kwargs can be passed to `--metadata`",
    "is defined, but aggregation is not",
    "is defined, but higher_is_better is not",
)


# ----------------------------------------------------------------------------- task selection

def tasks_dir() -> Path:
    """Folder of the local task YAMLs: ``$LLMPRUNE_TASKS_DIR``, else ``llmprune/tasks`` in the
    installed package (package data, so a plain wheel install evaluates offline too)."""
    chosen = os.environ.get(TASKS_DIR_ENV)
    path = Path(chosen).expanduser() if chosen else Path(llmprune.__file__).resolve().parent / "tasks"
    if not path.is_dir():
        where = f"${TASKS_DIR_ENV}" if chosen else "the llmprune installation"
        raise LlmpruneError(f"task folder {path} does not exist: check {where} "
                            "(the task YAMLs ship in llmprune/tasks)")
    return path


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Task names from a list or a comma-separated string, checked, without duplicates, in order."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = []
    for item in items:
        name = str(item).strip().lower()
        if name and name not in names:
            names.append(name)
    unknown = [n for n in names if n not in AVAILABLE_TASKS]
    if unknown:
        raise LlmpruneError(f"unknown task {', '.join(map(repr, unknown))}: "
                            f"available tasks are {', '.join(AVAILABLE_TASKS)}")
    if not names:
        raise LlmpruneError(f"no task given: choose from {', '.join(AVAILABLE_TASKS)}")
    return names


def build_tasks(tasks: str | Sequence[str], data_dir: str | os.PathLike | None = None
                ) -> tuple[dict, dict[str, str]]:
    """lm-eval ``Task`` objects for ``tasks``, with every document already read and checked.

    Returns ``({name: Task}, {name: source})``: the source is the data file(s) read or
    ``"lm-eval registry"``. Any bad name, missing file or malformed row raises before a single
    task runs.
    """
    names = parse_tasks(tasks)
    root = resolve_data_dir(data_dir)
    with _quiet():
        if root is None:
            return _registry_tasks(names)
        return _local_tasks(names, root)


def _local_tasks(names: list[str], root: Path) -> tuple[dict, dict[str, str]]:
    from lm_eval.tasks import TaskManager

    if not root.is_dir():
        raise LlmpruneError(f"data dir {root} does not exist: pass data_dir= or set $LLMPRUNE_DATA_DIR "
                            "to a folder with tasks/")
    folder = tasks_dir()
    missing = [n for n in names if not (folder / f"{n}.yaml").is_file()]
    if missing:
        raise LlmpruneError(f"no task file for {', '.join(missing)} in {folder} (expected {missing[0]}.yaml)")
    manager = TaskManager(include_path=str(folder), include_defaults=False,
                          metadata={"data_dir": str(root.resolve())})
    built, sources = {}, {}
    for name in names:
        task = manager.load([name])["tasks"][name]
        built[name] = task
        sources[name] = _local_source(task, root)
    return built, sources


def _local_source(task, root: Path) -> str:
    kwargs = task.config.dataset_kwargs or {}
    files = list((kwargs.get("data_files") or {}).values())
    if kwargs.get("labels_file"):
        files.append(kwargs["labels_file"])
    paths = [p if Path(p).is_absolute() else str(root.resolve() / p) for p in files]
    return " + ".join(p for p in paths if Path(p).is_file())


def _registry_tasks(names: list[str]) -> tuple[dict, dict[str, str]]:
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    built = {}
    for name in names:
        try:
            built[name] = manager.load([name])["tasks"][name]
        except Exception as exc:  # the hub is unreachable or the dataset moved: a user-side problem
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise LlmpruneError(
                f"task {name}: lm-eval could not load its dataset from the hub "
                f"({type(exc).__name__}: {first});"
                " give a data dir (data_dir= or $LLMPRUNE_DATA_DIR) holding tasks/ to evaluate offline"
            ) from None
    return built, {name: REGISTRY_SOURCE for name in names}


# ----------------------------------------------------------------------------- results

@dataclass(frozen=True)
class TaskResult:
    """One task's scores; ``acc_norm`` and ``ppl`` are None where the task does not define them.

    ``acc`` is the task's accuracy (gsm8k: exact match of the strict-match filter); ``ppl`` its
    perplexity metric (lambada_openai); ``metrics`` every number lm-eval returned, keyed as lm-eval
    keys them (``"exact_match,flexible-extract"``); results saved before these fields read as None.
    """

    name: str
    acc: float
    acc_stderr: float | None
    acc_norm: float | None
    acc_norm_stderr: float | None
    n: int  # documents evaluated
    n_total: int  # documents in the split
    version: str
    source: str  # data file(s) read, or "lm-eval registry"
    seconds: float
    ppl: float | None = None
    metrics: dict[str, float] | None = None


@dataclass(frozen=True)
class ZeroShotResult:
    tasks: dict[str, TaskResult]  # in the order requested
    limit: int | float | None
    batch_size: int | str
    lm_eval_version: str
    num_fewshot: int = 0
    seconds: float = field(default=0.0)

    @property
    def mean_acc(self) -> float:
        """Mean of ``acc`` over the tasks, as the Wanda paper's "Mean" column."""
        return sum(t.acc for t in self.tasks.values()) / len(self.tasks)

    def to_dict(self) -> dict:
        return {
            "kind": "zeroshot",
            "tasks": {name: asdict(t) for name, t in self.tasks.items()},
            "mean_acc": self.mean_acc,
            "limit": self.limit,
            "batch_size": self.batch_size,
            "num_fewshot": self.num_fewshot,
            "lm_eval_version": self.lm_eval_version,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ZeroShotResult:
        """Inverse of :meth:`to_dict` (tables are made from saved JSON)."""
        return cls(tasks={name: TaskResult(**t) for name, t in data["tasks"].items()},
                   limit=data.get("limit"),
                   batch_size=data.get("batch_size", 1), lm_eval_version=data.get("lm_eval_version", ""),
                   num_fewshot=data.get("num_fewshot", 0), seconds=data.get("seconds", 0.0))

    def markdown_table(self) -> str:
        def fmt(value, stderr):
            if value is None:
                return "–"
            return f"{value:.4f} ± {stderr:.4f}" if stderr is not None else f"{value:.4f}"

        # the ppl column only where a task has one, so tables of the accuracy tasks stay as they were
        ppl = any(t.ppl is not None for t in self.tasks.values())
        lines = ["| task | version | n | acc | acc_norm |" + (" ppl |" if ppl else ""),
                 "|---|---:|---:|---:|---:|" + ("---:|" if ppl else "")]
        for t in self.tasks.values():
            extra = f" {fmt(t.ppl, None)} |" if ppl else ""
            lines.append(f"| {t.name} | {t.version} | {t.n} | {fmt(t.acc, t.acc_stderr)} "
                         f"| {fmt(t.acc_norm, t.acc_norm_stderr)} |" + extra)
        lines.append(f"| **mean acc** ({len(self.tasks)} tasks) | | | {self.mean_acc:.4f} | |"
                     + (" |" if ppl else ""))
        return "\n".join(lines) + "\n"


def _number(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
        return float(value)
    return None  # absent, or lm-eval's "N/A" stderr for a single document


def _metric(scores: dict, key: str, filter_name: str = "none") -> float | None:
    return _number(scores.get(f"{key},{filter_name}"))


def _task_result(name: str, out: dict, source: str, seconds: float) -> TaskResult:
    """A :class:`TaskResult` from lm-eval's ``evaluate`` output for one task."""
    scores = out["results"][name]
    counts = out["n-samples"][name]
    metric, filter_name = PRIMARY_METRIC.get(name, ("acc", "none"))
    every = {key: _number(value) for key, value in scores.items() if "," in key}
    return TaskResult(
        name=name,
        acc=_metric(scores, metric, filter_name),
        acc_stderr=_metric(scores, f"{metric}_stderr", filter_name),
        acc_norm=_metric(scores, "acc_norm"),
        acc_norm_stderr=_metric(scores, "acc_norm_stderr"),
        n=int(counts["effective"]),
        n_total=int(counts["original"]),
        version=str(out["versions"][name]),
        source=source,
        seconds=round(seconds, 3),
        ppl=_metric(scores, "perplexity"),
        metrics={key: value for key, value in every.items() if value is not None},
    )


# ----------------------------------------------------------------------------- running

def zeroshot(
    model: Any,
    tokenizer: Any,
    tasks: str | Sequence[str],
    limit: int | float | None = None,
    batch_size: int | str = 1,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
    max_gen_toks: int = MAX_GEN_TOKS,
) -> ZeroShotResult:
    """Zero-shot accuracy of the in-memory ``model`` on ``tasks`` (names from ``AVAILABLE_TASKS``).

    ``limit`` evaluates only the first ``limit`` documents of each task (a float below 1 is a
    fraction, as in lm-eval). ``batch_size`` is lm-eval's (an int, or "auto"). All tasks are
    loaded and checked before the first one runs. lm-eval sets a pad token on ``tokenizer`` if it
    has none and puts ``model`` in eval mode; nothing else is changed. ``data_dir``: local copies
    of the tasks' data (default: ``$LLMPRUNE_DATA_DIR``, else lm-eval's hub datasets).
    ``max_gen_toks``: the most tokens a generative task (gsm8k) generates per answer (lm-eval's
    256 by default; lower it on a CPU). Every task runs zero-shot, gsm8k included (lm-eval's
    registered gsm8k is 5-shot). Returns a :class:`ZeroShotResult` (per task ``acc``/``acc_norm``,
    ``ppl`` where defined, ``metrics``; ``mean_acc``).

    Example::

        >>> import llmprune
        >>> model, tok = llmprune.load_model("smollm2-135m")
        >>> result = llmprune.zeroshot(model, tok, ["boolq", "rte"], limit=20, data_dir="../shared/data")
        >>> sorted(result.tasks)
        ['boolq', 'rte']
    """
    import lm_eval
    from lm_eval.evaluator import evaluate

    _check_limit(limit)
    _check_batch_size(batch_size)
    _check_max_gen_toks(max_gen_toks)
    built, sources = build_tasks(tasks, data_dir)

    results: dict[str, TaskResult] = {}
    start = time.perf_counter()
    with _quiet(), _progress(progress):
        lm = _make_lm(model, tokenizer, batch_size, progress, max_gen_toks)
        _check_room(lm, built, max_gen_toks)
        for name, task in built.items():
            task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=1234)  # simple_evaluate's default; unused at zero shots
            t0 = time.perf_counter()
            out = evaluate(lm=lm, task_dict={"tasks": {name: task}, "groups": {}, "group_map": {}},
                           limit=limit, log_samples=False)
            results[name] = _task_result(name, out, sources[name], time.perf_counter() - t0)
    return ZeroShotResult(tasks=results, limit=limit, batch_size=batch_size,
                          lm_eval_version=lm_eval.__version__, seconds=round(time.perf_counter() - start, 3))


def _check_limit(limit) -> None:
    if limit is None:
        return
    ok = (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1) or (
        isinstance(limit, float) and 0.0 < limit < 1.0)
    if not ok:
        raise LlmpruneError(f"limit must be a positive number of documents or a fraction in (0, 1), "
                            f"got {limit!r}")


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        return
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise LlmpruneError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")


def _check_max_gen_toks(max_gen_toks) -> None:
    if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 1:
        raise LlmpruneError(f"max_gen_toks must be a positive number of tokens, got {max_gen_toks!r}")


def _check_room(lm, built: dict, max_gen_toks: int) -> None:
    # lm-eval keeps max_length - max_gen_toks tokens of prompt and asserts that is positive
    generative = [name for name, task in built.items() if task.config.output_type == "generate_until"]
    if generative and max_gen_toks >= lm.max_length:
        raise LlmpruneError(f"max_gen_toks {max_gen_toks} leaves no room for the prompt of {generative[0]} "
                            f"in the model's {lm.max_length} tokens of context: lower max_gen_toks")


def _make_lm(model, tokenizer, batch_size, progress: bool, max_gen_toks: int = MAX_GEN_TOKS):
    from lm_eval.models.huggingface import HFLM

    class InMemoryHFLM(HFLM):
        """HFLM whose loglikelihood and generation progress bars follow ``progress``."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not progress)

        @property
        def max_gen_toks(self) -> int:  # HFLM hard-codes 256 here; a task's generation_kwargs still win
            return max_gen_toks

    # The tokenizer object is passed so HFLM never looks the model's name up on the hub; HFLM
    # gives it a pad token if it has none (batched generation pads on the left).
    return InMemoryHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


class _DropBenign(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _BENIGN_LOG_MESSAGES)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval logs at WARNING and above, without its per-call notices; datasets without bars."""
    import datasets
    import lm_eval.api.task  # noqa: F401  (create lm-eval's loggers so the filter reaches them)
    import lm_eval.evaluator  # noqa: F401
    import lm_eval.models.huggingface  # noqa: F401

    root = logging.getLogger("lm_eval")
    loggers = [root] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                        if name.startswith("lm_eval.")]
    level = root.level
    drop = _DropBenign()
    bars = datasets.is_progress_bar_enabled()
    root.setLevel(logging.WARNING)
    for logger in loggers:
        logger.addFilter(drop)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        root.setLevel(level)
        for logger in loggers:
            logger.removeFilter(drop)
        if bars:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _progress(progress: bool) -> Iterator[None]:
    """lm-eval's bars (no flag reaches some of them) as llmprune shows progress.

    Without ``progress``, lm-eval's "building contexts" bar is hidden too. With it, on a terminal
    lm-eval draws its own tqdm bars; elsewhere (a log file) they become plain lines
    (:mod:`llmprune.progress`), since a bar's carriage returns make a log unreadable.
    """
    import lm_eval.api.model as model_module
    import lm_eval.api.task as task_module
    import lm_eval.models.huggingface as hf_module
    import tqdm as tqdm_module  # lm-eval's bootstrap of a perplexity's stderr imports tqdm.tqdm when it runs

    if progress and sys.stderr.isatty():
        yield
        return
    modules = ((task_module, model_module, hf_module, tqdm_module) if progress
               else (task_module, tqdm_module))
    originals = [module.tqdm for module in modules]
    for module, original in zip(modules, originals):
        module.tqdm = _plain_tqdm if progress else functools.partial(original, disable=True)
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            module.tqdm = original


def _plain_tqdm(iterable: Iterable | None = None, total: int | None = None, desc: str | None = None,
                disable: bool = False, unit: str = "it", **_ignored: object) -> Any:
    """``tqdm(...)`` as lm-eval calls it, answered with plain progress lines."""
    return progress_bar(total, desc or "lm-eval", unit, disable=disable, iterable=iterable)
