"""Calibration windows and evaluation token streams (hub or a local data dir).

The texts and the random draws reproduce the reference scripts (IST-DASLab/sparsegpt
``datautils.py``, locuslab/wanda ``lib/data.py``) exactly:

- **wikitext2** (``wikitext-2-raw-v1``): rows as the HF builder yields them, one per line of
  ``wiki.*.raw`` with its newline kept, a whitespace-only line (" \\n" in the raw files) as "".
  Evaluation text = test rows joined by "\\n\\n"; calibration text = train rows joined by " ".
- **ptb** (``ptb_text_only``): each line of ``ptb.*.txt`` stripped; rows joined by " ".
  Evaluation on test, calibration on train.
- **c4** (``allenai/c4`` en): calibration draws whole documents with the reference rejection
  loop (``randint`` a document, tokenize it alone, keep it if longer than ``seqlen``, then
  ``randint`` a start). Evaluation = the first 1100 validation documents joined by " ",
  tokenized, cut to the first ``256 * seqlen`` tokens.
- a local ``.txt`` file (its whole text, windowed like wikitext2) or ``.jsonl``/``.json``/
  ``.json.gz`` documents with a ``text`` field (c4-style draws; evaluation joins them by " ").

Every text is tokenized whole, ``tokenizer(text, return_tensors="pt").input_ids``, so a
tokenizer that adds BOS adds it once, at the start. Draws use ``random.Random(seed)``: the same
numbers as the references' ``random.seed(seed); random.randint(...)``, without touching the
global generator.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import socket
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence
from urllib.parse import urlparse

import torch

from llmprune.errors import LlmpruneError

DATA_DIR_ENV = "LLMPRUNE_DATA_DIR"
DATASETS = ("wikitext2", "ptb", "c4")

C4_EVAL_DOCS = 1100  # validation documents the references join for evaluation
C4_EVAL_WINDOWS = 256  # ... and the stream is cut to this many windows of seqlen
_DOC_SUFFIXES = (".jsonl", ".json", ".json.gz", ".jsonl.gz")
_TEXT_SUFFIXES = (".txt",)
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The explicit data dir, else ``$LLMPRUNE_DATA_DIR``, else None (use the hub)."""
    chosen = data_dir if data_dir else os.environ.get(DATA_DIR_ENV)
    return Path(chosen).expanduser() if chosen else None


# ---------------------------------------------------------------------------------------------
# Where each dataset's splits live
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Hub:
    """A split on the Hugging Face hub, loaded with ``datasets.load_dataset``."""

    path: str
    config: str | None
    split: str
    column: str
    data_file: str | None = None

    def describe(self) -> str:
        where = self.data_file or f"{self.config}:{self.split}"
        return f"hub:{self.path}/{where}"


@dataclass(frozen=True)
class _Source:
    """Where one split comes from: local files (read in order) or a hub split."""

    files: tuple[Path, ...] = ()
    hub: _Hub | None = None

    def describe(self) -> str:
        return self.hub.describe() if self.hub else ", ".join(str(p) for p in self.files)

    def fingerprint(self) -> tuple:
        """Changes whenever the data could: each file's path, mtime and size, or the hub split."""
        if self.hub:
            return (self.hub,)
        out = []
        for path in self.files:
            st = path.stat()
            out.append((str(path.resolve()), st.st_mtime_ns, st.st_size))
        return tuple(out)


# (files found or None, what was searched); pure path work, safe on a folder that is not there
Locator = Callable[[Path, str], "tuple[tuple[Path, ...] | None, list[str]]"]


@dataclass(frozen=True)
class _Dataset:
    """How one named dataset is found, read and turned into text.

    ``eval_join``/``calib_join`` join a text dataset's rows; None marks a document dataset
    (c4 style: rejection-loop calibration, evaluation on the first ``eval_docs`` documents
    joined by " " and cut to ``eval_windows * seqlen`` tokens).
    """

    name: str
    eval_split: str
    calib_split: str
    locate: Locator
    read: Callable[[Path], list[str]]
    hub: Callable[[str], _Hub | None]
    eval_join: str | None = None
    calib_join: str | None = None
    eval_docs: int | None = None
    eval_windows: int | None = None

    @property
    def documents(self) -> bool:
        return self.eval_join is None


def _first_existing(candidates: list[Path]) -> tuple[tuple[Path, ...] | None, list[str]]:
    for path in candidates:
        if path.is_file():
            return (path,), [str(p) for p in candidates]
    return None, [str(p) for p in candidates]


