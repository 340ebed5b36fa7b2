"""Greedy-continuation agreement: does the pruned model still write what the dense model writes?

Perplexity and zero-shot accuracy score one token or one choice at a time; a pruned model can keep
them while its free-running text drifts away from the dense model's after a few words. This check
lets both models continue the same prompts greedily and measures how long they stay together:

- prompts: the first ``prompt_tokens`` tokens of the first ``prompts`` C4 *validation* documents
  that have that many (each document tokenized alone, as calibration tokenizes its documents).
  Calibration reads only C4's train documents (the ``c4/`` or ``c4-sample/`` files without
  "validation" in their name, or the hub's train shard) and the validation documents are read only
  here and by evaluation, so no calibration seed can have drawn a prompt. A data dir with C4 *train*
  documents only (the bundled 1000-document sample) gives its documents of at most
  ``NEVER_DRAWN_TOKENS`` (2048) tokens instead: the reference calibration sampler redraws until a
  document is *longer* than its window, so a calibration window of 2048 tokens or more never draws
  them (:func:`check_prompt_source` refuses a shorter C4 calibration window beside such prompts).
  The choice depends on no seed. All prompts have the same length, so they batch without padding.
- decoding: greedy (argmax), with the KV cache, exactly ``new_tokens`` tokens (no stop at EOS: both
  models are compared position by position).
- for one prompt, ``k`` = the number of tokens identical before the first differing one
  (``new_tokens`` when none differs). Reported over the prompts: ``agreement`` = mean of
  ``k / new_tokens``, ``first_divergence`` = mean of ``k``, ``identical`` = share with
  ``k == new_tokens``.

The dense continuations are computed once, by the dense model's own pass (``record=True``), and kept
in ``cache_dir`` under a key that hashes the caller's ``dense_key``, the prompts' token ids and
``new_tokens``; a pruned run reads them instead of holding the dense model. The file is written
atomically and carries a checksum: a file that fails it, or holds another key, is never used.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llmprune.blocks import input_device
from llmprune.data import resolve_data_dir
from llmprune.errors import LlmpruneError
from llmprune.io import write_text_atomic
from llmprune.progress import progress as progress_bar

PROMPTS = 16
NEW_TOKENS = 32
PROMPT_TOKENS = 64
CACHE_FORMAT = "llmprune-dense-continuations"
CACHE_VERSION = 1
# The hub's first validation shard, the one C4 evaluation reads (llmprune.data); the local file a
# data dir should hold under c4/ for the same documents.
C4_HUB_PATH = "allenai/c4"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
_DOC_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
# from C4 train documents, only those this short: the calibration sampler keeps a document only when it is
# longer than its window, so no calibration window of this many tokens or more can have drawn them
NEVER_DRAWN_TOKENS = 2048


@dataclass
class GenerationResult:
    """Agreement of the model's greedy continuations with the dense model's (see the module doc)."""

    prompts: int
    new_tokens: int
    prompt_tokens: int
    agreement: float  # mean over prompts of (identical tokens before the first difference) / new_tokens
    first_divergence: float  # mean position of the first differing token (new_tokens when none)
    identical: float  # share of prompts whose continuations are identical
    seconds: float
    source: str  # the documents the prompts come from
    cache: str  # the dense continuations' cache file

    def to_dict(self) -> dict:
        return {"kind": "generation", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> GenerationResult:
        return cls(**{name: d[name] for name in cls.__dataclass_fields__})


# ----------------------------------------------------------------------------- prompts

def c4_validation_files(root: Path) -> tuple[Path, ...]:
    """C4 validation files in a data dir, found as :mod:`llmprune.data` finds C4's evaluation files
    (under ``c4/``, else ``c4-sample/``: names with "validation"), less any name with "train" in it,
    which calibration would read too."""
    return _c4_files(root, validation=True)


def _c4_files(root: Path, validation: bool) -> tuple[Path, ...]:
    for folder in (root / "c4", root / "c4-sample"):
        if not folder.is_dir():
            continue
        docs = sorted((p for p in folder.rglob("*")
                       if p.is_file() and p.name.lower().endswith(_DOC_SUFFIXES)),
                      key=lambda p: str(p.relative_to(folder)))
        if validation:
            found = tuple(p for p in docs if "validation" in p.name and "train" not in p.name)
        else:  # the files C4 calibration reads (llmprune.data)
            found = tuple(p for p in docs if "train" in p.name or "validation" not in p.name)
        if found:
            return found
    return ()


def prompt_documents(data_dir=None) -> tuple[Iterator[str], str, int | None]:
    """The prompts' documents, in order (lazily), where they come from, and the most tokens a
    document may have to be a prompt (None: any; see the module docstring)."""
    root = resolve_data_dir(data_dir)
    if root is None:
        return _hub_documents(), f"hub:{C4_HUB_PATH}/{C4_VALIDATION_FILE}", None
    if not root.is_dir():
        raise LlmpruneError(f"data dir {root} does not exist: pass data_dir= (--data-dir) or set "
                            "$LLMPRUNE_DATA_DIR to an existing folder")
    files = c4_validation_files(root)
    if files:
        return _file_documents(files), ", ".join(str(p) for p in files), None
    train = _c4_files(root, validation=False)
    if not train:
        raise LlmpruneError(
            f"no C4 documents for the generation prompts in data dir {root}: expected "
            f"{root / 'c4' / C4_VALIDATION_FILE} (or a .jsonl with 'validation' in its name under c4/ or "
            "c4-sample/, or C4 train documents there)")
    source = (", ".join(str(p) for p in train)
              + f" (C4 train documents of at most {NEVER_DRAWN_TOKENS} tokens, which a calibration window "
                "of that length never draws)")
    return _file_documents(train), source, NEVER_DRAWN_TOKENS


def check_prompt_source(data_dir=None, calib: str | None = None, calib_seqlen: int | None = None) -> str:
    """Fail now, before a model is pruned, if the prompts' documents cannot be read (the local C4
    files must be there; the hub's shard must answer with a first document), or if they are C4
    train documents that this run's calibration (``calib`` dataset, ``calib_seqlen`` window) could
    draw. Returns where the prompts will come from."""
    documents, source, longest = prompt_documents(data_dir)
    if next(documents, None) is None:
        raise LlmpruneError(f"{source} holds no documents: the generation prompts need C4 documents")
    if longest is not None and calib == "c4" and calib_seqlen is not None and calib_seqlen < longest:
        raise LlmpruneError(
            f"the generation prompts are C4 train documents of at most {longest} tokens, and a calibration "
            f"window of {calib_seqlen} tokens on the same C4 files could draw them: calibrate with --seqlen "
            f"{longest} or more, or add C4 validation documents ({C4_VALIDATION_FILE} under c4/)")
    return source


def _file_documents(files: tuple[Path, ...]) -> Iterator[str]:
    for path in files:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        yield _document_text(line, path, lineno)
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise LlmpruneError(f"cannot read {path}: {exc} (replace the file)") from None


def _document_text(line: str, path: Path, lineno: int) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LlmpruneError(f"{path} line {lineno} is not valid JSON: {exc.msg} "
                            "(fix or remove the line)") from None
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise LlmpruneError(f"{path} line {lineno} has no 'text' string field: each document needs one")
    return row["text"]


def _hub_documents() -> Iterator[str]:
    fix = (f"pass data_dir= (--data-dir) or set $LLMPRUNE_DATA_DIR to a folder holding "
           f"c4/{C4_VALIDATION_FILE}")
    try:
        import datasets

        rows = datasets.load_dataset(C4_HUB_PATH, data_files={"validation": C4_VALIDATION_FILE},
                                     split="validation", streaming=True)
        for row in rows:
            yield row["text"]
    except Exception as exc:  # offline, moved, no access: all mean "use a local copy"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LlmpruneError(f"could not read {C4_HUB_PATH}/{C4_VALIDATION_FILE} from the hub "
                            f"({first}): {fix}") from None


def select_prompts(tokenizer, prompts: int = PROMPTS, prompt_tokens: int = PROMPT_TOKENS, data_dir=None):
    """``(ids, source)``: ids ``(prompts, prompt_tokens)``, the first ``prompt_tokens`` tokens of each of
    the first ``prompts`` C4 validation documents that have at least that many."""
    documents, source, longest = prompt_documents(data_dir)
    rows, seen = [], 0
    for text in documents:
        seen += 1
        ids = tokenizer(text).input_ids  # the document alone, as calibration tokenizes it
        if len(ids) >= prompt_tokens and (longest is None or len(ids) <= longest):
            rows.append(ids[:prompt_tokens])
            if len(rows) == prompts:
                return torch.tensor(rows, dtype=torch.long), source
    raise LlmpruneError(f"only {len(rows)} of the {seen} documents in {source} have {prompt_tokens} tokens"
                        + (f" (and at most {longest})" if longest is not None else "") + ", "
                        f"{prompts} prompts were asked for: lower prompts or prompt_tokens")


# ----------------------------------------------------------------------------- decoding and comparison

def greedy_continuations(model, prompt_ids, new_tokens: int, batch_size: int = 8, progress: bool = False,
                         desc: str = "greedy continuations"):
    """The ``new_tokens`` greedy tokens after each prompt, ``(prompts, new_tokens)`` on the CPU.

    The prompt goes through once; then each chosen token is fed alone with the KV cache. The model is
    in eval mode for the call (dropout would make the choice random) and left as it was.
    """
    device, was_training = input_device(model), model.training
    batches = prompt_ids.split(batch_size)
    bar = progress_bar(len(batches) * new_tokens, desc, "tokens", disable=not progress)
    out = []
    try:
        model.eval()
        with torch.inference_mode():
            for batch in batches:
                out.append(_decode(model, batch.to(device), new_tokens, bar))
    finally:
        model.train(was_training)
        bar.close()
    return torch.cat(out)


def _decode(model, ids, new_tokens: int, bar):
    # transformers 5 calls the KV cache `cache` (argument and output); 4.x and remote code `past_key_values`
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    step = model(input_ids=ids, use_cache=True)
    chosen = []
    for i in range(new_tokens):
        token = step.logits[:, -1].argmax(dim=-1)  # (batch,)
        chosen.append(token.cpu())
        bar.update(ids.shape[0])
        if i + 1 < new_tokens:
            past = step["cache"] if "cache" in step else step["past_key_values"]
            step = model(input_ids=token[:, None], use_cache=True, **{name: past})
    return torch.stack(chosen, dim=1)  # (batch, new_tokens)


def compare(dense, pruned) -> tuple[float, float, float]:
    """``(agreement, first_divergence, identical)`` of two ``(prompts, new_tokens)`` token tables."""
    if tuple(dense.shape) != tuple(pruned.shape):
        raise ValueError(f"continuations of shapes {tuple(dense.shape)} and {tuple(pruned.shape)}")
    prompts, new_tokens = dense.shape
    same = (dense == pruned).long()  # (prompts, new_tokens)
    before = same.cumprod(dim=1).sum(dim=1).double()  # identical tokens before the first difference
    return (float(before.mean() / new_tokens), float(before.mean()),
            float((before == new_tokens).double().mean()))


# ----------------------------------------------------------------------------- the dense side's cache

def cache_key(dense_key: str, prompt_ids, new_tokens: int) -> str:
    """Hash of what fixes the dense continuations: the dense model's key, the prompts, their length."""
    blob = json.dumps({"version": CACHE_VERSION, "dense_key": dense_key, "new_tokens": new_tokens,
                       "prompts": prompt_ids.tolist()}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def cache_path(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir).expanduser() / f"continuations-{key[:32]}.json"


def _checksum(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def write_cache(path: Path, key: str, dense_key: str, continuations) -> None:
    payload = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "dense_key": dense_key,
               "continuations": continuations.tolist()}
    write_text_atomic(path, json.dumps({**payload, "checksum": _checksum(payload)}) + "\n")


def read_cache(path: Path, key: str, shape: tuple[int, int]):
    """``(continuations or None, why not)``: None unless the file is whole and holds ``key``."""
    if not path.is_file():
        return None, "does not exist"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        payload = {k: v for k, v in stored.items() if k != "checksum"}
        if stored.get("checksum") != _checksum(payload):
            return None, "fails its checksum (corrupt or edited)"
        if stored.get("format") != CACHE_FORMAT or stored.get("key") != key:
            return None, "holds another key"
        table = torch.tensor(stored["continuations"], dtype=torch.long)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError,
            ValueError) as exc:
        return None, f"cannot be read ({type(exc).__name__})"
    if tuple(table.shape) != tuple(shape):
        return None, f"holds continuations of shape {tuple(table.shape)}, not {tuple(shape)}"
    return table, ""


