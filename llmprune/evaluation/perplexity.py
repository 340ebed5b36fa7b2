"""Perplexity over non-overlapping windows, as the Wanda and SparseGPT scripts measure it.

The stream is cut into ``windows = numel // seqlen`` windows of ``seqlen`` tokens (the
remainder is dropped). Each window is scored alone, with no context carried over: every token
but the first is predicted from those before it. The reference accumulates, per batch of ``B``
windows, ``nll_b = mean CE over the batch's tokens * seqlen * B`` and reports
``exp(sum(nll_b) / (windows * seqlen))``; all windows being equally long, that is

    ppl = exp( mean over windows of (mean over the window's seqlen - 1 predictions of CE) ),

which is computed here, with the cross-entropy in float32 whatever the model's dtype.

Memory: a batch's logits are ``B x seqlen x vocab`` floats (4 x 2048 x 49152 float32 = 1.5 GiB for
SmolLM2, and as much again for the log-softmax), far more than the model. So the model body runs
alone, and the output head and the loss take ``logits_chunk`` positions at a time; the per-token
losses (``B x seqlen`` floats) are kept and summed exactly as with full logits, so the perplexity is
the same number. The chunked path is used only where ``head(body(ids))`` reproduces the model's own
logits bit for bit on a short probe (families that scale or soft-cap the logits are handled, see
:func:`split_head`); any other model gets the full logits, as before.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.blocks import input_device
from llmprune.data import eval_tokens
from llmprune.errors import LlmpruneError
from llmprune.progress import progress as progress_bar

# Positions whose logits exist at once: 512 x 49152 float32 = 96 MiB for SmolLM2, twice that with the
# log-softmax. Measured on the demo's evaluation (batch 4 x 2048): 1024 peaks ~100-280 MiB higher, and below
# 512 the peak is the body's activations while the head's matmul slows down (its weight is packed per call).
LOGITS_CHUNK = 512
PROBE_TOKENS = 32  # length of the check that head(body(ids)) is the model's own logits

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # annotations only (distance imports this module)
    from transformers import PreTrainedTokenizerBase

    from llmprune.evaluation.distance import DenseSide, DistanceResult


@dataclass
class PerplexityResult:
    """One perplexity measurement: ``ppl`` over ``windows`` windows of ``seqlen`` tokens."""

    dataset: str
    ppl: float
    windows: int
    tokens: int  # windows * seqlen: the tokens fed to the model
    seqlen: int
    seconds: float  # the model loop only (tokenization excluded)
    tokens_per_s: float
    distance: DistanceResult | None = None  # to the dense model, when asked for (``dense=``)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.distance is None:
            d.pop("distance")  # records without a distance stay as they were
        return d


def _labels(ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets of each window; the last position has none (-100, ignored). (B, L) -> (B, L)."""
    # Shifting the labels instead of the logits keeps the logits free of a (B, L, V) copy.
    labels = torch.full_like(ids, -100)  # (B, L)
    labels[:, :-1] = ids[:, 1:]
    return labels