def _locate_wikitext(root: Path, split: str) -> tuple[tuple[Path, ...] | None, list[str]]:
    raw = {"train": "train", "validation": "valid", "test": "test"}[split]
    return _first_existing([
        root / "wikitext-2-raw-v1" / f"wiki.{raw}.raw",
        root / "wikitext-2-raw" / f"wiki.{raw}.raw",  # the folder name inside the original zip
        root / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet",
        root / "wikitext" / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet",
    ])


def _locate_ptb(root: Path, split: str) -> tuple[tuple[Path, ...] | None, list[str]]:
    name = {"train": "train", "validation": "valid", "test": "test"}[split]
    return _first_existing([root / "ptb" / f"ptb.{name}.txt"])


def _is_doc_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_DOC_SUFFIXES)


def _locate_c4(root: Path, split: str) -> tuple[tuple[Path, ...] | None, list[str]]:
    searched = []
    for folder in (root / "c4", root / "c4-sample"):
        rule = ("with 'validation' in the name" if split == "validation"
                else "without 'validation' in the name")
        searched.append(f"{folder}/**/*{{.json,.jsonl,.json.gz}} {rule}")
        if not folder.is_dir():
            continue
        files = sorted((p for p in folder.rglob("*") if _is_doc_file(p)),
                       key=lambda p: str(p.relative_to(folder)))
        if split == "validation":
            files = [p for p in files if "validation" in p.name]
        else:
            files = [p for p in files if "train" in p.name or "validation" not in p.name]
        if files:
            return tuple(files), searched
    return None, searched


# ---------------------------------------------------------------------------------------------
# Reading files (errors name the file, and the line where there is one)
# ---------------------------------------------------------------------------------------------


