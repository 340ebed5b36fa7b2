"""Calibration: capture what block 0 receives, and hooks that accumulate per-layer statistics.

Two pieces, both context-managed so that no hook outlives its use:

* :func:`capture_block_inputs` runs the model up to the first decoder block and stops there,
  keeping the block's hidden-state input and every other argument the installed transformers
  passes to it (attention mask, position ids, rotary ``position_embeddings``, cache position...).
  Whatever the version passes, we pass back unchanged.
* :class:`StatsCollector` registers forward hooks on Linear layers and accumulates, in float32,
  the squared L2 norm of each input channel over all calibration tokens (Wanda) and/or
  ``Σ x xᵀ`` (SparseGPT's Hessian ``2 XᵀX / n``). Linear layers that read the same tensor
  (q/k/v, gate/up) share one accumulator, so the statistics are computed once per input.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from llmprune.methods import LayerStats


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass early; never escapes this module."""


def _first_param_device(module: nn.Module) -> torch.device:
    hook = getattr(module, "_hf_hook", None)  # accelerate: parameters may be offloaded (meta)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def block_device(block: nn.Module) -> torch.device:
    """The device a block computes on (accelerate's execution device when it has one)."""
    return _first_param_device(block)


@dataclass
class BlockInputs:
    """Inputs of block 0: hidden states for every calibration window, and the block kwargs.

    ``kwargs`` were captured for a batch of one window; their tensors broadcast over any batch
    (masks are ``(1, 1, T, T)`` or None, rotary tables ``(1, T, d)``, position ids ``(1, T)``).
    """

    hidden: torch.Tensor  # (nsamples, seqlen, hidden)
    kwargs: dict = field(default_factory=dict)


def _move(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def kwargs_on(kwargs: dict, device: torch.device) -> dict:
    """The captured block kwargs with every tensor moved to ``device``."""
    return _move(kwargs, device)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    block: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    store_device: torch.device | str | None = None,
) -> BlockInputs:
    """Run ``windows`` (nsamples, seqlen) through the model until ``block`` and stop there."""
    captured: dict = {}

    def pre_hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured["hidden"] = hidden
        if "kwargs" not in captured:
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            # no KV cache during calibration: each window is one full forward
            for key in ("cache", "past_key_value", "past_key_values"):
                if key in rest:
                    rest[key] = None
            if "use_cache" in rest:
                rest["use_cache"] = False
            captured["kwargs"] = rest
        raise _StopForward

    embed = model.get_input_embeddings()
    in_device = _first_param_device(embed)
    nsamples, seqlen = windows.shape
    hidden_all: torch.Tensor | None = None
    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        # the first window alone, so the captured kwargs have batch dimension one
        starts = [0] + list(range(1, nsamples, batch_size))
        for start in starts:
            stop = 1 if start == 0 else min(start + batch_size, nsamples)
            ids = windows[start:stop].to(in_device)
            with contextlib.suppress(_StopForward):
                model(input_ids=ids, use_cache=False)
            hidden = captured.pop("hidden")
            if hidden_all is None:
                device = torch.device(store_device) if store_device is not None else hidden.device
                hidden_all = torch.empty((nsamples, seqlen, hidden.shape[-1]), dtype=hidden.dtype, device=device)
            hidden_all[start:stop] = hidden.to(hidden_all.device)
    finally:
        handle.remove()
    return BlockInputs(hidden=hidden_all, kwargs=captured["kwargs"])


def block_output(out) -> torch.Tensor:
    """A decoder block returns a tensor (transformers 5) or a tuple whose first item it is."""
    return out[0] if isinstance(out, (tuple, list)) else out