# ----------------------------------------------------------------------------- the check

def continuation_agreement(model, tokenizer, *, dense_key: str, cache_dir: Path, prompts: int = PROMPTS,
                           new_tokens: int = NEW_TOKENS, prompt_tokens: int = PROMPT_TOKENS, data_dir=None,
                           record: bool = False, dense_model=None, batch_size: int = 8,
                           progress: bool = True) -> GenerationResult | None:
    """Greedy-continuation agreement of ``model`` with the dense model (see the module docstring).

    ``record=True``: ``model`` *is* the dense model; its continuations are written to the cache and
    None is returned. ``record=False``: the dense continuations are read from the cache (rebuilt from
    ``dense_model`` with a warning when missing, corrupt or for another key; without ``dense_model``
    that is an error) and compared with ``model``'s. ``dense_key`` names the dense model (e.g. its
    path and dtype); the cache is keyed by it, the prompts' token ids and ``new_tokens``.

    Example::

        >>> continuation_agreement(dense, tok, dense_key="smollm2-135m/float32", cache_dir=cache,
        ...                        record=True)                                   # the dense pass
        >>> r = continuation_agreement(pruned, tok, dense_key="smollm2-135m/float32", cache_dir=cache)
        >>> r.agreement, r.first_divergence, r.identical
    """
    _check_arguments(dense_key, prompts, new_tokens, prompt_tokens, batch_size)
    start = time.perf_counter()
    prompt_ids, source = select_prompts(tokenizer, prompts, prompt_tokens, data_dir)
    key = cache_key(dense_key, prompt_ids, new_tokens)
    path = cache_path(cache_dir, key)
    if record:
        write_cache(path, key, dense_key, greedy_continuations(model, prompt_ids, new_tokens, batch_size,
                                                               progress, "dense continuations"))
        return None
    dense = _dense_continuations(path, key, dense_key, dense_model, prompt_ids, new_tokens, batch_size,
                                 progress)
    ours = greedy_continuations(model, prompt_ids, new_tokens, batch_size, progress)
    agreement, first_divergence, identical = compare(dense, ours)
    return GenerationResult(prompts=prompts, new_tokens=new_tokens, prompt_tokens=prompt_tokens,
                            agreement=agreement, first_divergence=first_divergence, identical=identical,
                            seconds=round(time.perf_counter() - start, 3), source=source, cache=str(path))