def _open_text(path: Path):
    # Text mode with universal newlines, exactly as the HF builders opened the raw files.
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line with its newline)``; decoding/IO problems become LlmpruneError."""
    try:
        with _open_text(path) as f:
            yield from enumerate(f, 1)
    except UnicodeDecodeError as exc:
        where = _first_undecodable_line(path)
        raise LlmpruneError(f"{path} line {where} is not UTF-8 text ({exc.reason}): "
                            "replace the file") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise LlmpruneError(f"cannot read {path}: {_first_line(exc)} (replace the file)") from None


def _first_undecodable_line(path: Path) -> int | str:
    # Text mode decodes ahead in chunks, so the failing line is found again byte-wise.
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return "?"


def _read_wikitext(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        return _read_parquet_column(path, "text")
    # The HF wikitext builder: each line is a row, kept with its "\n"; a blank line becomes "".
    return [line if line.strip() else "" for _, line in _lines(path)]


def _read_ptb(path: Path) -> list[str]:
    # The HF ptb_text_only builder: each line stripped (its newline and the leading space go).
    return [line.strip() for _, line in _lines(path)]


def _read_whole_text(path: Path) -> list[str]:
    return ["".join(line for _, line in _lines(path))]


def _read_parquet_column(path: Path, column: str) -> list[str]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=[column])
    except (KeyError, ValueError) as exc:  # missing column (pyarrow raises ArrowInvalid, a ValueError)
        raise LlmpruneError(f"{path} cannot be read as parquet with a {column!r} column: "
                            f"{_first_line(exc)}") from None
    except OSError as exc:
        raise LlmpruneError(f"{path} is not a readable parquet file: {_first_line(exc)}") from None
    rows = table.column(column).to_pylist()
    if any(not isinstance(r, str) for r in rows):
        raise LlmpruneError(f"{path}: column {column!r} holds non-text values")
    return rows


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _doc_text(obj: object, path: Path, where: str) -> str:
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise LlmpruneError(f"{path} {where} has no 'text' string field: each document needs one")
    return obj["text"]


def _read_documents(path: Path) -> list[str]:
    """Texts of a JSON-lines file (plain or gzip), or of a ``.json`` holding a list of objects."""
    docs: list[str] = []
    lines = _lines(path)
    for lineno, line in lines:
        stripped = line.strip()
        if not stripped:
            continue
        if not docs and stripped.startswith("["):  # one JSON array, not JSON lines
            text = line + "".join(rest for _, rest in lines)
            try:
                items = json.loads(text)
            except json.JSONDecodeError as exc:
                raise LlmpruneError(f"{path} line {lineno + exc.lineno - 1} is not valid "
                                    f"JSON: {exc.msg}") from None
            if not isinstance(items, list):
                raise LlmpruneError(f"{path} is not a list of documents")
            return [_doc_text(item, path, f"item {k}") for k, item in enumerate(items)]
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise LlmpruneError(f"{path} line {lineno} is not valid JSON: {exc.msg} (fix or "
                                "remove the line)") from None
        docs.append(_doc_text(obj, path, f"line {lineno}"))
    return docs


# ---------------------------------------------------------------------------------------------
# The registry of named datasets
# ---------------------------------------------------------------------------------------------

_C4_HUB_FILES = {"train": "en/c4-train.00000-of-01024.json.gz",
                 "validation": "en/c4-validation.00000-of-00008.json.gz"}

SPECS: dict[str, _Dataset] = {
    "wikitext2": _Dataset(
        "wikitext2", "test", "train", _locate_wikitext, _read_wikitext,
        lambda split: _Hub("Salesforce/wikitext", "wikitext-2-raw-v1", split, "text"),
        eval_join="\n\n", calib_join=" ",
    ),
    "ptb": _Dataset(
        "ptb", "test", "train", _locate_ptb, _read_ptb,
        lambda split: _Hub("ptb-text-only/ptb_text_only", "penn_treebank", split, "sentence"),
        eval_join=" ", calib_join=" ",
    ),
    "c4": _Dataset(
        "c4", "validation", "train", _locate_c4, _read_documents,
        lambda split: _Hub("allenai/c4", None, split, "text", _C4_HUB_FILES[split]),
        eval_docs=C4_EVAL_DOCS, eval_windows=C4_EVAL_WINDOWS,
    ),
}
assert tuple(SPECS) == DATASETS


def _local_file_spec(path: Path) -> _Dataset:
    lower = path.name.lower()
    found: Locator = lambda root, split: ((path,), [str(path)])  # noqa: E731 (both splits: the file)
    no_hub = lambda split: None  # noqa: E731
    if lower.endswith(_TEXT_SUFFIXES):
        return _Dataset(str(path), "file", "file", found, _read_whole_text,
                        no_hub, eval_join="", calib_join="")
    return _Dataset(str(path), "file", "file", found, _read_documents, no_hub)


def _lookup(name: str) -> _Dataset:
    key = str(name).strip()
    if key.lower() in SPECS:
        return SPECS[key.lower()]
    path = Path(key).expanduser()
    looks_like_file = path.name.lower().endswith(_TEXT_SUFFIXES + _DOC_SUFFIXES)
    if looks_like_file or path.exists() or os.sep in key:
        if not path.is_file():
            raise LlmpruneError(f"dataset file {path} does not exist: give an existing .txt or "
                                ".jsonl/.json/.json.gz file")
        if not looks_like_file:
            raise LlmpruneError(f"dataset file {path} has an unsupported type: use .txt, .jsonl, .json or "
                                ".json.gz")
        return _local_file_spec(path.resolve())
    raise LlmpruneError(
        f"unknown dataset {name!r}: use one of {', '.join(DATASETS)} or the path of a "
        ".txt/.jsonl/.json/.json.gz file"
    )


def _resolve(name: str, role: str, data_dir) -> tuple[_Dataset, _Source]:
    spec = _lookup(name)
    split = spec.eval_split if role == "eval" else spec.calib_split
    if split == "file":
        return spec, _Source(files=spec.locate(Path("."), split)[0])
    root = resolve_data_dir(data_dir)
    if root is None:
        return spec, _Source(hub=spec.hub(split))
    if not root.is_dir():
        raise LlmpruneError(f"data dir {root} does not exist: pass --data-dir (or set {DATA_DIR_ENV}) to an "
                            "existing folder")
    files, searched = spec.locate(root, split)
    if files is None:
        raise LlmpruneError(
            f"{spec.name} {role} data ({split} split) not found in data dir {root}: searched "
            f"{'; '.join(searched)}; put the file there, or pass another --data-dir"
        )
    return spec, _Source(files=files)


# ---------------------------------------------------------------------------------------------
# The hub path (online users only; offline it fails fast with the local alternative)
# ---------------------------------------------------------------------------------------------


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can a TCP connection to the hub be opened? Avoids ``datasets``' ~25 s of retries offline."""
    if any(os.environ.get(var) for var in _PROXY_VARS):
        return True  # a direct probe says nothing behind a proxy: let datasets try
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout).close()
        return True
    except OSError:
        return False


