"""llama.cpp in the loop: a GGUF file's perplexity and tokens/s in llama.cpp itself.

llmprune measures perplexity in torch, on a model dequantized from or exported to GGUF; a user who
deploys the GGUF runs llama.cpp, whose kernels (f16 and quantized dot products, its rope, its
softmax) are other numerics. This module runs the GGUF in llama.cpp (through llama-cpp-python) on
exactly the token ids llmprune evaluates, so that only the model numerics differ:

* :func:`perplexity`: the windows of :func:`token_windows` (llmprune's cut: ``numel // seqlen``
  non-overlapping windows, the remainder dropped, the first ``max_windows``), each scored alone in a
  fresh context of ``n_ctx = seqlen`` with the logits of every position; the loss is computed here in
  float64 from llama.cpp's float32 logits, ``ppl = exp(mean over windows of (mean over the window's
  seqlen - 1 predictions of CE))``, as :mod:`llmprune.evaluation.perplexity` computes it. This is not
  llama.cpp's ``llama-perplexity`` protocol, which adds a BOS token to each window and scores only its
  second half; the ids are fed as given (the HF tokenizer's, BOS or not).
* :func:`speed`: prefill tokens/s (the prompt as one batch) and decode tokens/s (greedy, one token
  at a time after the prompt), each repetition from an empty KV cache, after one warm-up.
* :func:`speed_in_child`: :func:`speed` in a fresh process, whose peak RSS is then the model's
  (this module imports neither torch nor transformers at its top, so the child does not).

llama_cpp is imported inside the functions only: llmprune works without it (``check_available``
names the fix). Tested with llama-cpp-python 0.3.36.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmprune import __version__
from llmprune.errors import LlmpruneError
from llmprune.progress import library_bars
from llmprune.progress import progress as progress_bar

INSTALL = ('pip install "llmprune[llamacpp]" (llama-cpp-python, built from source: it needs cmake and a '
           "C/C++ compiler)")
NLL_ROWS = 256  # logits rows converted to float64 at once: 256 x 49152 x 8 bytes = 96 MiB for SmolLM2
SPEED_SEED = 0  # the prompt's random token ids (speed does not depend on them, repeatability does)


def check_available() -> None:
    """Fail with one line naming the fix when llama-cpp-python cannot be imported."""
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: the package is there, its shared library does not load
        why = "is not installed" if isinstance(exc, ImportError) else f"does not load ({exc})"
        raise LlmpruneError(f"running a GGUF in llama.cpp needs llama-cpp-python, which {why}: "
                            f"{INSTALL}") from None


def check_threads(threads: int | None) -> int:
    """``threads`` as a positive int; None: the cores this process may run on."""
    if threads is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise LlmpruneError(f"--threads must be a positive integer, got {threads!r}")
    return threads


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF file's header says: the architecture, its training context and vocabulary."""

    path: Path
    architecture: str
    context_length: int | None  # None when the header does not say
    vocab_size: int


def inspect_gguf(gguf_path: str | os.PathLike) -> GgufInfo:
    """Read the header of ``gguf_path`` (gguf-py, no llama.cpp, no weights): a missing or non-GGUF file
    is a user error here, before any slow work."""
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise LlmpruneError(f"GGUF file {path} does not exist: give the path of a .gguf model file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise LlmpruneError(f"{path} is not a GGUF file (no GGUF magic): give a .gguf model file, e.g. one "
                            "written by `llmprune export`")
    stat = path.stat()
    return dataclasses.replace(_header(str(path.resolve()), stat.st_mtime_ns, stat.st_size), path=path)


