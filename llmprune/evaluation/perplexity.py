"""Perplexity over non-overlapping windows, as the Wanda and SparseGPT scripts measure it.

The stream is cut into ``windows = numel // seqlen`` windows of ``seqlen`` tokens (the
remainder is dropped). Each window is scored alone, with no context carried over: every token
but the first is predicted from those before it. The reference accumulates, per batch of ``B``
windows, ``nll_b = mean CE over the batch's tokens * seqlen * B`` and reports
``exp(sum(nll_b) / (windows * seqlen))``; all windows being equally long, that is

    ppl = exp( mean over windows of (mean over the window's seqlen - 1 predictions of CE) ),

which is computed here, with the cross-entropy in float32 whatever the model's dtype.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmprune.errors import LlmpruneError


@dataclass
class PerplexityResult:
    dataset: str
    ppl: float
    windows: int
    tokens: int  # windows * seqlen: the tokens fed to the model
    seqlen: int
    seconds: float  # the model loop only (tokenization excluded)
    tokens_per_s: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _input_device(model) -> torch.device:
    """Where input ids must go: the input embeddings' device (first shard under device_map)."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None:
        return weight.device
    return next(model.parameters()).device


def _window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each window, float32. logits (B, L, V), ids (B, L) -> (B,)."""
    batch, length, vocab = logits.shape
    # Shifting the labels instead of the logits keeps logits.view() free of a (B, L, V) copy;
    # the last position of each window has no target and is ignored.
    labels = torch.full_like(ids, -100)  # (B, L)
    labels[:, :-1] = ids[:, 1:]
    losses = F.cross_entropy(logits.float().reshape(-1, vocab), labels.view(-1), reduction="none")  # (B*L,)
    return losses.view(batch, length).sum(dim=1) / (length - 1)


def perplexity(
    model,
    tokens: torch.Tensor,
    seqlen: int,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool = True,
    dataset: str = "",
) -> PerplexityResult:
    """Perplexity of ``model`` on a 1-D token stream (or ``(1, n)``) in windows of ``seqlen``.

    ``max_windows`` evaluates only the first windows; ``batch_size`` windows share a forward.
    """
    from tqdm.auto import tqdm

    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise LlmpruneError(f"seqlen {seqlen!r} is too short: use an integer of at least 2")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LlmpruneError(f"batch size must be a positive integer, got {batch_size!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                    or max_windows < 1):
        raise LlmpruneError(f"max_windows must be a positive integer, got {max_windows!r}")
    flat = tokens.reshape(-1)
    windows = flat.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise LlmpruneError(
            f"the {dataset or 'evaluation'} stream has {flat.numel()} tokens, fewer than one window of "
            f"seqlen {seqlen}: use a shorter --seqlen"
        )
    data = flat[: windows * seqlen].view(windows, seqlen)  # (windows, seqlen)
    device = _input_device(model)

    per_window = []  # (B,) float32 tensors, left on the device until the end (no sync per batch)
    start = time.perf_counter()
    with torch.inference_mode(), tqdm(total=windows, desc=f"ppl {dataset}".strip(), unit="win",
                                      disable=not progress, leave=False) as bar:
        for first in range(0, windows, batch_size):
            ids = data[first : first + batch_size].to(device)  # (B, seqlen)
            logits = model(input_ids=ids, use_cache=False).logits  # (B, seqlen, vocab)
            per_window.append(_window_nll(logits, ids))
            del logits  # free the biggest tensor before the next forward allocates its own
            bar.update(ids.shape[0])
        mean_nll = torch.cat([nll.cpu() for nll in per_window]).double().mean().item()
    seconds = time.perf_counter() - start
    ppl = float("inf") if mean_nll >= 700 else math.exp(mean_nll)  # exp overflows; nan stays nan
    tokens_done = windows * seqlen
    return PerplexityResult(
        dataset=dataset, ppl=ppl, windows=windows, tokens=tokens_done, seqlen=seqlen,
        seconds=seconds, tokens_per_s=tokens_done / seconds if seconds > 0 else float("inf"),
    )


def evaluate_perplexity(
    model,
    tokenizer,
    dataset: str,
    seqlen: int,
    data_dir=None,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity on a named dataset (or local file): :func:`llmprune.data.eval_tokens` then
    :func:`perplexity`."""
    from llmprune.data import eval_tokens

    tokens = eval_tokens(dataset, tokenizer, seqlen, data_dir=data_dir)
    return perplexity(model, tokens, seqlen, batch_size=batch_size, max_windows=max_windows,
                      progress=progress, dataset=dataset)