class _Accumulator:
    """Running float32 sums over the rows of a layer's input: Σ x², Σ x xᵀ, and the count."""

    def __init__(self, in_features: int, device: torch.device, norms: bool, hessian: bool, moments: bool = False):
        self.tokens = 0
        self.windows = 0
        self.sq_norm = torch.zeros(in_features, dtype=torch.float32, device=device) if norms else None
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None
        zeros = (lambda: torch.zeros(in_features, dtype=torch.float32, device=device)) if moments else (lambda: None)
        self.x_sum, self.var_sum = zeros(), zeros()

    def add(self, x: torch.Tensor) -> None:
        if self.x_sum is not None:  # DSnoT: per-window sums and population variances
            xw = x.reshape(x.shape[0] if x.dim() == 3 else 1, -1, x.shape[-1]).float()  # (windows, tokens, in)
            self.x_sum += xw.sum(dim=(0, 1))
            # two-pass population variance over the tokens: as exact as torch.var and about 5x
            # faster on a CPU, where torch.var over the middle dimension is a strided reduction
            self.var_sum += (xw - xw.mean(dim=1, keepdim=True)).square_().mean(dim=1).sum(dim=0)
            self.windows += xw.shape[0]
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in_features)
        self.tokens += x.shape[0]
        if self.sq_norm is not None:
            self.sq_norm += x.pow(2).sum(dim=0)
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)

    def stats(self) -> LayerStats:
        hessian = None
        if self.xtx is not None:
            hessian = self.xtx.mul_(2.0 / max(self.tokens, 1))  # reuse the buffer: 2 XᵀX / n
            self.xtx = None
        return LayerStats(tokens=self.tokens, sq_norm=self.sq_norm, hessian=hessian, x_sum=self.x_sum,
                          var_sum=self.var_sum, windows=self.windows)


class _RoutedInputs:
    """One pre-hook on a fused-experts module: each expert's accumulators get only the rows
    routed to it (its first projection the rows themselves, its second projection what the
    first makes of them, computed by the layout's ``hidden``)."""

    def __init__(self, fused):
        self.fused = fused
        self.first: dict[int, _Accumulator] = {}
        self.second: dict[int, _Accumulator] = {}
        self.stop = False

    def __call__(self, module, args, kwargs):
        x, index = self.fused.routing(args, kwargs)  # (tokens, hidden), (tokens, top_k)
        x, count = x.detach(), self.fused.num_experts
        flat = index.reshape(-1)
        flat = torch.where((flat >= 0) & (flat < count), flat, count)  # out-of-range slots: nobody's
        order = torch.argsort(flat, stable=True)
        rows = order // index.shape[-1]  # token of each routed slot, grouped by expert
        start = 0
        for expert, n in enumerate(torch.bincount(flat, minlength=count + 1)[:count].tolist()):
            if n and (expert in self.first or expert in self.second):
                xe = x[rows[start:start + n]]  # (n, hidden)
                if expert in self.first:
                    self.first[expert].add(xe)
                if expert in self.second:
                    self.second[expert].add(self.fused.hidden(module, expert, xe))
            start += n
        if self.stop:
            raise _StopForward


