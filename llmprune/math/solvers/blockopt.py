"""Block-local re-training of the kept weights: free-lunch reconstruction and Wanda++'s RO.

Both methods keep a mask fixed and move the kept weights of a decoder block (or of one half of
it) by a few first-order steps so that the pruned module reproduces the dense module's outputs
on the calibration windows:

    min over W_kept   L( f(X; M * W), Y )          Y = f_dense(X),  pruned entries (M = 0) stay 0

1. "A Free Lunch in LLM Compression: Revisiting Retraining after Pruning" (Wagner, Roux, Zimmer,
   Pokutta 2025, arXiv:2510.14444; code ZIB-IOL/Free-Lunch-in-LLM-Compression). The block is cut
   in two submodels, the attention half  H = X + Attn(LN1(X))  and the MLP half
   Y = H + MLP(LN2(H)), reconstructed one after the other (attention first). Each half trains
   every parameter it holds (the masked Linear weights and the norm weights) with AdamW
   (weight decay 0), a linear learning-rate schedule with 10% warm-up, mean-squared error, the
   calibration batches in order for a number of epochs. Under the code's defaults the halves see
   the dense model's activations as inputs and the dense model's outputs as targets
   ("propagate_sparse_activations_reconstruct=False"): the MLP half's input is the dense H.
   :func:`reconstruct_halves` runs that, :func:`optimise_kept` each half.
2. Wanda++'s regional optimisation (Yang et al. 2025, arXiv:2503.04992; no official code, the
   paper points to the reproduction TTTTTTris/wandaplus): per block, K rounds of (re-select the
   mask with the RGS score, then RMSprop steps on single random calibration windows, summed
   squared error against the dense block's outputs), then a final mask selection.
   :func:`regional_rounds` runs that with a caller-given mask-selection callable.

Pure tensor math: the caller passes ``forward`` callables (a module with its kwargs bound) and
``(parameter, mask)`` pairs; masks are bool, True = pruned, None = the whole tensor trains.

Differences from the official / reference codes (details in /tmp/specs/lunch.md, ro.md):
- Masks: the free-lunch code re-parametrises W = W_orig * M (torch prune); we zero the pruned
  gradients and re-zero the pruned entries after each step. With AdamW at weight decay 0 both give
  the same iterates (a zero gradient leaves Adam's moments and the entry unchanged).
- The Wanda++ reproduction steps RMSprop after every window without clearing the gradient in
  between (the k-th step uses the sum of k windows' gradients) and updates the pruned entries too
  (the next round's mask selection re-zeroes them); we clear the gradient every step and keep the
  pruned entries at zero, the procedure the paper describes.
- No fp16 autocast / GradScaler (the free-lunch code trains under CUDA autocast): float32 here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from llmprune.errors import LlmpruneError

Forward = Callable[[torch.Tensor], object]
ParamMasks = Sequence[tuple[torch.nn.Parameter, "torch.Tensor | None"]]

OPTIMIZERS = ("adamw", "rmsprop", "sgd")
LOSSES = ("mse", "mse_sum")
SCHEDULES = ("constant", "linear")
ORDERS = ("cycle", "random")


def _first(out: object) -> torch.Tensor:
    """A decoder block may return a tensor or a tuple whose first item is the hidden states."""
    return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[return-value]


def _loss(out: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    diff = (out.float() - target.float()).pow(2)
    return diff.mean() if kind == "mse" else diff.sum()


def lr_factor(schedule: str, step: int, steps: int, warmup: float) -> float:
    """The multiplier of the base learning rate at optimizer step ``step`` (0-based). "linear" is
    transformers' get_linear_schedule_with_warmup with int(warmup * steps) warm-up steps: it
    starts at 0 when there is a warm-up, as the free-lunch code's first step does."""
    if schedule == "constant":
        return 1.0
    warm = int(warmup * steps)
    if step < warm:
        return step / max(1, warm)
    return max(0.0, (steps - step) / max(1, steps - warm))


