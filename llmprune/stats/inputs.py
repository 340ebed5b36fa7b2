"""Statistics of each prunable layer's input, collected by forward hooks on the block's dense weights.

Each registered ``layer_input`` collector (``norms``, ``hessian``, ``moments``; a plugin may add
its own) contributes a part to one :class:`Accumulator` per shared input: Linear layers that read
the same tensor (q/k/v, gate/up) share one accumulator, so each statistic is computed once per
input. Everything accumulates in float32.

norms    Σ_t x_tj² per input channel (Wanda's ||X_j||² over all calibration tokens)
hessian  Σ_t x_t x_tᵀ, handed out as SparseGPT's H = 2 XᵀX / n
moments  per-window token sums and population variances (DSnoT)
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from llmprune.blocks import StopForward
from llmprune.registry import COLLECTORS, CollectorSpec
from llmprune.stats.layer import LayerStats


class NormsPart:
    """Σ x² per input channel."""

    def __init__(self, in_features: int, device: torch.device):
        self.sq_norm = torch.zeros(in_features, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor, raw: torch.Tensor) -> None:  # x (tokens, in) float32
        self.sq_norm += x.pow(2).sum(dim=0)

    def finish(self, tokens: int) -> dict:
        return {"sq_norm": self.sq_norm}


class HessianPart:
    """Σ x xᵀ, handed out as 2 XᵀX / n (the buffer is reused)."""

    def __init__(self, in_features: int, device: torch.device):
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor, raw: torch.Tensor) -> None:
        self.xtx.addmm_(x.t(), x)

    def finish(self, tokens: int) -> dict:
        hessian = self.xtx.mul_(2.0 / max(tokens, 1))  # 2 XᵀX / n
        self.xtx = None
        return {"hessian": hessian}


class MomentsPart:
    """DSnoT: per-window sums and population variances of each input channel."""

    def __init__(self, in_features: int, device: torch.device):
        self.x_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.var_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.windows = 0

    def add(self, x: torch.Tensor, raw: torch.Tensor) -> None:
        # (windows, tokens, in)
        xw = raw.reshape(raw.shape[0] if raw.dim() == 3 else 1, -1, raw.shape[-1]).float()
        self.x_sum += xw.sum(dim=(0, 1))
        # two-pass population variance over the tokens: as exact as torch.var and about 5x
        # faster on a CPU, where torch.var over the middle dimension is a strided reduction
        self.var_sum += (xw - xw.mean(dim=1, keepdim=True)).square_().mean(dim=1).sum(dim=0)
        self.windows += xw.shape[0]

    def finish(self, tokens: int) -> dict:
        return {"x_sum": self.x_sum, "var_sum": self.var_sum, "windows": self.windows}


for _spec in (
    CollectorSpec("norms", "squared L2 norm of each input channel over the calibration tokens", "layer_input",
                  NormsPart, memory=lambda n, *_: 4 * n),
    CollectorSpec("hessian", "2 XᵀX / n of the layer's input (SparseGPT, reconstruction)", "layer_input",
                  HessianPart, memory=lambda n, *_: 4 * n * n),
    CollectorSpec("moments", "per-window sums and variances of each input channel (DSnoT)", "layer_input",
                  MomentsPart, memory=lambda n, *_: 8 * n),
):
    COLLECTORS.add(_spec)


class Accumulator:
    """Running float32 statistics over the rows of one layer input: the token count and one part
    per collector asked for (their order does not matter: each part only reads ``x``)."""

    def __init__(self, in_features: int, device: torch.device, names):
        self.tokens = 0
        self.parts = {name: COLLECTORS.get(name).factory(in_features, device) for name in names}

    def add(self, x: torch.Tensor) -> None:
        raw = x
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in_features)
        self.tokens += x.shape[0]
        for part in self.parts.values():
            part.add(x, raw)

    def stats(self) -> LayerStats:
        values: dict = {}
        extra: dict = {}
        for _name, part in self.parts.items():
            for key, value in part.finish(self.tokens).items():
                (values if key in LayerStats.FIELDS else extra)[key] = value
        return LayerStats(tokens=self.tokens, extra=extra, **values)


class _RoutedInputs:
    """One pre-hook on a fused-experts module: each expert's accumulators get only the rows
    routed to it (its first projection the rows themselves, its second projection what the
    first makes of them, computed by the layout's ``hidden``)."""

    def __init__(self, fused):
        self.fused = fused
        self.first: dict[int, Accumulator] = {}
        self.second: dict[int, Accumulator] = {}
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
            raise StopForward


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

    ``needs``: the ``layer_input`` collectors to run for every group; ``only``: for some of them,
    the lead names of the groups that need them (DSnoT's moments: the layers it skips never read them).
    """

    def __init__(
        self,
        layers: dict[str, nn.Linear],
        groups: list[tuple[str, ...]],
        needs=("norms",),
        stop_early: bool = False,
        only: dict[str, frozenset[str]] | None = None,
    ):
        missing = [name for group in groups for name in group if name not in layers]
        if missing or not all(groups):
            raise ValueError(f"groups must be non-empty and name only hooked layers; not hooked: {missing}")
        self.layers = layers
        self.groups = [tuple(g) for g in groups]
        self.needs = tuple(needs)
        self.only = dict(only or {})
        self.stop_early = stop_early
        self._acc: dict[str, Accumulator] = {}
        self._handles: list = []

    def __enter__(self) -> "StatsCollector":
        try:
            last = self.groups[-1][0] if self.groups else None
            routed: dict[int, tuple[nn.Module, _RoutedInputs]] = {}
            for group in self.groups:
                lead = group[0]
                layer = self.layers[lead]
                names = [n for n in self.needs if n not in self.only or lead in self.only[n]]
                acc = Accumulator(layer.in_features, layer.weight.device, names)
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
    def _make_hook(acc: Accumulator, stop: bool):
        def hook(_module, args):
            acc.add(args[0].detach())
            if stop:
                raise StopForward

        return hook

    def run(self, fn, *args, **kwargs) -> None:
        """Call ``fn`` (a block forward) and swallow the early-stop signal."""
        with contextlib.suppress(StopForward):
            fn(*args, **kwargs)

    def pop_stats(self) -> Iterator[tuple[tuple[str, ...], LayerStats]]:
        """Yield ``(group, stats)`` once per hooked input, freeing each as it is handed out."""
        for group in self.groups:
            acc = self._acc.pop(group[0])
            yield group, acc.stats()


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
            handles.append(module.register_forward_pre_hook(lambda _m, args, acc=acc:
                                                            acc.add(args[0].detach())))
        yield moments
    finally:
        for handle in handles:
            handle.remove()


COLLECTORS.add(CollectorSpec("channel", "per-channel mean and variance of the inputs of o_proj and down_proj "
                                        "(shrink methods)", "channel", ChannelMoments,
                             memory=lambda n, *_: 16 * n))