def _window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each window, float32. logits (B, L, V), ids (B, L) -> (B,)."""
    batch, length, vocab = logits.shape
    labels = _labels(ids).to(logits.device)
    losses = F.cross_entropy(logits.float().reshape(-1, vocab), labels.view(-1), reduction="none")  # (B*L,)
    return losses.view(batch, length).sum(dim=1) / (length - 1)


@dataclass(frozen=True)
class HeadSplit:
    """A causal LM cut before its output head: ``logits(hidden(ids))`` is ``model(ids).logits``.

    After the head come the family's own steps, in its forward's order: ``* multiply`` (Cohere's
    ``logit_scale``), ``/ divide`` (Granite's ``logits_scaling``), then ``tanh(z / softcap) * softcap``
    (Gemma 2/3's ``final_logit_softcapping``); None skips a step.
    """

    body: torch.nn.Module
    head: torch.nn.Module
    multiply: float | None = None
    divide: float | None = None
    softcap: float | None = None

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states, after the last norm. (B, L) -> (B, L, hidden)."""
        out = self.body(input_ids=ids, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits for these hidden states. (..., hidden) -> (..., vocab)."""
        logits = self.head(hidden)
        # the same operations in the same order as the families' forwards, so the same bits
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def split_head(model) -> HeadSplit | None:
    """The model's body, output head and logit post-processing; None where they are not found.

    The body is ``model.base_model`` (the module a transformers CausalLM runs before its head), else
    ``get_decoder()``; the head is ``get_output_embeddings()``; the post-processing is read from the
    (text) config. A family that does anything else to its logits is caught by the probe in
    :func:`perplexity`, which then keeps the full logits.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    body = getattr(model, "base_model", None)
    if body is model or not isinstance(body, torch.nn.Module):
        get_decoder = getattr(model, "get_decoder", None)
        body = get_decoder() if callable(get_decoder) else None
    if not isinstance(head, torch.nn.Module) or not isinstance(body, torch.nn.Module) or body is model:
        return None
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def number(name: str) -> float | None:
        value = getattr(text, name, None)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return HeadSplit(body=body, head=head, multiply=number("logit_scale"), divide=number("logits_scaling"),
                     softcap=number("final_logit_softcapping"))


def _probe(model, split: HeadSplit, ids: torch.Tensor) -> str | None:
    """None when ``split`` gives the model's own logits bit for bit on ``ids``; else why not."""
    try:
        want = model(input_ids=ids, use_cache=False).logits  # (1, probe, vocab)
        got = split.logits(split.hidden(ids))
    except Exception as exc:  # noqa: BLE001 — a body that needs more than input ids: the full path still works
        return f"the body alone fails ({type(exc).__name__}: {exc})"
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"head(body) gives {tuple(got.shape)} {got.dtype}, the model {tuple(want.shape)} {want.dtype}"
    if not torch.equal(got, want.to(got.device)):
        differ = (got.float() - want.float().to(got.device)).abs().max().item()
        return f"head(body) differs from the model's logits by up to {differ:.3g}"
    return None


def _chunked_window_nll(split: HeadSplit, ids: torch.Tensor, chunk: int, on_logits=None) -> torch.Tensor:
    """:func:`_window_nll` of the model's logits, with at most ``chunk`` positions' logits at once.
    ids (B, L) -> (B,). ``on_logits(first_row, logits)`` sees each chunk's logits (the distance)."""
    return _token_losses(split, ids, chunk, on_logits).sum(dim=1) / (ids.shape[1] - 1)


def _token_losses(split: HeadSplit, ids: torch.Tensor, chunk: int, on_logits=None) -> torch.Tensor:
    """Next-token cross-entropy at every position (0 at the last), float32, in chunks. (B, L) -> (B, L).

    Each position's loss depends on its own logits row only, and the per-token losses are summed as
    in :func:`_window_nll`, so the result is the same bits as long as the head's matmul gives each
    row the same bits whatever the number of rows. With torch's CPU build (MKL) it does from 16 rows
    up, and below that a small-matrix kernel rounds differently: hence chunks of equal size rather
    than a short last one (1024 rows in chunks of 1020 are 512 + 512, not 1020 + 4). GPU libraries
    pick kernels by shape too; there the numbers may differ in the last bits (never measured here).
    """
    batch, length = ids.shape
    rows = batch * length
    size = -(-rows // -(-rows // chunk))  # ceil(rows / number of chunks): no short last chunk
    hidden = split.hidden(ids)  # (B, L, hidden)
    flat = hidden.reshape(rows, hidden.shape[-1])  # (B*L, hidden), a view
    labels = _labels(ids).view(-1)  # (B*L,)
    losses = []
    for first in range(0, rows, size):
        logits = split.logits(flat[first : first + size])  # (size, vocab)
        target = labels[first : first + size].to(logits.device)
        losses.append(F.cross_entropy(logits.float(), target, reduction="none"))  # (size,)
        if on_logits is not None:
            on_logits(first, logits)
        del logits  # before the next chunk allocates its own
    return torch.cat(losses).view(batch, length)


def _check_arguments(seqlen, batch_size, max_windows, logits_chunk) -> None:
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise LlmpruneError(f"seqlen {seqlen!r} is too short: use an integer of at least 2")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LlmpruneError(f"batch size must be a positive integer, got {batch_size!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                    or max_windows < 1):
        raise LlmpruneError(f"max_windows must be a positive integer, got {max_windows!r}")
    if logits_chunk is not None and (isinstance(logits_chunk, bool) or not isinstance(logits_chunk, int)
                                     or logits_chunk < 1):
        raise LlmpruneError(f"logits_chunk must be a positive integer or None, got {logits_chunk!r}")


def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool = True,
    dataset: str = "",
    logits_chunk: int | None = LOGITS_CHUNK,
    dense: DenseSide | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on a 1-D token stream (or ``(1, n)``) in windows of ``seqlen``.

    ``max_windows`` evaluates only the first windows; ``batch_size`` windows share a forward.
    ``logits_chunk`` positions' logits exist at once (see the module docstring); None computes the
    whole batch's logits in one go, as the reference scripts do. ``dataset`` names the stream in
    the result. ``dense``: also measure the distance to the dense model on the same positions from
    the same logits (:mod:`llmprune.evaluation.distance`; the perplexity is the same number), in the
    result's ``distance``; a ``dense`` that records writes the dense cache instead.

    Example::

        >>> import llmprune
        >>> model, tok = llmprune.load_model("smollm2-135m")
        >>> ids = tok("the quick brown fox jumps over the lazy dog " * 40, return_tensors="pt").input_ids
        >>> llmprune.perplexity(model, ids, seqlen=64, max_windows=2).windows
        2
    """
    _check_arguments(seqlen, batch_size, max_windows, logits_chunk)
    flat = tokens.reshape(-1)
    windows = window_count(flat, seqlen, max_windows)
    if windows < 1:
        raise LlmpruneError(
            f"the {dataset or 'evaluation'} stream has {flat.numel()} tokens, fewer than one window of "
            f"seqlen {seqlen}: use a shorter --seqlen"
        )
    data = flat[: windows * seqlen].view(windows, seqlen)  # (windows, seqlen)
    device = input_device(model)
    tracker = dense.start(dataset, data) if dense is not None else None  # a missing cache fails here

    with torch.inference_mode():
        split = _chunked_path(model, data[:1, :PROBE_TOKENS].to(device)) if logits_chunk is not None else None
        per_window = []  # (B,) float32 tensors, left on the device until the end (no sync per batch)
        start = time.perf_counter()
        with progress_bar(windows, f"ppl {dataset}".strip(), "win", disable=not progress, leave=False) as bar:
            for first in range(0, windows, batch_size):
                ids = data[first : first + batch_size].to(device)  # (B, seqlen)
                per_window.append(_batch_nll(model, split, ids, logits_chunk, tracker, first))
                bar.update(ids.shape[0])
        mean_nll = torch.cat([nll.cpu() for nll in per_window]).double().mean().item()
        distance = tracker.finish() if tracker is not None else None
    seconds = time.perf_counter() - start
    ppl = float("inf") if mean_nll >= 700 else math.exp(mean_nll)  # exp overflows; nan stays nan
    tokens_done = windows * seqlen
    return PerplexityResult(dataset=dataset, ppl=ppl, windows=windows, tokens=tokens_done, seqlen=seqlen,
                            seconds=seconds, distance=distance,
                            tokens_per_s=tokens_done / seconds if seconds > 0 else float("inf"))


def _batch_nll(model, split: HeadSplit | None, ids: torch.Tensor, logits_chunk: int | None, tracker,
               first: int) -> torch.Tensor:
    """The mean loss of each window of one batch ``ids`` (B, seqlen), windows ``first ..`` of the
    stream; ``tracker`` (the distance's, or None) sees every chunk of logits. -> (B,)."""
    on_logits = None
    if tracker is not None:
        tracker.batch(first, ids)
        base = first * ids.shape[1]

        def on_logits(row, logits):
            tracker.rows(base + row, logits)
    if split is not None:
        return _chunked_window_nll(split, ids, logits_chunk, on_logits)
    logits = model(input_ids=ids, use_cache=False).logits  # (B, seqlen, vocab)
    nll = _window_nll(logits, ids)
    if on_logits is not None:
        flat_logits = logits.reshape(-1, logits.shape[-1])
        for row in range(0, flat_logits.shape[0], LOGITS_CHUNK):
            on_logits(row, flat_logits[row : row + LOGITS_CHUNK])
    return nll


def window_count(flat: torch.Tensor, seqlen: int, max_windows: int | None) -> int:
    """How many whole windows of ``seqlen`` tokens of the stream ``flat`` are evaluated."""
    windows = flat.numel() // seqlen
    return windows if max_windows is None else min(windows, max_windows)


def _chunked_path(model, probe: torch.Tensor) -> HeadSplit | None:
    """The model cut before its head where that reproduces its logits; None (full logits) otherwise."""
    split = split_head(model)
    why = "no output head or body found" if split is None else _probe(model, split, probe)
    if why is None:
        return split
    log.warning("perplexity with full logits (batch x seqlen x vocab at once) for %s: %s",
                type(model).__name__, why)
    return None


def evaluate_perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: str,
    seqlen: int,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool = True,
    dense: DenseSide | None = None,
) -> PerplexityResult:
    """Perplexity on a named dataset (``wikitext2``, ``ptb``, ``c4``) or a local ``.txt``/``.jsonl``
    file, as the Wanda and SparseGPT papers measure it: the evaluation split's token stream
    (:func:`llmprune.data.eval_tokens`, read from ``data_dir``, else ``$LLMPRUNE_DATA_DIR``,
    else the hub) in non-overlapping windows of ``seqlen`` tokens (:func:`perplexity`).

    ``max_windows``: only the first K windows (a quick look; None: all). ``batch_size``: windows
    per forward pass. ``progress``: a bar (plain lines off a terminal). ``dense``: the distance to
    the dense model too (:func:`perplexity`). Returns a :class:`PerplexityResult` (``ppl``,
    ``windows``, ``tokens``, ``seqlen``, ``seconds``, ``distance``).

    Example::

        >>> import llmprune
        >>> model, tok = llmprune.load_model("smollm2-135m")
        >>> result = llmprune.evaluate_perplexity(model, tok, "wikitext2", seqlen=512, max_windows=8,
        ...                                       data_dir="../shared/data")
        >>> result.windows
        8
    """
    tokens = eval_tokens(dataset, tokenizer, seqlen, data_dir=data_dir)
    return perplexity(model, tokens, seqlen, batch_size=batch_size, max_windows=max_windows,
                      progress=progress, dataset=dataset, dense=dense)
