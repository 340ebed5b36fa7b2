"""Readers for the original release files of the zero-shot tasks, for lm-eval's ``custom_dataset``.

Each task YAML next to this file copies the prompt, choices, target and metrics of lm-eval's
registered task and replaces only the data source: ``custom_dataset`` points at a reader here,
which parses the original release file (named in ``dataset_kwargs.data_files``, relative to the
data dir) and converts every row into the schema of the hub dataset the registered task reads.
The registered templates then apply unchanged.

lm-eval calls ``custom_dataset(**metadata, **dataset_kwargs)``; the data dir arrives as
``metadata["data_dir"]`` (``TaskManager(metadata={"data_dir": ...})`` or ``lm_eval --metadata``),
falling back to ``$LLMPRUNE_DATA_DIR``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import datasets

try:  # inside llmprune, bad files are user errors the CLI reports in one line
    from llmprune.errors import LlmpruneError as TaskDataError
except ImportError:  # plain `lm_eval --include_path <this folder>` without llmprune importable
    TaskDataError = ValueError  # type: ignore[misc,assignment]

DATA_DIR_ENV = "LLMPRUNE_DATA_DIR"

# What each task expects, for error messages.
FORMATS = {
    "boolq": "SuperGLUE BoolQ jsonl: question, passage, idx, boolean label",
    "rte": "SuperGLUE RTE jsonl: premise, hypothesis, idx, label 'entailment'/'not_entailment'",
    "winogrande": "WinoGrande jsonl: sentence with one '_', option1, option2, answer '1'/'2' "
                  "(or the answers in the labels file, one per line)",
    "arc": "AI2 ARC jsonl: id, question.stem, question.choices[{text, label}], answerKey",
    "openbookqa": "OpenBookQA jsonl: id, question.stem, question.choices[{text, label}], answerKey",
    "piqa": "PIQA jsonl: goal, sol1, sol2; labels file: one 0/1 per line",
    "hellaswag": "HellaSwag (rowanz) jsonl: ind, activity_label, ctx_a, ctx_b, ctx, endings[4], "
                 "label, source_id, split, split_type",
    "lambada_openai": "LAMBADA (OpenAI) jsonl: text, a passage whose last word is the target",
    "gsm8k": "GSM8K (openai/grade-school-math) jsonl: question, answer ending in '#### <number>'",
}


class RowError(Exception):
    """A row that does not have the expected shape; the reader adds file and line."""


# ----------------------------------------------------------------------------- file access

def _resolve(task: str, data_dir, relative: str) -> Path:
    path = Path(relative).expanduser()
    if not path.is_absolute():
        root = data_dir or os.environ.get(DATA_DIR_ENV)
        if not root:
            raise TaskDataError(
                f"task {task}: no data dir to find {relative} in: pass metadata data_dir or set "
                f"${DATA_DIR_ENV}"
            )
        path = Path(root).expanduser() / path
    if not path.is_file():
        raise TaskDataError(f"task {task}: data file {path} not found (expected {FORMATS[_kind(task)]})")
    return path


def _kind(task: str) -> str:
    return "arc" if task.startswith("arc") else task


def _read_jsonl(task: str, path: Path) -> list[tuple[int, dict]]:
    """``[(line_number, row)]``; blank lines are skipped, anything else must be a JSON object."""
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskDataError(f"task {task}: {path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise TaskDataError(f"task {task}: {path}:{lineno}: expected a JSON object, got "
                                    f"{type(row).__name__}")
            rows.append((lineno, row))
    if not rows:
        raise TaskDataError(f"task {task}: {path} has no rows (expected {FORMATS[_kind(task)]})")
    return rows


def _read_labels(task: str, path: Path, n_rows: int) -> list[str]:
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != n_rows:
        raise TaskDataError(f"task {task}: {path} has {len(labels)} labels for {n_rows} rows")
    return labels


def _convert(task: str, path: Path, rows, convert: Callable[..., dict], labels=None) -> list[dict]:
    out = []
    for i, (lineno, row) in enumerate(rows):
        try:
            out.append(convert(row, labels[i] if labels is not None else None))
        except RowError as exc:
            raise TaskDataError(f"task {task}: {path}:{lineno}: {exc} (expected "
                                f"{FORMATS[_kind(task)]})") from None
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            what = f"missing key {exc}" if isinstance(exc, KeyError) else f"bad row ({exc})"
            raise TaskDataError(f"task {task}: {path}:{lineno}: {what} (expected "
                                f"{FORMATS[_kind(task)]})") from None
    return out


def _dataset(split: str, docs: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})


def _one_split(task: str, data_files: dict) -> tuple[str, str]:
    if not isinstance(data_files, dict) or len(data_files) != 1:
        raise TaskDataError(f"task {task}: dataset_kwargs.data_files must map one split to one file")
    return next(iter(data_files.items()))


def _text(row: dict, key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"{key!r} must be a string, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------- converters
# Each maps one original row (plus its label from a labels file, if any) to the hub schema.

def _boolq(row: dict, _label) -> dict:
    # aps/super_glue boolq: question, passage, idx, label (0 = False, 1 = True)
    label = row["label"]
    if isinstance(label, str) and label.lower() in ("true", "false"):
        label = label.lower() == "true"
    if not isinstance(label, bool):
        raise RowError(f"label must be true or false, got {label!r}")
    return {"question": _text(row, "question"), "passage": _text(row, "passage"),
            "idx": int(row.get("idx", -1)), "label": int(label)}


_RTE_LABELS = {"entailment": 0, "not_entailment": 1}  # GLUE's ClassLabel order


def _rte(row: dict, _label) -> dict:
    # nyu-mll/glue rte: sentence1, sentence2, label (0 = entailment, 1 = not_entailment), idx
    label = row["label"]
    if label not in _RTE_LABELS:
        raise RowError(f"label must be 'entailment' or 'not_entailment', got {label!r}")
    return {"sentence1": _text(row, "premise"), "sentence2": _text(row, "hypothesis"),
            "label": _RTE_LABELS[label], "idx": int(row.get("idx", -1))}


def _winogrande(row: dict, label) -> dict:
    # allenai/winogrande winogrande_xl: sentence, option1, option2, answer ('1' or '2')
    answer = str(row["answer"]) if row.get("answer") not in (None, "") else label
    if label is not None and answer != label:
        raise RowError(f"answer {answer!r} disagrees with the labels file ({label!r})")
    if answer not in ("1", "2"):
        raise RowError(f"answer must be '1' or '2', got {answer!r}")
    sentence = _text(row, "sentence")
    if "_" not in sentence:
        raise RowError("sentence has no '_' blank")
    return {"sentence": sentence, "option1": _text(row, "option1"), "option2": _text(row, "option2"),
            "answer": answer}


def _ai2_choices(row: dict) -> tuple[str, dict]:
    question = row["question"]
    choices = question["choices"]
    if not isinstance(choices, list) or not choices:
        raise RowError("question.choices must be a non-empty list")
    texts = [str(c["text"]) for c in choices]
    labels = [str(c["label"]) for c in choices]
    answer = str(row["answerKey"])
    if answer.strip() not in labels:
        raise RowError(f"answerKey {answer!r} is not one of the choice labels {labels}")
    return _text(question, "stem"), {"text": texts, "label": labels}


def _arc(row: dict, _label) -> dict:
    # allenai/ai2_arc: id, question, choices {text, label}, answerKey (labels kept as released,
    # so the few "1".."4" keys still index their own labels)
    stem, choices = _ai2_choices(row)
    return {"id": str(row["id"]), "question": stem, "choices": choices, "answerKey": str(row["answerKey"])}


def _openbookqa(row: dict, _label) -> dict:
    # allenai/openbookqa main: id, question_stem, choices {text, label}, answerKey
    stem, choices = _ai2_choices(row)
    return {"id": str(row["id"]), "question_stem": stem, "choices": choices,
            "answerKey": str(row["answerKey"])}


def _piqa(row: dict, label) -> dict:
    # baber/piqa: goal, sol1, sol2, label (0 or 1)
    if label not in ("0", "1"):
        raise RowError(f"label must be 0 or 1, got {label!r}")
    return {"goal": _text(row, "goal"), "sol1": _text(row, "sol1"),
            "sol2": _text(row, "sol2"), "label": int(label)}


def _hellaswag(row: dict, _label) -> dict:
    # Rowan/hellaswag: the same fields as the release, but label is a string
    endings = row["endings"]
    if not isinstance(endings, list) or len(endings) != 4:
        raise RowError("endings must be a list of 4 strings")
    label = row["label"]
    if isinstance(label, bool) or str(label) not in ("0", "1", "2", "3"):
        raise RowError(f"label must be 0-3, got {label!r}")
    return {"ind": int(row.get("ind", -1)), "activity_label": _text(row, "activity_label"),
            "ctx_a": _text(row, "ctx_a"), "ctx_b": _text(row, "ctx_b"), "ctx": _text(row, "ctx"),
            "endings": [str(e) for e in endings], "source_id": str(row.get("source_id", "")),
            "split": str(row.get("split", "")), "split_type": str(row.get("split_type", "")),
            "label": str(label)}


def _lambada(row: dict, _label) -> dict:
    # EleutherAI/lambada_openai: text only; the task splits off the last word itself
    text = _text(row, "text")
    if len(text.split(" ")) < 2:
        raise RowError("text must hold a context and a last word separated by a space")
    return {"text": text}


def _gsm8k(row: dict, _label) -> dict:
    # openai/gsm8k main: question, answer (worked solution, final line "#### <number>")
    answer = _text(row, "answer")
    if "#### " not in answer:
        raise RowError("answer has no '#### <number>' final line")
    return {"question": _text(row, "question"), "answer": answer}


# ----------------------------------------------------------------------------- custom_dataset entry points

def _loader(task: str, convert: Callable[..., dict], labels: str = "none"):
    """A ``custom_dataset`` reader; ``labels`` is "none", "optional" (cross-checked when the file
    exists) or "required" for tasks whose answers live in a separate ``labels_file``."""

    def load(data_files: dict | None = None, labels_file: str | None = None, data_dir: str | None = None,
             **_metadata) -> datasets.DatasetDict:
        split, relative = _one_split(task, data_files)
        path = _resolve(task, data_dir, relative)
        rows = _read_jsonl(task, path)
        answers = None
        if labels_file and labels != "none":
            labels_path = (_resolve(task, data_dir, labels_file) if labels == "required"
                           else _optional(task, data_dir, labels_file))
            answers = _read_labels(task, labels_path, len(rows)) if labels_path else None
        elif labels == "required":
            raise TaskDataError(f"task {task}: dataset_kwargs.labels_file is not set")
        return _dataset(split, _convert(task, path, rows, convert, answers))

    load.__name__ = f"load_{task}"
    return load


def _optional(task: str, data_dir, relative: str) -> Path | None:
    try:
        return _resolve(task, data_dir, relative)
    except TaskDataError:
        return None


boolq = _loader("boolq", _boolq)
rte = _loader("rte", _rte)
winogrande = _loader("winogrande", _winogrande, labels="optional")
arc_easy = _loader("arc_easy", _arc)
arc_challenge = _loader("arc_challenge", _arc)
openbookqa = _loader("openbookqa", _openbookqa)
piqa = _loader("piqa", _piqa, labels="required")
hellaswag = _loader("hellaswag", _hellaswag)
lambada_openai = _loader("lambada_openai", _lambada)
gsm8k = _loader("gsm8k", _gsm8k)
