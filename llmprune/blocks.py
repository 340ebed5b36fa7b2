"""A decoder block as the engine runs it: where it computes, what block 0 receives, what a block returns.

:func:`capture_block_inputs` runs the model up to the first decoder block and stops there,
keeping the block's hidden-state input and every other argument the installed transformers
passes to it (attention mask, position ids, rotary ``position_embeddings``, cache position...).
Whatever the version passes, we pass back unchanged.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
from torch import nn


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; the caller suppresses it."""


def first_param_device(module: nn.Module) -> torch.device:
    hook = getattr(module, "_hf_hook", None)  # accelerate: parameters may be offloaded (meta)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def block_device(block: nn.Module) -> torch.device:
    """The device a block computes on (accelerate's execution device when it has one)."""
    return first_param_device(block)


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the input embeddings' device (first shard under device_map)."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None:
        return weight.device
    return next(model.parameters()).device


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
        raise StopForward

    embed = model.get_input_embeddings()
    in_device = first_param_device(embed)
    nsamples, seqlen = windows.shape
    hidden_all: torch.Tensor | None = None
    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        # the first window alone, so the captured kwargs have batch dimension one
        starts = [0] + list(range(1, nsamples, batch_size))
        for start in starts:
            stop = 1 if start == 0 else min(start + batch_size, nsamples)
            ids = windows[start:stop].to(in_device)
            with contextlib.suppress(StopForward):
                model(input_ids=ids, use_cache=False)
            hidden = captured.pop("hidden")
            if hidden_all is None:
                device = torch.device(store_device) if store_device is not None else hidden.device
                hidden_all = torch.empty((nsamples, seqlen, hidden.shape[-1]),
                                         dtype=hidden.dtype, device=device)
            hidden_all[start:stop] = hidden.to(hidden_all.device)
    finally:
        handle.remove()
    return BlockInputs(hidden=hidden_all, kwargs=captured["kwargs"])


def block_output(out) -> torch.Tensor:
    """A decoder block returns a tensor (transformers 5) or a tuple whose first item it is."""
    return out[0] if isinstance(out, (tuple, list)) else out


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




# ---------------------------------------------------------------------------------------------
# the two halves of a pre-norm block, for the block reconstructions

MLP_NORMS = ("post_attention_layernorm", "ln_2", "post_layernorm")  # LLaMA/Qwen/Mistral, GPT-2, ...


class BlockHalves:
    """A pre-norm decoder block as two functions of the residual stream: the attention half
    X -> H = X + Attn(LN1 X) (the block run until its MLP norm's input, which is H) and the MLP
    half H -> H + MLP(LN2 H). Found by name and then checked numerically on real inputs
    (:meth:`split_exactly`): a family whose block is not this shape (parallel attention and MLP,
    extra norms around the MLP) is reconstructed as one whole block instead."""

    def __init__(self, block: nn.Module, kwargs: dict):
        self.block, self.kwargs = block, kwargs
        norms = [getattr(block, n) for n in MLP_NORMS if isinstance(getattr(block, n, None), nn.Module)]
        self.norm = norms[0] if norms else None
        self.mlp = getattr(block, "mlp", None)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """H for the windows ``x`` (windows, seq, hidden): the input the MLP norm receives."""
        seen: dict = {}

        def stop(_module, args):
            seen["h"] = args[0]
            raise StopForward

        handle = self.norm.register_forward_pre_hook(stop)
        try:
            self.block(x, **self.kwargs)
        except StopForward:
            pass
        finally:
            handle.remove()
        return seen["h"]

    def mlp_half(self, h: torch.Tensor) -> torch.Tensor:
        return h + block_output(self.mlp(self.norm(h)))

    def split_exactly(self, x: torch.Tensor) -> bool:
        """Whether the two halves give the block's own output on ``x`` (one window suffices)."""
        if self.norm is None or self.mlp is None:
            return False
        with torch.no_grad():
            whole = block_output(self.block(x, **self.kwargs)).float()
            halves = self.mlp_half(self.attention(x)).float()
        scale = whole.abs().max().clamp_min(1e-6)
        return bool(((whole - halves).abs().max() <= 1e-4 * scale).item())

    def parameters(self, part: str) -> list[nn.Parameter]:
        """The parameters the ``part`` ("attention" or "mlp") half computes with."""
        mlp = {id(p) for p in list(self.mlp.parameters()) + list(self.norm.parameters())}
        return [p for p in self.block.parameters() if (id(p) in mlp) == (part == "mlp")]
