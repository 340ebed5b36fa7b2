"""Progress output: a tqdm bar on a terminal, plain periodic lines anywhere else.

A bar redraws itself with carriage returns and ANSI escapes, which turn a log file (SLURM, ``> run.log``,
CI) into one unreadable line that only grows at the end. When stderr is not a terminal, the same
information is written as whole lines instead, at most every ``$LLMPRUNE_PROGRESS_SECONDS`` seconds
(default 10) and once at the end::

    wanda unstructured 50%: 10/30 blocks (33%), 12.3 s elapsed, ~24.6 s left
    wanda unstructured 50%: done, 30/30 blocks in 36.9 s
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from llmprune.errors import LlmpruneError

PROGRESS_SECONDS_ENV = "LLMPRUNE_PROGRESS_SECONDS"
DEFAULT_SECONDS = 10.0


def progress(total: int | None, desc: str = "", unit: str = "it", disable: bool = False, *,
             leave: bool = True, initial: int = 0, position: int | None = None, file: TextIO | None = None,
             iterable: Iterable | None = None) -> Any:
    """A progress reporter with tqdm's ``update(n)``, ``close()``, ``set_postfix_str`` and ``with``.

    On a terminal (``file``, default stderr, ``isatty()``) it is a tqdm bar: ``leave=False`` for
    inner bars, ``position`` as tqdm takes it. Otherwise a :class:`LineProgress`. ``disable``
    gives a silent tqdm. ``iterable`` makes it iterate as ``tqdm(iterable)`` does.
    """
    stream = sys.stderr if file is None else file
    if disable or _isatty(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave,
                    initial=initial, position=position, file=stream)
    return LineProgress(total, desc, unit, initial=initial, every=progress_seconds(), file=stream,
                        iterable=iterable)


@contextlib.contextmanager
def library_bars(show: bool | None = None) -> Iterator[None]:
    """Around a call into transformers: its own tqdm bars (loading weights, de-quantizing a GGUF) only
    where ours would be bars, on a terminal; in a log file they would write carriage returns.
    ``show``: force them on or off (None: on when stderr is a terminal)."""
    show = _isatty(sys.stderr) if show is None else show
    if show:
        yield
        return
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    bar = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if bar is not None:  # the GGUF reader calls tqdm.auto directly, outside transformers' switch
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if was_enabled:
            hf_logging.enable_progress_bar()


def progress_seconds() -> float:
    """Seconds between two plain progress lines: ``$LLMPRUNE_PROGRESS_SECONDS`` or 10."""
    text = os.environ.get(PROGRESS_SECONDS_ENV, "").strip()
    if not text:
        return DEFAULT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also rejects nan
        raise LlmpruneError(f"${PROGRESS_SECONDS_ENV} must be a number of seconds >= 0, got {text!r}")
    return seconds


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


def _duration(seconds: float) -> str:
    if seconds < 100:
        return f"{seconds:.1f} s"
    if seconds < 6000:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class LineProgress:
    """Plain-text progress: one whole line per report, no ``\\r``, no escape codes."""

    def __init__(self, total: int | None, desc: str = "", unit: str = "it", *, initial: int = 0,
                 every: float = DEFAULT_SECONDS, file: TextIO | None = None,
                 iterable: Iterable | None = None) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self.every = every
        self.file = file
        self.iterable = iterable
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._write(self._status(now))

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def close(self) -> None:
        """Write the final line once: ``done`` when the total was reached, else where it stopped."""
        if self.closed:
            return
        self.closed = True
        elapsed = time.monotonic() - self.start
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        if self.total is None or self.n >= self.total:
            self._write(f"done, {count} {self.unit} in {_duration(elapsed)}")
        else:
            self._write(f"stopped at {count} {self.unit} after {_duration(elapsed)}")

    def _status(self, now: float) -> str:
        elapsed = now - self.start
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total is not None else f"{self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({self.n / self.total:.0%})"
        parts.append(f"{_duration(elapsed)} elapsed")
        done_here = self.n - self.initial  # steps resumed from a checkpoint took no time in this run
        if self.total is not None and done_here > 0 and elapsed > 0:
            parts.append(f"~{_duration(max(self.total - self.n, 0) * elapsed / done_here)} left")
        return ", ".join(parts)

    def _write(self, status: str) -> None:
        stream = sys.stderr if self.file is None else self.file
        prefix = f"{self.desc}: " if self.desc else ""
        postfix = f" [{self.postfix}]" if self.postfix else ""
        stream.write(f"{prefix}{status}{postfix}\n")
        stream.flush()

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this progress has no iterable: pass iterable= to iterate over it")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