def _optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adamw":  # the free-lunch code: AdamW, weight decay 0, torch's betas and eps
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "rmsprop":  # Wanda++: torch's RMSprop defaults (alpha 0.99, eps 1e-8)
        return torch.optim.RMSprop(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


@torch.no_grad()
def _apply_masks(pairs: ParamMasks) -> None:
    for p, m in pairs:
        if m is not None:
            p.masked_fill_(m.to(p.device), 0.0)


def _batch_indices(n: int, batch_size: int, steps: int, order: str, gen: torch.Generator):
    """Window indices per step: batches walked through the windows, starting again at the end;
    "cycle" keeps the windows' order (the free-lunch loader), "random" shuffles every pass
    (distinct windows within a pass, as Wanda++'s random.sample of windows per round)."""
    order_now: list[int] = []
    for _ in range(steps):
        if not order_now:
            perm = range(n) if order == "cycle" else torch.randperm(n, generator=gen).tolist()
            order_now = [list(perm)[i:i + batch_size] for i in range(0, n, batch_size)][::-1]
        yield order_now.pop()


@torch.no_grad()
def mean_loss(forward: Forward, inputs: torch.Tensor, targets: torch.Tensor, loss: str = "mse",
              batch_size: int = 1, device: torch.device | None = None) -> float:
    """The loss over all windows (the mean of per-batch "mse", or the total "mse_sum")."""
    total, count = 0.0, 0
    for i in range(0, inputs.shape[0], batch_size):
        x, y = inputs[i:i + batch_size], targets[i:i + batch_size]
        out = _first(forward(x.to(device) if device is not None else x))
        part = _loss(out, y.to(out.device), "mse_sum").item()
        total, count = total + part, count + y.numel()
    return total / max(1, count) if loss == "mse" else total


def _check_args(optimizer: str, loss: str, schedule: str, order: str, steps: int, lr: float) -> None:
    for value, allowed, what in ((optimizer, OPTIMIZERS, "optimizer"), (loss, LOSSES, "loss"),
                                 (schedule, SCHEDULES, "schedule"), (order, ORDERS, "order")):
        if value not in allowed:
            raise LlmpruneError(f"unknown block-reconstruction {what} {value!r}: use one of {allowed}")
    if steps < 0 or not (lr >= 0 and math.isfinite(lr)):
        raise LlmpruneError(f"block reconstruction needs steps >= 0 and a finite lr >= 0 (got {steps}, {lr})")


def optimise_kept(forward: Forward, params_and_masks: ParamMasks, inputs: torch.Tensor,
                  targets: torch.Tensor, *, steps: int, lr: float, optimizer: str = "rmsprop",
                  batch_size: int = 1, loss: str = "mse", schedule: str = "constant", warmup: float = 0.0,
                  order: str = "cycle", seed: int = 0, lr_flag: str = "--lunch-lr",
                  evaluate: bool = True) -> dict:
    """Train the kept entries of ``params_and_masks`` in place so that ``forward(inputs)``
    approaches ``targets`` (both (windows, seq, hidden) on any device; batches move to the first
    parameter's device). Pruned entries are exactly zero on return. Returns a JSON-ready info
    dict (steps, initial/final loss over all windows when ``evaluate``, last batch loss).
    Raises LlmpruneError naming ``lr_flag`` if a loss turns non-finite."""
    _check_args(optimizer, loss, schedule, order, steps, lr)
    params = [p for p, _ in params_and_masks]
    device = params[0].device if params else inputs.device
    _apply_masks(params_and_masks)
    info: dict = {"steps": steps, "optimizer": optimizer, "lr": lr, "batch_size": batch_size, "loss": loss}
    if evaluate:
        info["initial_loss"] = mean_loss(forward, inputs, targets, loss, batch_size, device)
    if steps == 0 or not params:
        info["final_loss"] = info.get("initial_loss")
        return info
    saved = [p.requires_grad for p in params]
    opt = _optimizer(optimizer, params, lr)
    gen = torch.Generator().manual_seed(seed)
    try:
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            last = _run_steps(forward, params_and_masks, opt, inputs, targets, device, steps, lr, schedule,
                              warmup, order, batch_size, loss, gen, lr_flag)
    finally:
        for p, s in zip(params, saved):
            p.requires_grad_(s)
            p.grad = None
    info["last_batch_loss"] = last
    if evaluate:
        info["final_loss"] = mean_loss(forward, inputs, targets, loss, batch_size, device)
    return info


def _run_steps(forward, pairs, opt, inputs, targets, device, steps, lr, schedule, warmup, order,
               batch_size, loss, gen, lr_flag) -> float:
    last = float("nan")
    for k, idx in enumerate(_batch_indices(inputs.shape[0], batch_size, steps, order, gen)):
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(schedule, k, steps, warmup)
        opt.zero_grad(set_to_none=True)
        out = _first(forward(inputs[idx].to(device)))
        value = _loss(out, targets[idx].to(out.device), loss)
        last = value.item()
        if not math.isfinite(last):
            raise LlmpruneError(f"block reconstruction diverged (non-finite loss at step {k}): "
                                f"lower {lr_flag}")
        value.backward()
        for p, m in pairs:  # pruned entries get no update, whatever the optimizer's state
            if m is not None and p.grad is not None:
                p.grad.masked_fill_(m.to(p.device), 0.0)
        opt.step()
        _apply_masks(pairs)
    if not all(bool(torch.isfinite(p).all()) for p, _ in pairs):
        raise LlmpruneError(f"block reconstruction diverged (non-finite weights after {steps} steps): "
                            f"lower {lr_flag}")
    return last


def reconstruct_halves(attn_forward: Forward, attn_params: ParamMasks, mlp_forward: Forward,
                       mlp_params: ParamMasks, inputs: torch.Tensor, mid_targets: torch.Tensor,
                       targets: torch.Tensor, *, propagate: str = "dense", **kwargs) -> dict:
    """Free-lunch reconstruction of one block: the attention half (``attn_forward``: X -> X +
    Attn(LN1 X)) towards ``mid_targets`` (the dense block's H on these inputs), then the MLP half
    (``mlp_forward``: H -> H + MLP(LN2 H)) towards ``targets`` (the dense block's output). The MLP
    half's inputs are ``mid_targets`` ("dense", the official default) or the reconstructed
    attention half's outputs ("sparse"). ``kwargs`` go to :func:`optimise_kept` for both halves."""
    if propagate not in ("dense", "sparse"):
        raise LlmpruneError(f"unknown propagation {propagate!r}: use 'dense' or 'sparse'")
    attn = optimise_kept(attn_forward, attn_params, inputs, mid_targets, **kwargs)
    mlp_inputs = mid_targets
    if propagate == "sparse":
        device = attn_params[0][0].device if attn_params else inputs.device
        with torch.no_grad():
            mlp_inputs = torch.cat([_first(attn_forward(inputs[i:i + 1].to(device))).to(inputs.device)
                                    for i in range(inputs.shape[0])])
    mlp = optimise_kept(mlp_forward, mlp_params, mlp_inputs, targets, **kwargs)
    return {"attention": attn, "mlp": mlp}


def regional_rounds(select_masks: Callable[[], ParamMasks], forward: Forward, inputs: torch.Tensor,
                    targets: torch.Tensor, *, rounds: int = 5, samples: int = 32, lr: float = 3e-7,
                    seed: int = 0, lr_flag: str = "--ro-lr", **kwargs) -> dict:
    """Wanda++'s alternation for one block: ``rounds`` times (``select_masks()`` applies a fresh
    mask to the block's weights and returns the (parameter, mask) pairs; then RMSprop steps on
    ``samples`` single random windows, summed squared error to ``targets``), then a last
    ``select_masks()``. Returns per-round infos and the final pairs' count of pruned entries."""
    infos = []
    for r in range(rounds):
        pairs = select_masks()
        defaults = {"optimizer": "rmsprop", "loss": "mse_sum", "batch_size": 1, "order": "random"}
        infos.append(optimise_kept(forward, pairs, inputs, targets, steps=samples, lr=lr, seed=seed + r,
                                   lr_flag=lr_flag, **{**defaults, **kwargs}))
    pairs = select_masks()
    pruned = sum(int(m.sum()) for _, m in pairs if m is not None)
    return {"rounds": infos, "final_pruned": pruned}