class StatsCollector:
    """Forward hooks that accumulate input statistics for a set of Linear layers.

    ``groups`` lists tuples of layer names that read the same input tensor; only the first of
    each group is hooked and all members share its statistics. Use as a context manager: the
    hooks are removed on exit, also when the forward pass raises. ``stop_early`` ends each
    forward pass (by an internal exception the caller suppresses with :meth:`run`) once the
    last hooked layer has seen its input, which saves the rest of the block's compute.

    A layer may also be a ``llmprune.models.WeightView``: its ``module`` is hooked (a Conv1D,
    an expert Linear); a fused expert's statistics come from one hook on its experts module
    that splits the input by routing (:class:`_RoutedInputs`), so each expert counts only its
    tokens, and an expert no token reaches ends with ``tokens == 0``.

    ``moments``: True for every group, or the lead names of the groups that need them (DSnoT's
    per-window sums and variances; the layers it skips never read them).
    """

    def __init__(
        self,
        layers: dict[str, nn.Linear],
        groups: list[tuple[str, ...]],
        norms: bool,
        hessian: bool,
        stop_early: bool = False,
        moments: bool | frozenset[str] = False,
    ):
        missing = [name for group in groups for name in group if name not in layers]
        if missing or not all(groups):
            raise ValueError(f"groups must be non-empty and name only hooked layers; not hooked: {missing}")
        self.layers = layers
        self.groups = [tuple(g) for g in groups]
        self.norms, self.hessian, self.moments = norms, hessian, moments
        self.stop_early = stop_early
        self._acc: dict[str, _Accumulator] = {}
        self._handles: list = []

    def __enter__(self) -> "StatsCollector":
        try:
            last = self.groups[-1][0] if self.groups else None
            routed: dict[int, tuple[nn.Module, _RoutedInputs]] = {}
            for group in self.groups:
                lead = group[0]
                layer = self.layers[lead]
                moments = self.moments if isinstance(self.moments, bool) else lead in self.moments
                acc = _Accumulator(layer.in_features, layer.weight.device, self.norms, self.hessian, moments)
                self._acc[lead] = acc
                stop = self.stop_early and lead == last
                fused = getattr(layer, "fused", None)
                if fused is not None:
                    module, hook = routed.setdefault(id(layer.module), (layer.module, _RoutedInputs(fused)))
                    getattr(hook, layer.role)[layer.expert] = acc
                    hook.stop = hook.stop or stop
                    continue
                module = getattr(layer, "module", layer)  # a WeightView reads its module's input
                self._handles.append(module.register_forward_pre_hook(self._make_hook(acc, stop)))
            for module, hook in routed.values():
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @staticmethod
    def _make_hook(acc: _Accumulator, stop: bool):
        def hook(_module, args):
            acc.add(args[0].detach())
            if stop:
                raise _StopForward

        return hook

    def run(self, fn, *args, **kwargs) -> None:
        """Call ``fn`` (a block forward) and swallow the early-stop signal."""
        with contextlib.suppress(_StopForward):
            fn(*args, **kwargs)

    def pop_stats(self) -> Iterator[tuple[tuple[str, ...], LayerStats]]:
        """Yield ``(group, stats)`` once per hooked input, freeing each as it is handed out."""
        for group in self.groups:
            acc = self._acc.pop(group[0])
            yield group, acc.stats()


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device`` now (None where it cannot be told)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def hook_count(module: nn.Module) -> int:
    """Forward (pre-)hooks registered on ``module`` and its submodules (0 after any call)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


class ChannelMoments:
    """Per-input-channel count, mean and centered sum of squares of a layer's input (structured
    pruning: FLAP's fluctuation and bias compensation, Wanda-sp's norms).

    Each batch's mean and centered squares are computed in float32 and merged in float64 (Chan
    et al.'s pairwise update), so the variance does not come from E[x²] - E[x]², which cancels
    catastrophically for channels whose mean is large against their spread.
    """

    def __init__(self, in_features: int, device: torch.device):
        self.tokens = 0
        self.mean = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(in_features, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        n = x.shape[0]
        if n == 0:
            return
        mean = x.mean(dim=0)  # (in,)
        m2 = (x - mean).pow(2).sum(dim=0).double()
        total = self.tokens + n
        delta = mean.double() - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2 + delta.pow(2) * (self.tokens * n / total)
        self.tokens = total

    @property
    def var(self) -> torch.Tensor:
        """Population variance over the tokens seen, float32 (in,)."""
        return (self.m2 / max(self.tokens, 1)).float()

    @property
    def sq_norm(self) -> torch.Tensor:
        """Σ x² over the tokens seen, float32 (in,)."""
        return (self.m2 + self.mean.pow(2) * self.tokens).float()


@contextlib.contextmanager
def input_moments(modules: dict[str, nn.Module]) -> Iterator[dict[str, ChannelMoments]]:
    """Hook each module's input for the duration; yields ``{name: ChannelMoments}``."""
    moments = {name: ChannelMoments(m.in_features, m.weight.device) for name, m in modules.items()}
    handles = []
    try:
        for name, module in modules.items():
            acc = moments[name]
            handles.append(module.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0].detach())))
        yield moments
    finally:
        for handle in handles:
            handle.remove()