def _offline_mode() -> bool:
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


class _HubColumn(Sequence):
    """One column of a hub split, read lazily by index (the c4 shard has ~356k documents)."""

    def __init__(self, dataset, column: str):
        self._ds, self._column = dataset, column

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._ds[index][self._column]
        return self._ds[int(index)][self._column]

    def __iter__(self):
        for batch in self._ds.iter(batch_size=4096):  # whole batches: row by row is slow
            yield from batch[self._column]


def _load_hub(spec: _Dataset, hub: _Hub) -> Sequence[str]:
    _, wanted = spec.locate(Path("<data-dir>"), hub.split)
    fix = f"pass --data-dir (or set {DATA_DIR_ENV}) to a folder holding {' or '.join(wanted)}"
    if not _offline_mode() and not _hub_reachable():
        raise LlmpruneError(f"cannot reach the Hugging Face hub to download {hub.describe()}: {fix}")
    try:
        import datasets

        kwargs = {"data_files": {hub.split: hub.data_file}} if hub.data_file else {}
        ds = datasets.load_dataset(hub.path, hub.config, split=hub.split, **kwargs)
        if hub.column not in ds.column_names:
            raise ValueError(f"no {hub.column!r} column (columns: {', '.join(ds.column_names)})")
    except Exception as exc:  # network, auth, cache, format: all mean "use local files instead"
        raise LlmpruneError(f"could not load {hub.describe()} from the hub "
                            f"({_first_line(exc)}): {fix}") from None
    return _HubColumn(ds, hub.column)


# ---------------------------------------------------------------------------------------------
# In-process caches
# ---------------------------------------------------------------------------------------------


class _LRU:
    """A small LRU of derived data, keyed by the source's fingerprint (and a tokenizer).

    Entries keep a reference to their tokenizer, so that an id() in a key cannot be reused by
    another tokenizer while the entry lives: a hit always means this very tokenizer object.
    """

    def __init__(self, size: int):
        self.size = size
        self.items: OrderedDict = OrderedDict()

    def get(self, key: tuple, make: Callable, tokenizer=None):
        if tokenizer is not None:
            key = (id(tokenizer), type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""),
                   len(tokenizer)) + key
        hit = self.items.get(key)
        if hit is not None and hit[0] is tokenizer:
            self.items.move_to_end(key)
            return hit[1]
        value = make()
        self.items[key] = (tokenizer, value)
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return value

    def clear(self) -> None:
        self.items.clear()


_ROWS = _LRU(4)  # rows/documents of a source
_STREAMS = _LRU(8)  # token streams of a joined text
_DOC_IDS = _LRU(4)  # per-document token ids drawn by the c4 loop: {index: ids}


def clear_caches() -> None:
    """Forget every cached text and token stream."""
    for cache in (_ROWS, _STREAMS, _DOC_IDS):
        cache.clear()


def _rows(spec: _Dataset, source: _Source) -> Sequence[str]:
    def read() -> Sequence[str]:
        if source.hub:
            return _load_hub(spec, source.hub)
        rows: list[str] = []
        for path in source.files:
            rows.extend(spec.read(path))
        return rows

    return _ROWS.get((spec.read.__name__, source.fingerprint()), read)


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids[0]  # (tokens,)


def _stream(spec: _Dataset, source: _Source, tokenizer, join: str, limit: int | None = None) -> torch.Tensor:
    def make() -> torch.Tensor:
        rows = _rows(spec, source)
        picked = rows[:limit] if limit is not None else rows
        return _tokenize(tokenizer, join.join(picked))

    return _STREAMS.get((spec.read.__name__, source.fingerprint(), join, limit), make, tokenizer)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_seqlen(seqlen) -> int:
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise LlmpruneError(f"seqlen {seqlen!r} is too short: use an integer of at least 2")
    return seqlen


def describe_source(name: str, data_dir=None, split: str = "eval") -> str:
    """Where ``name``'s evaluation (``split="eval"``) or calibration data comes from, for reports:
    the local file path(s) or ``hub:<repo>/<config or file>``."""
    if split not in ("eval", "calibration"):
        raise LlmpruneError(f"unknown split {split!r}: use 'eval' or 'calibration'")
    return _resolve(name, split, data_dir)[1].describe()