@functools.lru_cache(maxsize=8)
def _header(path: str, mtime_ns: int, size: int) -> GgufInfo:
    """The header fields of one version of a file (gguf-py parses every tensor's description and the
    whole vocabulary: seconds on a busy machine, so the CLI's and the API's checks share one read)."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(path).fields
        arch = str(fields["general.architecture"].contents())
        context = fields.get(f"{arch}.context_length")
        vocab = fields.get(f"{arch}.vocab_size")
        tokens = fields.get("tokenizer.ggml.tokens")
        vocab_size = int(vocab.contents()) if vocab is not None else len(tokens.data)
    except (KeyError, ValueError, AttributeError, IndexError, OSError) as exc:
        raise LlmpruneError(f"{path} is a damaged or incomplete GGUF file ({type(exc).__name__}: {exc}): "
                            "export it again") from None
    return GgufInfo(path=Path(path), architecture=arch, vocab_size=vocab_size,
                    context_length=int(context.contents()) if context is not None else None)


def token_windows(tokens, seqlen: int, max_windows: int | None = None) -> np.ndarray:
    """The windows llmprune's :func:`~llmprune.evaluation.perplexity.perplexity` scores, as a
    ``(windows, seqlen)`` int64 array: ``tokens`` (a 1-D or ``(1, n)`` tensor or array) cut by the same
    :func:`~llmprune.evaluation.perplexity.window_count`."""
    import torch

    from llmprune.evaluation.perplexity import window_count

    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise LlmpruneError(f"seqlen {seqlen!r} is too short: use an integer of at least 2")
    if max_windows is not None:
        _check_count(max_windows, "--max-windows")
    flat = torch.as_tensor(np.asarray(tokens)).reshape(-1)
    windows = window_count(flat, seqlen, max_windows)
    if windows < 1:
        raise LlmpruneError(f"the stream has {flat.numel()} tokens, fewer than one window of seqlen "
                            f"{seqlen}: use a shorter --seqlen")
    return flat[: windows * seqlen].view(windows, seqlen).numpy().astype(np.int64)


@dataclass
class LlamaCppPerplexity:
    """llama.cpp's perplexity of a GGUF: the fields of llmprune's ``PerplexityResult`` (same meaning),
    plus the mean NLL of each window and the threads llama.cpp ran on."""

    dataset: str
    ppl: float
    windows: int
    tokens: int  # windows * seqlen: the tokens fed to llama.cpp
    seqlen: int
    seconds: float  # the window loop only (loading and tokenization excluded)
    tokens_per_s: float
    threads: int
    window_nll: list[float]  # per window: mean CE over its seqlen - 1 predictions (natural log)
    backend: str = "llama.cpp"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _load(llama_cls, gguf_path, threads: int, **context):
    """A ``Llama`` with llama.cpp's logging silenced and one thread count for prompt and decode."""
    try:
        return llama_cls(str(gguf_path), n_threads=threads, n_threads_batch=threads, verbose=False, **context)
    except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
        raise LlmpruneError(f"llama.cpp cannot load {gguf_path} ({exc}): its architecture or tensor types "
                            "may be newer than the installed llama-cpp-python; upgrade it") from None