def _dense_continuations(path: Path, key: str, dense_key: str, dense_model: Any, prompt_ids, new_tokens: int,
                         batch_size: int, progress: bool):
    dense, why = read_cache(path, key, (prompt_ids.shape[0], new_tokens))
    if dense is not None:
        return dense
    if dense_model is None:
        raise LlmpruneError(f"dense continuations cache {path} {why}: run the dense model's pass first "
                            "(continuation_agreement(..., record=True) with the same dense_key, prompts and "
                            "new_tokens) or pass dense_model=")
    warnings.warn(f"dense continuations cache {path} {why}: rebuilding it from dense_model", stacklevel=3)
    dense = greedy_continuations(dense_model, prompt_ids, new_tokens, batch_size, progress,
                                 "dense continuations")
    write_cache(path, key, dense_key, dense)
    return dense


def _check_arguments(dense_key, prompts, new_tokens, prompt_tokens, batch_size) -> None:
    if not isinstance(dense_key, str) or not dense_key.strip():
        raise LlmpruneError(f"dense_key must name the dense model (e.g. its path and dtype), "
                            f"got {dense_key!r}")
    for name, value in (("prompts", prompts), ("new_tokens", new_tokens), ("prompt_tokens", prompt_tokens),
                        ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LlmpruneError(f"{name} must be a positive integer, got {value!r}")