def check_available(name: str, data_dir=None, split: str = "eval") -> str:
    """Fail now, before any model loads, if ``name``'s data cannot be had: local files must be
    there, and a hub split is loaded (from the cache, or downloaded) so that an offline machine
    without a local copy fails in a second. Returns :func:`describe_source`'s text."""
    if split not in ("eval", "calibration"):
        raise LlmpruneError(f"unknown split {split!r}: use 'eval' or 'calibration'")
    spec, source = _resolve(name, split, data_dir)
    if source.hub is not None:
        _rows(spec, source)  # kept in the row cache for the run that follows
    return source.describe()


def eval_tokens(name: str, tokenizer, seqlen: int, data_dir=None) -> torch.LongTensor:
    """The evaluation token stream of ``name``, 1-D (c4: cut to the first 256 * seqlen tokens)."""
    seqlen = _check_seqlen(seqlen)
    spec, source = _resolve(name, "eval", data_dir)
    if spec.documents:
        ids = _stream(spec, source, tokenizer, " ", spec.eval_docs)
        if spec.eval_windows is not None:
            ids = ids[: spec.eval_windows * seqlen]
    else:
        ids = _stream(spec, source, tokenizer, spec.eval_join)
    if ids.numel() < seqlen:
        raise LlmpruneError(
            f"{spec.name} evaluation stream ({source.describe()}) has {ids.numel()} tokens, fewer than "
            f"seqlen {seqlen}: use a shorter --seqlen or more text"
        )
    return ids.clone()  # the cached stream stays unaltered whatever the caller does


def calibration_windows(
    name: str, tokenizer, nsamples: int, seqlen: int, seed: int = 0, data_dir=None
) -> torch.LongTensor:
    """``nsamples`` random windows of ``seqlen`` tokens, ``(nsamples, seqlen)``, drawn as the
    reference scripts draw them for ``seed``."""
    seqlen = _check_seqlen(seqlen)
    if isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 1:
        raise LlmpruneError(f"nsamples must be a positive integer, got {nsamples!r}")
    spec, source = _resolve(name, "calibration", data_dir)
    rng = random.Random(seed)
    if spec.documents:
        return _document_windows(spec, source, tokenizer, nsamples, seqlen, rng)
    ids = _stream(spec, source, tokenizer, spec.calib_join)
    if ids.numel() < seqlen + 1:
        raise LlmpruneError(
            f"{spec.name} calibration stream ({source.describe()}) has {ids.numel()} tokens; windows of "
            f"seqlen {seqlen} need at least {seqlen + 1}: use a shorter --seqlen or more text"
        )
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[i : i + seqlen] for i in starts])  # (nsamples, seqlen)


def _document_windows(spec: _Dataset, source: _Source, tokenizer, nsamples: int, seqlen: int,
                      rng: random.Random) -> torch.Tensor:
    """The reference c4 loop: draw documents until one is longer than seqlen, then a start.

    Each drawn document is tokenized alone (as the reference does) and memoized, so repeated
    draws and repeated calls are cheap; the sequence of ``randint`` calls is untouched. If
    ``min(len(docs), 1000)`` draws in a row all miss, every document's length is checked once (without
    drawing) so that a corpus with no long enough document fails instead of looping forever.
    """
    docs = _rows(spec, source)
    if len(docs) == 0:
        raise LlmpruneError(f"{spec.name} calibration data ({source.describe()}) holds no documents")
    memo: dict[int, torch.Tensor] = _DOC_IDS.get((spec.read.__name__, source.fingerprint()), dict, tokenizer)

    def doc_ids(index: int) -> torch.Tensor:
        if index not in memo:
            memo[index] = _tokenize(tokenizer, docs[index])
        return memo[index]

    def doc_length(index: int) -> int:
        # A big corpus is measured without keeping every document's ids in memory.
        if index in memo or len(docs) <= 10_000:
            return doc_ids(index).numel()
        return _tokenize(tokenizer, docs[index]).numel()

    give_up_after = min(len(docs), 1000)
    windows, misses, checked = [], 0, False
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(docs) - 1)
            ids = doc_ids(i)
            if ids.numel() > seqlen:
                break
            misses += 1
            if misses >= give_up_after and not checked:
                checked = True
                if not any(doc_length(k) > seqlen for k in range(len(docs))):
                    raise LlmpruneError(
                        f"no document in {spec.name} calibration data ({source.describe()}) is longer than "
                        f"seqlen {seqlen} tokens: use a shorter --seqlen, or more/longer documents"
                    )
        misses = 0
        j = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[j : j + seqlen])
    return torch.stack(windows)  # (nsamples, seqlen)