def window_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean next-token cross-entropy of one window, in float64. logits (L, V) float32, ids (L,) -> float.

    Row i's logits predict ids[i + 1]; the last row predicts nothing (as llmprune's ``_labels``)."""
    length = ids.shape[0]
    total = 0.0
    for first in range(0, length - 1, NLL_ROWS):
        rows = np.asarray(logits[first : min(first + NLL_ROWS, length - 1)], dtype=np.float64)  # (r, V)
        top = rows.max(axis=1, keepdims=True)  # (r, 1): exp cannot overflow
        lse = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))  # (r,)
        target = ids[first + 1 : first + 1 + rows.shape[0]]  # (r,)
        total += float((lse - rows[np.arange(rows.shape[0]), target]).sum())
    return total / (length - 1)


def perplexity(gguf_path: str | os.PathLike, token_windows: np.ndarray, threads: int | None = None,
               dataset: str = "", progress: bool = True) -> LlamaCppPerplexity:
    """llama.cpp's perplexity of ``gguf_path`` on ``token_windows`` ``(windows, seqlen)`` (from
    :func:`token_windows`): each window alone in a context of ``seqlen`` tokens, NLL in float64.

    Example::

        >>> from llmprune.data import eval_tokens
        >>> ids = eval_tokens("wikitext2", tokenizer, 2048, data_dir="../shared/data")
        >>> perplexity("dense-f16.gguf", token_windows(ids, 2048, max_windows=8), threads=2).ppl
    """
    check_available()
    from llama_cpp import Llama

    threads = check_threads(threads)
    data = np.asarray(token_windows, dtype=np.int64)
    if data.ndim != 2 or data.shape[0] < 1 or data.shape[1] < 2:
        raise LlmpruneError(f"token_windows must be (windows, seqlen) with seqlen >= 2, got shape "
                            f"{data.shape}")
    windows, seqlen = data.shape
    # logits_all: every position's logits (llama-cpp-python keeps them in llm.scores, (n_ctx, vocab))
    llm = _load(Llama, gguf_path, threads, n_ctx=seqlen, n_batch=min(seqlen, 512), logits_all=True)
    try:
        if data.min() < 0 or data.max() >= llm.n_vocab():
            raise LlmpruneError(f"token ids reach {int(data.max())} but {gguf_path} has {llm.n_vocab()} "
                                "tokens: tokenize with the GGUF's own tokenizer (--tokenizer)")
        nlls = []
        start = time.perf_counter()
        with progress_bar(windows, f"llama.cpp ppl {dataset}".strip(), "win", disable=not progress,
                          leave=False) as bar:
            for ids in data:
                llm.reset()  # the next eval drops the whole KV cache: no context carried over
                llm.eval(ids.tolist())
                nlls.append(window_nll(llm.scores[:seqlen], ids))
                bar.update(1)
        seconds = time.perf_counter() - start
    finally:
        llm.close()
    mean = math.fsum(nlls) / windows
    ppl = float("inf") if mean >= 700 else math.exp(mean)  # as llmprune's: exp overflows, nan stays nan
    tokens = windows * seqlen
    return LlamaCppPerplexity(dataset=dataset, ppl=ppl, windows=windows, tokens=tokens, seqlen=seqlen,
                              seconds=seconds, tokens_per_s=tokens / seconds if seconds > 0 else math.inf,
                              threads=threads, window_nll=nlls)


@dataclass
class LlamaCppSpeed:
    """Tokens/s of a GGUF in llama.cpp: medians over ``repeats`` (each repetition's value kept)."""

    threads: int
    prompt_tokens: int
    gen_tokens: int
    repeats: int
    prefill_tokens_per_s: float  # the prompt as one batch (llama-bench's pp)
    decode_tokens_per_s: float  # greedy, one token per llama_decode after the prompt (llama-bench's tg)
    prefill_runs: list[float]
    decode_runs: list[float]
    load_seconds: float
    peak_rss_mib: float | None = None  # set by the caller that ran it (speed_in_child: its own process)
    backend: str = "llama.cpp"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LlmpruneError(f"{name} must be a positive integer, got {value!r}")
    return value


def _one_run(llm, prompt: list[int], gen_tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one generation from an empty KV cache."""
    import llama_cpp

    llm.reset()  # n_tokens = 0: the eval below drops every cached position
    start = time.perf_counter()
    llm.eval(prompt)
    llama_cpp.llama_synchronize(llm.ctx)  # a backend may return before the batch is computed
    prefill = time.perf_counter() - start
    vocab = llm.n_vocab()
    start = time.perf_counter()
    for _ in range(gen_tokens):
        # the last position's logits (the only ones computed without logits_all); greedy = argmax
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        llm.eval([int(logits.argmax())])
    llama_cpp.llama_synchronize(llm.ctx)
    decode = time.perf_counter() - start
    return len(prompt) / prefill, gen_tokens / decode


def speed(gguf_path: str | os.PathLike, threads: int | None = None, prompt_tokens: int = 512,
          gen_tokens: int = 64, repeats: int = 3, progress: bool = True) -> LlamaCppSpeed:
    """Prefill and decode tokens/s of ``gguf_path`` in llama.cpp on ``threads`` threads: ``repeats``
    generations of ``gen_tokens`` tokens after a prompt of ``prompt_tokens`` random ids (seed 0), each
    from an empty KV cache, after one warm-up; medians. The caller reads its own peak RSS
    (:func:`peak_rss_mib`), or runs :func:`speed_in_child` for the model's."""
    check_available()
    from llama_cpp import Llama

    threads = check_threads(threads)
    prompt_tokens = _check_count(prompt_tokens, "--prompt-tokens")
    gen_tokens = _check_count(gen_tokens, "--gen-tokens")
    repeats = _check_count(repeats, "repeats")
    start = time.perf_counter()
    # the prompt is one batch and one micro-batch: n_batch = n_ubatch = prompt_tokens
    llm = _load(Llama, gguf_path, threads, n_ctx=prompt_tokens + gen_tokens, n_batch=prompt_tokens,
                n_ubatch=prompt_tokens, logits_all=False)
    load_seconds = time.perf_counter() - start
    try:
        prompt = np.random.default_rng(SPEED_SEED).integers(0, llm.n_vocab(), prompt_tokens).tolist()
        runs = []
        with progress_bar(repeats + 1, "llama.cpp speed", "run", disable=not progress, leave=False) as bar:
            for index in range(repeats + 1):
                result = _one_run(llm, prompt, gen_tokens)
                if index > 0:  # the first is the warm-up (page faults of the mmap, thread pool start)
                    runs.append(result)
                bar.update(1)
    finally:
        llm.close()
    prefill, decode = [r[0] for r in runs], [r[1] for r in runs]
    return LlamaCppSpeed(threads=threads, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeats=repeats,
                         prefill_tokens_per_s=statistics.median(prefill),
                         decode_tokens_per_s=statistics.median(decode), prefill_runs=prefill,
                         decode_runs=decode, load_seconds=load_seconds)


def peak_rss_mib() -> float:
    """The peak resident memory of this process's own address space so far, MiB.

    Linux: ``VmHWM`` of /proc/self/status. Not ``getrusage``'s ``ru_maxrss``: the kernel carries that
    across fork and exec, so a child started from a process holding torch (the CLI: ~700 MiB) would
    report its parent's peak for a 1 MiB model. Elsewhere: ``ru_maxrss`` (KiB, bytes on macOS)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


CHILD = "from llmprune.evaluation.llamacpp import _child; _child()"


def _child() -> None:
    """The body of :func:`speed_in_child`'s process: arguments as JSON on stdin, the result (or a user
    error's line) as JSON on the last line of stdout."""
    kwargs = json.loads(sys.stdin.read())
    try:
        result = speed(**kwargs)
    except LlmpruneError as exc:
        print(json.dumps({"error": str(exc)}))
        return
    result.peak_rss_mib = peak_rss_mib()
    print(json.dumps(result.to_dict()))


def speed_in_child(gguf_path: str | os.PathLike, threads: int | None = None, prompt_tokens: int = 512,
                   gen_tokens: int = 64, repeats: int = 3) -> LlamaCppSpeed:
    """:func:`speed` in a fresh Python process, with that process's peak RSS in ``peak_rss_mib``:
    llama.cpp's memory for this model (plus the interpreter, numpy and llama-cpp-python: ~60 MiB),
    not the caller's torch and earlier models.

    The child is ``python -c`` importing this module alone, not a multiprocessing spawn, which would
    re-import the caller's ``__main__`` (the ``llmprune`` CLI pulls in torch and transformers)."""
    check_available()  # here, not as a traceback from the child
    kwargs = dict(gguf_path=str(gguf_path), threads=check_threads(threads), prompt_tokens=prompt_tokens,
                  gen_tokens=gen_tokens, repeats=repeats, progress=False)
    # stderr is the caller's: a crash's traceback is shown where it happened
    done = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(kwargs), stdout=subprocess.PIPE,
                          text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the llama.cpp speed process ended with exit code {done.returncode} (its error "
                           "is above)")
    record = json.loads(lines[-1])
    if "error" in record:
        raise LlmpruneError(record["error"])
    return LlamaCppSpeed(**record)


# ---------------------------------------------------------------------------------------------
# One call for the command line and benchmarks: checks first, then tokenize, then llama.cpp
# ---------------------------------------------------------------------------------------------


def check_run(gguf_path: str | os.PathLike, seqlen: int | None = None,
              speed_tokens: tuple[int, int] | None = None, threads: int | None = None,
              max_windows: int | None = None) -> GgufInfo:
    """Every check that needs no weights, before the slow work: the file a GGUF, llama-cpp-python
    importable, ``seqlen`` (a perplexity window) and ``speed_tokens`` (:func:`speed`'s prompt and
    generated tokens) within the model's training context, ``threads`` and ``max_windows`` valid."""
    info = inspect_gguf(gguf_path)
    check_available()
    check_threads(threads)
    if max_windows is not None:
        _check_count(max_windows, "--max-windows")
    lengths = [] if seqlen is None else [(seqlen, "--seqlen")]
    if speed_tokens is not None:
        prompt = _check_count(speed_tokens[0], "--prompt-tokens")
        gen = _check_count(speed_tokens[1], "--gen-tokens")
        lengths.append((prompt + gen, "--prompt-tokens + --gen-tokens"))
    for tokens, flag in lengths:
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
            raise LlmpruneError(f"{flag} {tokens!r} is too short: use an integer of at least 2")
        if info.context_length is not None and tokens > info.context_length:
            raise LlmpruneError(f"{flag} {tokens} is longer than the {info.context_length}-token context "
                                f"{info.path.name} was trained for: use at most {info.context_length}")
    return info


def load_tokenizer(source: str | os.PathLike):
    """The Hugging Face tokenizer of a model reference (hub id, HF folder, ``.gguf`` file, or
    ``smollm2-135m``), as :func:`llmprune.models.load_model` loads it, without the weights."""
    from transformers import AutoTokenizer

    from llmprune.models import check_model_source, load_error

    where, kwargs = check_model_source(str(source))
    try:
        with library_bars():
            return AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception as exc:  # noqa: BLE001 - as load_model: every failure means "cannot be read"
        raise load_error(str(source), exc) from None


def evaluate_gguf(gguf_path: str | os.PathLike, tokenizer=None, dataset: str = "wikitext2",
                  seqlen: int = 2048, max_windows: int | None = None,
                  data_dir: str | os.PathLike | None = None, threads: int | None = None,
                  progress: bool = True) -> LlamaCppPerplexity:
    """llama.cpp's perplexity of ``gguf_path`` on ``dataset``'s evaluation stream, tokenized by
    ``tokenizer`` (a tokenizer, a model reference for :func:`load_tokenizer`, or None: the GGUF's own)
    exactly as ``llmprune eval`` tokenizes and windows it (:func:`llmprune.data.eval_tokens`,
    :func:`token_windows`). Checks come first (:func:`check_run`, the data's availability).

    Example::

        >>> r = evaluate_gguf("dense-f16.gguf", "smollm2-135m", seqlen=2048, max_windows=8,
        ...                   data_dir="../shared/data", threads=2)
        >>> r.ppl, r.windows
    """
    from llmprune.data import check_available as check_data
    from llmprune.data import eval_tokens

    check_run(gguf_path, seqlen, threads=threads, max_windows=max_windows)
    check_data(dataset, data_dir)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(gguf_path if tokenizer is None else tokenizer)
    ids = eval_tokens(dataset, tokenizer, seqlen, data_dir=data_dir)
    return perplexity(gguf_path, token_windows(ids, seqlen, max_windows), threads=threads, dataset=dataset,
                      progress=progress)


def result_record(gguf_path, tokenizer_source: str | None, ppl: LlamaCppPerplexity | None,
                  speed_result: LlamaCppSpeed | None) -> dict:
    """The JSON record of a llama.cpp run: what ran (file, tokenizer, versions) and what it measured."""
    import llama_cpp

    return {"backend": "llama.cpp", "model": str(Path(gguf_path).expanduser().resolve()),
            "tokenizer": tokenizer_source or "the GGUF's own",
            "versions": {"llmprune": __version__,
                         "llama_cpp_python": getattr(llama_cpp, "__version__", None)},
            "perplexity": {ppl.dataset: ppl.to_dict()} if ppl is not None else {},
            "speed": speed_result.to_dict() if speed_result is not None else None}
