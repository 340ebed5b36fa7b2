"""Distance of a model's next-token distributions to the dense model's, measured in the perplexity pass.

Perplexity averages the log-probability of the *observed* token; two models with the same
perplexity can put their mass on different tokens elsewhere. What llama.cpp's ``llama-perplexity
--kl-divergence`` reports for quantized models is measured here for pruned ones, on the perplexity's
own windows and positions (the first ``seqlen - 1`` of each window, those with a next token):

- ``KL(dense || model)`` per position: ``sum_v p(v) (log p(v) - log q(v))``, p the dense model's
  softmax, q the model's, both float32 log-softmaxes of the logits; reported as the mean over the
  positions and its 90/99/99.9th percentiles (linear interpolation);
- top-1 agreement: the share of positions whose argmax is the dense model's;
- the same KL on the dense model's top-k (``approx``): the distributions coarsened to k + 1 bins
  (the dense model's k most likely tokens, and the rest together). By the log-sum inequality this is
  a lower bound of the exact KL, and it is all a cache of the dense side needs: per position the k
  token ids (int32), their dense log-probabilities (float32) and the log of the remaining mass
  (float32), 8k + 4 bytes (260 bytes at k = 32: 77 MiB for WikiText-2's 303k positions with
  SmolLM2's tokenizer).

The dense side is computed once, by the dense model's own perplexity pass (``record``), and kept on
disk under a key hashing the dense model's fingerprint (:func:`model_fingerprint`), the dataset's
name, seqlen, the number of windows, the windows' token ids themselves (so another tokenizer or file
never matches) and k. A pruned pass reads it back and needs no dense model; the file carries a
checksum and is written atomically: a file that fails it, holds another key, or is missing is rebuilt
from the dense model where one is in memory, and is otherwise an error naming the fix, never trusted.
With ``model`` given (``kl_exact``), the dense model runs beside the pruned one on each batch and the
KL over the whole vocabulary is reported, the top-k approximation beside it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmprune.blocks import input_device
from llmprune.errors import LlmpruneError
from llmprune.evaluation.perplexity import perplexity, split_head
from llmprune.io import write_atomic

log = logging.getLogger(__name__)

CACHE_FORMAT = "llmprune-dense-topk"
CACHE_VERSION = 1
PERCENTILES = (0.9, 0.99, 0.999)
TINY_LOG = -103.0  # log of the smallest positive float32: a remaining mass that underflowed


def default_cache_dir() -> Path:
    """Where the dense side's caches go by default: ``$LLMPRUNE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/llmprune``, else ``~/.cache/llmprune``."""
    if os.environ.get("LLMPRUNE_CACHE_DIR"):
        return Path(os.environ["LLMPRUNE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base) / "llmprune"


def model_fingerprint(model) -> str:
    """A short key naming a model's weights: its class, source, dtype, and per parameter the name,
    shape and a hash of 4096 evenly spaced values. Two checkpoints that differ in any of these get
    different keys; computed in well under a second for a 7B model (no full pass over the weights)."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update(f"{type(model).__name__}|{getattr(config, '_name_or_path', '')}".encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            digest.update(f"|{name}:{tuple(param.shape)}:{param.dtype}".encode())
            if param.device.type == "meta" or param.numel() == 0:
                continue
            flat = param.detach().reshape(-1)
            step = max(flat.numel() // 4096, 1)
            sample = flat[::step][:4096].float().cpu().contiguous()
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:24]


@dataclass
class DistanceResult:
    """The distance of one perplexity pass to the dense model (see the module docstring).

    ``kl_*`` and ``top1_agreement`` are the exact values when ``exact``, else the top-k
    approximation's; ``approx`` always holds the top-k approximation (``kl_mean``, ``kl_p90``,
    ``kl_p99``, ``kl_p999``, ``dense_topk_mass``: the dense mass its k tokens hold, ``topk_mass``:
    the model's mass on them). ``cache``/``cache_bytes``: the dense side's file; ``seconds``: the
    time spent on the distance (cache read and the per-position arithmetic; the dense model's
    forwards with ``exact``)."""

    kl_mean: float
    kl_p90: float
    kl_p99: float
    kl_p999: float
    top1_agreement: float
    exact: bool
    topk: int
    positions: int
    approx: dict = field(default_factory=dict)
    cache: str = ""
    cache_bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DistanceResult:
        return cls(**{name: d[name] for name in cls.__dataclass_fields__ if name in d})


def _summary(kl: torch.Tensor) -> dict:
    kl = kl.double()
    if not kl.numel():
        return {"kl_mean": 0.0, "kl_p90": 0.0, "kl_p99": 0.0, "kl_p999": 0.0}
    q = torch.quantile(kl, torch.tensor(PERCENTILES, dtype=torch.float64)).tolist()
    return {"kl_mean": kl.mean().item(), "kl_p90": q[0], "kl_p99": q[1], "kl_p999": q[2]}


# ----------------------------------------------------------------------------- the per-position arithmetic

def dense_topk(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the cache keeps of dense log-probs ``logp`` (n, V): the k largest (ids int32, log-probs
    float32, descending) and the log of the mass outside them (n,). ``logp`` is overwritten."""
    values, ids = logp.topk(k, dim=-1)  # (n, k), sorted
    rest = logp.scatter_(1, ids, float("-inf")).logsumexp(dim=-1)  # (n,): log of the other tokens' mass
    return ids.to(torch.int32), values.float(), rest.float()


def topk_kl(ids: torch.Tensor, dense_lp: torch.Tensor, dense_rest: torch.Tensor,
            logq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL of the (k + 1)-bin coarsening per position, and the model's mass on the dense top-k.

    ``ids``/``dense_lp`` (n, k) and ``dense_rest`` (n,) as :func:`dense_topk` gives them, ``logq``
    (n, V) the model's log-probs (overwritten)."""
    q_top = logq.gather(1, ids.long())  # (n, k)
    q_rest = logq.scatter_(1, ids.long(), float("-inf")).logsumexp(dim=-1).clamp(min=TINY_LOG)  # (n,)
    p_top = dense_lp.exp()
    kl = torch.where(p_top > 0, p_top * (dense_lp - q_top), torch.zeros_like(p_top)).sum(-1)
    p_rest = dense_rest.exp()
    kl = kl + torch.where(p_rest > 0, p_rest * (dense_rest - q_rest), torch.zeros_like(p_rest))
    return kl.clamp(min=0.0), q_top.exp().sum(-1)


def exact_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row over the whole vocabulary, float32 log-probs (n, V) -> (n,)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1).clamp(min=0.0)


# ----------------------------------------------------------------------------- the dense side

@dataclass
class DenseSide:
    """The dense model's side of the distance, for :func:`llmprune.evaluation.perplexity.perplexity`.

    ``key``: the dense model's fingerprint. ``cache_dir``: the cache folder. ``topk``: k.
    ``record``: the model evaluated is the dense model: its pass writes the cache (no distance is
    reported). ``model``: the dense model in memory, for the exact KL and to rebuild a cache that
    is missing or corrupt.
    """

    key: str
    cache_dir: str | os.PathLike
    topk: int = 32
    model: Any = None
    record: bool = False

    def cache_path(self, dataset: str, data: torch.Tensor) -> tuple[Path, str]:
        """The cache file of ``dataset``'s windows ``data`` (windows, seqlen), and its full key."""
        windows, seqlen = data.shape
        tokens = hashlib.sha256(data.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
        key = hashlib.sha256(
            f"{CACHE_FORMAT}|{CACHE_VERSION}|{self.key}|{dataset}|{seqlen}|{windows}|{tokens}|{self.topk}".encode()
        ).hexdigest()
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(dataset).name)[:40] or "stream"
        name = f"{stem}-{seqlen}x{windows}-top{self.topk}-{key[:24]}.pt"
        return Path(self.cache_dir).expanduser() / "kl" / name, key

    def ready(self, dataset: str, data: torch.Tensor) -> bool:
        """Whether a valid cache of these windows is on disk."""
        path, key = self.cache_path(dataset, data)
        return read_cache(path, key, data.numel(), self.topk)[0] is not None

    def start(self, dataset: str, data: torch.Tensor) -> _Pass:
        """Begin a pass over ``data``: the cache read back (rebuilt where needed), or a new one to fill."""
        path, key = self.cache_path(dataset, data)
        if self.record:
            return _Pass(self, path, key, data, record=True)
        cached, why = read_cache(path, key, data.numel(), self.topk)
        if cached is None:
            if self.model is None:
                raise LlmpruneError(
                    f"no usable dense cache for {dataset} (seqlen {data.shape[1]}, {data.shape[0]} windows, "
                    f"top-{self.topk}) at {path}: it {why}. Run the dense model's pass first (llmprune eval "
                    "--dense MODEL builds it; a recipe's dense run does) or keep the dense model in memory")
            if why != "does not exist":
                log.warning("dense cache %s %s: rebuilding it from the dense model", path, why)
            cached = build_cache(self, dataset, data, path, key)
        return _Pass(self, path, key, data, record=False, cached=cached)


class _Pass:
    """One perplexity pass's distance bookkeeping: rows are the flattened (window, position) pairs."""

    def __init__(self, side: DenseSide, path: Path, key: str, data: torch.Tensor, record: bool,
                 cached: dict | None = None):
        self.side, self.path, self.key, self.data, self.record = side, path, key, data, record
        rows, k = data.numel(), side.topk
        self.seconds = 0.0
        self.exact = not record and side.model is not None
        if record:
            self.ids = torch.empty(rows, k, dtype=torch.int32)
            self.lp = torch.empty(rows, k, dtype=torch.float32)
            self.rest = torch.empty(rows, dtype=torch.float32)
        else:
            self.ids, self.lp, self.rest = cached["ids"], cached["logprobs"], cached["rest"]
            self.kl_topk = torch.zeros(rows)
            self.mass = torch.zeros(rows)
            self.agree = torch.zeros(rows, dtype=torch.bool)
            self.kl_exact = torch.zeros(rows) if self.exact else None
        self._dense_batch = None

    def batch(self, first_window: int, ids: torch.Tensor) -> None:
        """Called before a batch of windows: with the exact KL, the dense model's pass over them."""
        if not self.exact:
            return
        start = time.perf_counter()
        dense = self.side.model
        split = split_head(dense)
        if split is not None:
            hidden = split.hidden(ids.to(_device(dense)))
            self._dense_batch = (split, hidden.reshape(-1, hidden.shape[-1]))
        else:
            logits = dense(input_ids=ids.to(_device(dense)), use_cache=False).logits
            self._dense_batch = (None, logits.reshape(-1, logits.shape[-1]))
        self._batch_first_row = first_window * self.data.shape[1]
        self.seconds += time.perf_counter() - start

    def rows(self, first: int, logits: torch.Tensor) -> None:
        """The model's logits (n, V) of the flat rows ``first .. first + n``."""
        start = time.perf_counter()
        n = logits.shape[0]
        logq = F.log_softmax(logits.float(), dim=-1)  # (n, V)
        sl = slice(first, first + n)
        if self.record:
            self.ids[sl], self.lp[sl], self.rest[sl] = dense_topk(logq, self.side.topk)
        else:
            if self.exact:
                split, held = self._dense_batch
                local = held[first - self._batch_first_row : first - self._batch_first_row + n]
                dense_logits = split.logits(local) if split is not None else local
                logp = F.log_softmax(dense_logits.float().to(logq.device), dim=-1)
                self.kl_exact[sl] = exact_kl(logp, logq).cpu()
                self.agree[sl] = (logp.argmax(-1) == logq.argmax(-1)).cpu()
                del logp, dense_logits
            else:
                self.agree[sl] = (logq.argmax(-1).cpu() == self.ids[sl, 0].long())
            kl, mass = topk_kl(self.ids[sl].to(logq.device), self.lp[sl].to(logq.device),
                               self.rest[sl].to(logq.device), logq)
            self.kl_topk[sl], self.mass[sl] = kl.cpu(), mass.cpu()
        self.seconds += time.perf_counter() - start

    def finish(self) -> DistanceResult | None:
        """Write the cache (record) or the distance over the positions that have a next token."""
        start = time.perf_counter()
        if self.record:
            write_cache(self.path, self.key, self.side.key, self.ids, self.lp, self.rest)
            return None
        windows, seqlen = self.data.shape
        keep = torch.ones(windows, seqlen, dtype=torch.bool)
        keep[:, -1] = False
        keep = keep.view(-1)
        approx = _summary(self.kl_topk[keep])
        approx["dense_topk_mass"] = self.rest[keep].double().exp().neg().add(1).mean().item()
        approx["topk_mass"] = self.mass[keep].double().mean().item()
        main = _summary(self.kl_exact[keep]) if self.exact else dict(approx)
        self.seconds += time.perf_counter() - start
        return DistanceResult(
            kl_mean=main["kl_mean"], kl_p90=main["kl_p90"], kl_p99=main["kl_p99"], kl_p999=main["kl_p999"],
            top1_agreement=self.agree[keep].double().mean().item(), exact=self.exact, topk=self.side.topk,
            positions=int(keep.sum()), approx=approx, cache=str(self.path),
            cache_bytes=self.path.stat().st_size if self.path.is_file() else 0,
            seconds=round(self.seconds, 3))


def _device(model) -> torch.device:
    return input_device(model)


# ----------------------------------------------------------------------------- the cache file

def _checksum(ids: torch.Tensor, lp: torch.Tensor, rest: torch.Tensor, header: str) -> str:
    digest = hashlib.sha256(header.encode())
    for t in (ids, lp, rest):
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_cache(path: Path, key: str, dense_key: str, ids, lp, rest) -> None:
    header = f"{CACHE_FORMAT}|{CACHE_VERSION}|{key}|{dense_key}"
    payload = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "dense_key": dense_key,
               "ids": ids, "logprobs": lp, "rest": rest, "checksum": _checksum(ids, lp, rest, header)}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    write_atomic(path, lambda f: f.write(data))


def read_cache(path: Path, key: str, rows: int, k: int) -> tuple[dict | None, str]:
    """``(payload or None, why not)``: None unless the file is whole, of this format and key."""
    if not path.is_file():
        return None, "does not exist"
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        header = f"{stored['format']}|{stored['version']}|{stored['key']}|{stored['dense_key']}"
        if stored["format"] != CACHE_FORMAT or stored["version"] != CACHE_VERSION or stored["key"] != key:
            return None, "holds another key (another model, tokenizer, dataset, seqlen, window set or k)"
        ids, lp, rest = stored["ids"], stored["logprobs"], stored["rest"]
        if tuple(ids.shape) != (rows, k) or tuple(lp.shape) != (rows, k) or tuple(rest.shape) != (rows,):
            return None, "has the wrong shape"
        if stored["checksum"] != _checksum(ids, lp, rest, header):
            return None, "fails its checksum (corrupt or edited)"
    except Exception as exc:  # noqa: BLE001 — truncated zip, pickle refused, missing field: all mean "rebuild"
        return None, f"cannot be read ({type(exc).__name__})"
    return stored, ""


def build_cache(side: DenseSide, dataset: str, data: torch.Tensor, path: Path, key: str) -> dict:
    """Run the dense model (``side.model``) over ``data`` and write its cache; returns the payload."""
    recorder = DenseSide(key=side.key, cache_dir=side.cache_dir, topk=side.topk, record=True)
    windows, seqlen = data.shape
    perplexity(side.model, data.reshape(-1), seqlen, max_windows=windows, progress=False, dataset=dataset,
               dense=recorder)
    stored, why = read_cache(path, key, data.numel(), side.topk)
    if stored is None:
        raise LlmpruneError(f"the dense cache {path} just written {why}: check the disk holding it")
    return stored
