"""Recovery after pruning that keeps the zeros: masked distillation from the dense model, or LoRA.

One-shot pruning is where users start, not where they stop: a little training on the dense
model's outputs buys back much of what pruning lost (the Wanda repository ships LoRA fine-tuning
of its pruned models; prune → distil → quantize is the usual edge workflow). Both methods train
only the prunable Linears of the pruned model (the student), never undoing its sparsity:

- **kd**, knowledge distillation (Hinton et al., 2015) from the dense teacher, per token::

      L = (1 - alpha) * T^2 * KL( softmax(z_teacher / T) || softmax(z_student / T) )
          + alpha * CE(z_student, next token)

  (T^2 keeps the gradient's scale independent of T). Every weight that was zero gets a zero
  gradient, and the mask is written again after each AdamW step, so a zero stays exactly zero
  and an N:M model stays N:M.
- **lora** (Hu et al., 2021): peft LoRA adapters on the pruned Linears, trained on the same
  loss *through the mask*: the layer computes ``x @ (W + M * (alpha / r) * B @ A)^T`` with
  ``M`` the kept weights, so merging the adapter and re-masking (what is saved) gives exactly
  the model that was trained. (A plain LoRA update, merged and then masked, would lose the part
  that falls on pruned weights.) The base weights never change.

Embeddings, norms and lm_head stay as they were. Training windows are drawn from a calibration
source's train split (``llmprune.data.calibration_windows``) with their own seed. A run can
write a resumable checkpoint every K steps; resuming gives the same weights as an uninterrupted
run (the windows, the optimizer and the schedule are restored exactly; nothing else is random).

``llmprune.recover(...)`` is :func:`recover` (this module is callable as it):

Example::

    >>> import llmprune
    >>> teacher, tok = llmprune.load_model("smollm2-135m")
    >>> student, _ = llmprune.load_model("smollm2-wanda")  # a checkpoint prune_model saved
    >>> report = llmprune.recover(student, teacher, tok, llmprune.RecoverConfig(steps=20, seqlen=256),
    ...                           data_dir="../shared/data")
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import pickle
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.blocks import input_device
from llmprune.config import EvalConfig, PruneConfig, RecoverConfig, from_dict, to_dict
from llmprune.data import calibration_windows, check_available
from llmprune.errors import LlmpruneError
from llmprune.evaluation import evaluate
from llmprune.io import check_input_file, save_pruned
from llmprune.models import get_blocks, prunable_linears
from llmprune.progress import progress as progress_bar

if TYPE_CHECKING:  # annotations only
    from transformers import PreTrainedTokenizerBase

STATE_FILE = "recover_state.pt"  # optimizer, schedule, step and trained tensors, beside the weights
PEFT_INSTALL = "pip install 'llmprune[recover]'  (or: pip install peft)"
_ADAPTER = "default"
# settings that do not change the trained weights: a run may resume with other values
_NOT_FINGERPRINTED = ("checkpoint_every", "eval_every", "max_minutes",
                      "max_cpu_minutes", "gradient_checkpointing")


class RecoverWarning(UserWarning):
    """Something the user should know that does not stop the run (a student with no zeros)."""


# ---------------------------------------------------------------------------------------------
# the loss (pure)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor,
                 temperature: float = 1.0, alpha: float = 0.0) -> torch.Tensor:
    """``(1 - alpha) * T^2 * KL(teacher || student) + alpha * next-token CE``, mean over tokens.

    logits (B, L, V), input_ids (B, L). The KL is taken at every position (the teacher's
    distribution is defined at the last one too), the cross-entropy at the L - 1 with a next token.
    """
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).reshape(-1, vocab)  # (B*L, V)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).reshape(-1, vocab)
    # sum over V, mean over tokens
    kl = F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2
    if alpha == 0:
        return kl
    ce = F.cross_entropy(student_logits[:, :-1].float().reshape(-1, vocab), input_ids[:, 1:].reshape(-1))
    return (1 - alpha) * kl + alpha * ce


def lr_factor(config: RecoverConfig, step: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.lr_schedule == "linear":
        return max(0.0, (config.steps - step) / max(1, config.steps - config.warmup_steps))
    return 1.0


def gap_closed(dense: float | None, before: float | None, after: float | None) -> float | None:
    """The fraction of the pruned-to-dense perplexity gap that recovery closed (None if unknown)."""
    if dense is None or before is None or after is None or before == dense:
        return None
    return (before - after) / (before - dense)


# ---------------------------------------------------------------------------------------------
# the student's trainable weights and their masks


def _prunable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter, bool]]:
    """``(name, parameter, is_weight)`` of every prunable layer's weight and bias, once each."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen, out = set(), []
    for i in range(len(get_blocks(model))):
        for layer in prunable_linears(model, i).values():
            if isinstance(layer, nn.Linear):
                pairs = [(layer.weight, True), (layer.bias, False)]
            else:  # a WeightView (Conv1D, experts): the parameter it views, whole
                pairs = [(getattr(layer.module, layer.param), True),
                         (getattr(layer.module, f"{layer.param}_bias" if layer.fused is not None else "bias",
                                  None), False)]
            for param, is_weight in pairs:
                if isinstance(param, nn.Parameter) and id(param) not in seen:
                    seen.add(id(param))
                    out.append((names[id(param)], param, is_weight))
    return out


def sparsity_counts(model: nn.Module) -> tuple[int, int]:
    """``(zeros, weights)`` over the prunable layers' weights, counted from the weights."""
    zeros = total = 0
    for _, param, is_weight in _prunable_parameters(model):
        if is_weight:
            zeros += int((param.detach() == 0).sum())
            total += param.numel()
    return zeros, total


class _Student:
    """What training needs from a method: the tensors it trains (``named``), masking after the
    backward pass and after the step, the state a checkpoint keeps, and the end of training
    (``finish``) or its failure (``abort``); both give back the model's requires_grad flags."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self.named: list[tuple[str, nn.Parameter]] = []

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for _, p in self.named]

    def mask_grads(self) -> None:
        pass

    def mask_weights(self) -> None:
        pass

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in self.named}

    @torch.no_grad()
    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        for n, p in self.named:
            p.copy_(state[n])

    def save_state_dict(self) -> dict | None:
        """The state dict a checkpoint saves; None: the model's own."""
        return None

    def finish(self) -> None:
        self._restore_flags()

    def abort(self) -> None:
        self._restore_flags()

    def _restore_flags(self) -> None:
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.flags.get(n, p.requires_grad))


class _MaskedWeights(_Student):
    """kd: the prunable weights themselves are trained; pruned entries get no gradient and are
    zeroed again after each step."""

    def __init__(self, model: nn.Module, config: RecoverConfig):
        super().__init__(model)
        for p in model.parameters():
            p.requires_grad_(False)
        params = _prunable_parameters(model)
        self.named = [(n, p) for n, p, _ in params]
        # biases are never pruned
        self.pruned = {n: p.detach() == 0 for n, p, is_weight in params if is_weight}
        for _, p in self.named:
            p.requires_grad_(True)

    def mask_grads(self) -> None:
        for n, p in self.named:
            if n in self.pruned and p.grad is not None:
                p.grad.masked_fill_(self.pruned[n], 0.0)

    @torch.no_grad()
    def mask_weights(self) -> None:
        for n, p in self.named:
            if n in self.pruned:
                p.masked_fill_(self.pruned[n], 0.0)


def _masked_lora_forward(layer, pruned: torch.Tensor, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A peft LoRA Linear's forward with its update restricted to the kept weights."""
    base = layer.get_base_layer()
    delta = layer.get_delta_weight(_ADAPTER).masked_fill(pruned, 0.0)  # (out, in)
    return F.linear(x, base.weight + delta, base.bias)


class _MaskedLora(_Student):
    """lora: peft adapters on the pruned Linears, their update masked (so the pruned entries get
    nothing to learn and the frozen base weights need no masking); merged at the end."""

    def __init__(self, model: nn.Module, config: RecoverConfig):
        peft = require_peft()
        super().__init__(model)
        self.targets = lora_targets(model, config.lora_targets)
        lora_config = peft.LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                      bias="none", target_modules=list(self.targets))
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # peft's, not ours
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            torch.manual_seed(config.seed)  # A's initialisation
            self.peft_model = peft.get_peft_model(model, lora_config)
        modules = dict(model.named_modules())
        self.pruned = {}
        for name in self.targets:
            layer = modules[name]
            self.pruned[name] = layer.get_base_layer().weight.detach() == 0
            layer.forward = functools.partial(_masked_lora_forward, layer, self.pruned[name])
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def save_state_dict(self) -> dict:
        """The plain state dict of the model as it would be merged now (checkpoints mid-run)."""
        modules = dict(self.model.named_modules())
        out = {k.replace(".base_layer.", "."): v for k, v in self.model.state_dict().items()
               if ".lora_" not in k}
        for name in self.targets:
            layer = modules[name]
            delta = layer.get_delta_weight(_ADAPTER).masked_fill(self.pruned[name], 0.0)
            out[f"{name}.weight"] = layer.get_base_layer().weight + delta
        return out

    @torch.no_grad()
    def finish(self) -> None:
        self.peft_model.merge_and_unload()  # W + (alpha / r) B @ A, in place: the Linears are back
        modules = dict(self.model.named_modules())
        for name in self.targets:
            modules[name].weight.masked_fill_(self.pruned[name], 0.0)
        self._restore_flags()

    def abort(self) -> None:
        self.peft_model.unload()  # the adapters go, the pruned weights were never touched
        self._restore_flags()


def require_peft():
    """The peft module, or a one-line error saying how to install it."""
    try:
        import peft
    except ImportError:
        raise LlmpruneError(f"recovery method lora needs the peft package: {PEFT_INSTALL}") from None
    return peft


def lora_targets(model: nn.Module, suffixes: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Module paths of the pruned ``nn.Linear`` layers LoRA goes on: those with zeros whose name
    ends with one of ``suffixes`` (all of them when empty)."""
    paths = {id(m): n for n, m in model.named_modules()}
    linears = [(paths[id(layer)], layer) for i in range(len(get_blocks(model)))
               for layer in prunable_linears(model, i).values() if isinstance(layer, nn.Linear)]
    for suffix in suffixes:
        if not any(path == suffix or path.endswith("." + suffix) for path, _ in linears):
            example = linears[0][0].rsplit(".", 1)[-1] if linears else "q_proj"
            raise LlmpruneError(f"LoRA target {suffix!r} matches no prunable Linear: give name endings such "
                                f"as {example!r}")
    chosen = tuple(path for path, layer in linears
                   if (not suffixes or any(path == s or path.endswith("." + s) for s in suffixes))
                   and bool((layer.weight == 0).any()))
    if not chosen:
        raise LlmpruneError("no pruned Linear layer for LoRA: the chosen layers have no zeros (use --method "
                            "kd, or other --lora-targets)")
    return chosen


# ---------------------------------------------------------------------------------------------
# checks that need no training


def check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """The teacher must be the student's dense original: same vocabulary, family and width of the
    residual stream; structured and depth pruning leave the student with fewer blocks, MLP
    channels or heads, never more."""
    def vocab(model):
        return int(model.get_output_embeddings().weight.shape[0])

    if vocab(student) != vocab(teacher):
        raise LlmpruneError(f"the teacher's vocabulary has {vocab(teacher)} tokens and the student's "
                            f"{vocab(student)}: distillation compares their logits token by token, so give "
                            "the dense model the student was pruned from as --teacher")
    s, t = student.config, teacher.config
    for key, same in (("model_type", True), ("hidden_size", True), ("num_hidden_layers", False),
                      ("intermediate_size", False), ("num_attention_heads", False)):
        mine, theirs = getattr(s, key, None), getattr(t, key, None)
        smaller = isinstance(mine, int) and isinstance(theirs, int) and mine < theirs
        if mine != theirs and (same or not smaller):
            raise LlmpruneError(f"the teacher's architecture differs from the student's ({key} "
                                f"{theirs} vs {mine}): give the dense model the student was pruned from as "
                                "--teacher")


def pruning_record(model_path: str) -> dict | None:
    """The ``llmprune.json`` a pruned checkpoint folder carries (its result record), if any."""
    try:
        record = json.loads((Path(model_path).expanduser() / "llmprune.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def pruning_config(record: dict | None):
    """The PruneConfig of a pruned checkpoint's record; None when absent or unreadable."""
    config = (record or {}).get("config")
    if not isinstance(config, dict):
        return None
    try:
        return from_dict(PruneConfig, config, "config")
    except LlmpruneError:
        return None


def check_inputs(config: RecoverConfig, data_dir=None, eval_datasets: tuple[str, ...] = (),
                 pruned_with=None) -> None:
    """Before any model loads: the training data (train split, never an evaluation file), peft
    for lora, and a seed apart from the pruning calibration's (``pruned_with``: a PruneConfig)."""
    if config.method == "lora":
        require_peft()
    check_input_file(config.data, "--data")
    check_available(config.data, data_dir, split="calibration")
    data_path = Path(config.data).expanduser()
    for name in eval_datasets:
        if data_path.is_file() and Path(name).expanduser().resolve() == data_path.resolve():
            raise LlmpruneError(f"the training data {config.data} is also an evaluation dataset: train on "
                                "other text (a named dataset trains on its train split)")
    calib = getattr(pruned_with, "calib", None)
    if calib is not None and calib.dataset == config.data and calib.seed == config.seed:
        raise LlmpruneError(f"seed {config.seed} on {config.data} draws the pruning calibration's own "
                            f"windows: give recovery another --seed (e.g. {config.seed + 1})")


def fingerprint(config: RecoverConfig) -> dict:
    """The settings a resumed run must share with the run that wrote the checkpoint."""
    return {k: v for k, v in to_dict(config).items() if k not in _NOT_FINGERPRINTED}


def check_resume(folder: str | Path, config: RecoverConfig) -> dict:
    """The recovery section of the unfinished checkpoint in ``folder``, checked against ``config``."""
    folder = Path(folder).expanduser()
    record = pruning_record(str(folder))
    section = (record or {}).get("recover")
    if not isinstance(section, dict) or not (folder / STATE_FILE).is_file():
        if isinstance(section, dict) and section.get("complete"):
            raise LlmpruneError(f"{folder} holds a finished recovery ({section.get('steps_done')} steps): "
                                "nothing to resume; --save elsewhere to train again")
        raise LlmpruneError(f"{folder} holds no recovery checkpoint to resume (was the run stopped before "
                            "its first checkpoint?): run again without --resume")
    stored = section.get("fingerprint") or {}
    wanted = json.loads(json.dumps(fingerprint(config)))
    for key in sorted(set(stored) | set(wanted)):
        if stored.get(key) != wanted.get(key):
            raise LlmpruneError(f"the checkpoint in {folder} was made with {key} = {stored.get(key)!r}, "
                                f"this run has {wanted.get(key)!r}: resume with the same settings, or "
                                "--save elsewhere")
    return section


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class RecoverReport:
    """What a recovery run did; ``zeros_after`` is counted from the weights after it."""

    config: dict
    steps_done: int = 0
    tokens: int = 0
    seconds: float = 0.0  # training wall time (evaluations and checkpoints excluded)
    cpu_seconds: float = 0.0  # process CPU time of the same
    zeros_before: int = 0
    zeros_after: int | None = None
    weights: int = 0
    losses: list[float] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)  # {step, tokens, seconds, cpu_seconds, perplexity}
    perplexity_before: dict = field(default_factory=dict)
    zeroshot_before: dict | None = None
    stopped: str = "steps"  # or "max_minutes", "max_cpu_minutes"
    resumed_at: list[int] = field(default_factory=list)

    @property
    def sparsity_before(self) -> float:
        return self.zeros_before / self.weights if self.weights else 0.0

    @property
    def sparsity_after(self) -> float | None:
        if self.zeros_after is None:
            return None
        return self.zeros_after / self.weights if self.weights else 0.0

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(sparsity_before=self.sparsity_before, sparsity_after=self.sparsity_after,
                   tokens_per_s=self.tokens / self.seconds if self.seconds else None)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RecoverReport":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _evaluate(model, tokenizer, eval_config, data_dir, progress: bool,
              full: bool) -> tuple[dict, dict | None]:
    """Perplexities (and, when ``full``, zero-shot accuracies) of the model as it is now."""
    was_training = model.training
    model.eval()
    try:
        evaluation = eval_config if full else dataclasses.replace(eval_config, zeroshot=())
        result = evaluate(model, tokenizer, evaluation, data_dir, progress)
        ppl, zs = result.perplexity, result.zeroshot
    finally:
        model.train(was_training)
    return {k: v.to_dict() for k, v in ppl.items()}, (zs.to_dict() if zs is not None else None)


def recover(model: nn.Module, teacher: nn.Module, tokenizer: PreTrainedTokenizerBase, config: RecoverConfig,
            data_dir: str | os.PathLike | None = None, progress: bool = True,
            eval_config: EvalConfig | None = None, checkpoint_dir: str | os.PathLike | None = None,
            resume: bool = False, metadata: dict | None = None,
            callback: Callable[[int, RecoverReport], None] | None = None) -> RecoverReport:
    """Train the pruned ``model`` in place towards the dense ``teacher``; its zeros stay zero.

    ``config`` (a :class:`llmprune.RecoverConfig`): kd (masked distillation) or lora, the steps,
    the learning rate, the training data (``config.data``, read from ``data_dir``). ``eval_config``
    (an EvalConfig): evaluate before training, every ``config.eval_every`` steps (perplexity
    only) and after (the report's ``curve``; before and after also run its zero-shot tasks).
    ``checkpoint_dir``: every ``config.checkpoint_every`` steps and at the end of training, a
    loadable sparse checkpoint (as merged now) plus ``recover_state.pt`` is written there through
    :func:`llmprune.save_pruned`, so an interruption leaves the last complete one; ``resume``
    continues from it. The finished model is not saved here: save it with ``save_pruned`` (as
    ``llmprune recover --save`` does), which replaces the last checkpoint. ``metadata`` goes into
    each checkpoint's ``llmprune.json``. ``callback(step, report)`` runs after every step.

    Example::

        >>> import llmprune
        >>> teacher, tok = llmprune.load_model("smollm2-135m")
        >>> student, _ = llmprune.load_model("smollm2-wanda")  # a checkpoint prune_model saved
        >>> report = llmprune.recover(student, teacher, tok, llmprune.RecoverConfig(steps=20, seqlen=256),
        ...                           data_dir="../shared/data")
        >>> report.sparsity_after == report.sparsity_before
        True
    """
    return _recover(model, teacher, tokenizer, config, data_dir, progress, eval_config, checkpoint_dir,
                    resume, metadata, callback)


def _recover(model, teacher, tokenizer, config: RecoverConfig, data_dir, progress: bool, eval_config,
             checkpoint_dir, resume: bool, metadata, callback) -> RecoverReport:
    check_teacher(model, teacher)
    if resume and checkpoint_dir is None:
        raise LlmpruneError("resume needs the checkpoint folder (--save) of the interrupted run")
    section = check_resume(checkpoint_dir, config) if resume else None
    zeros, total = sparsity_counts(model)
    if zeros == 0:
        warnings.warn("the model has no zero weights, so there is no sparsity to keep: recovery trains it "
                      "as a dense model", RecoverWarning, stacklevel=2)
    windows = calibration_windows(config.data, tokenizer, config.steps * config.batch_size, config.seqlen,
                                  config.seed, data_dir)  # (steps * batch, seqlen)
    report = RecoverReport(config=to_dict(config), zeros_before=zeros, weights=total)
    state = None
    if section is not None:
        state = _resume_state(checkpoint_dir, zeros)
        report = RecoverReport.from_dict(state["report"])
        report.resumed_at.append(report.steps_done)

    student = _MaskedLora(model, config) if config.method == "lora" else _MaskedWeights(model, config)
    finished = False
    try:
        optimizer = torch.optim.AdamW(student.trainable, lr=config.effective_lr,
                                      weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, config))
        if state is not None:
            student.load_trained_state(state["trained"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        elif eval_config is not None:
            report.perplexity_before, report.zeroshot_before = _evaluate(model, tokenizer, eval_config,
                                                                         data_dir, progress, full=True)
            report.curve.append(_point(report, report.perplexity_before))
        _train(model, teacher, student, optimizer, scheduler, windows, config, report, tokenizer, data_dir,
               progress, eval_config, checkpoint_dir, metadata, callback)
        student.finish()
        finished = True
    finally:
        if not finished:
            student.abort()
    model.eval()
    report.zeros_after = sparsity_counts(model)[0]
    if eval_config is not None:
        ppl, zs = _evaluate(model, tokenizer, eval_config, data_dir, progress, full=True)
        report.curve.append(_point(report, ppl) | {"zeroshot": zs})
    return report


_STATE_KEYS = ("report", "zeros_before", "trained", "optimizer", "scheduler")


def _resume_state(checkpoint_dir, zeros: int) -> dict:
    """The training state of the interrupted run in ``checkpoint_dir``; it must have started from a
    model with the same ``zeros``."""
    state = _load_state(Path(checkpoint_dir) / STATE_FILE)
    if state["zeros_before"] != zeros:
        raise LlmpruneError(f"the checkpoint in {checkpoint_dir} was trained from a model with "
                            f"{state['zeros_before']} zero weights, this --model has {zeros}: resume from "
                            "the same pruned model")
    return state


def _load_state(path: Path) -> dict:
    """The training state a checkpoint of ours holds. Read with ``weights_only`` (tensors and plain
    containers only, never code); anything else, damaged or planted, is a user error in one line."""
    fix = "delete the folder's checkpoint and run again without --resume"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's text would suggest weights_only=False: the one thing not to do
        raise LlmpruneError(f"{path} is not a recovery state llmprune wrote: it holds objects other than "
                            f"tensors and plain values (refused, nothing in it ran); {fix}") from None
    except Exception as exc:  # noqa: BLE001 - RuntimeError, EOFError...: damaged or truncated
        first = " ".join((str(exc).strip().splitlines() or [""])[0].split())[:200]
        raise LlmpruneError(f"{path} is not a recovery state llmprune wrote ({type(exc).__name__}: {first}); "
                            f"{fix}") from None
    missing = [key for key in _STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise LlmpruneError(f"{path} is not a recovery state llmprune wrote (no {missing[0]!r}); {fix}")
    return state


def _point(report: RecoverReport, perplexity: dict) -> dict:
    return {"step": report.steps_done, "tokens": report.tokens, "seconds": report.seconds,
            "cpu_seconds": report.cpu_seconds, "perplexity": perplexity}


def _budget_spent(config, report) -> str | None:
    """The time budget (``max_minutes``, ``max_cpu_minutes``) the run has used up, if any."""
    spent = [(config.max_minutes, report.seconds, "max_minutes"),
             (config.max_cpu_minutes, report.cpu_seconds, "max_cpu_minutes")]
    over = [name for budget, seconds, name in spent if budget is not None and seconds >= budget * 60]
    return over[0] if over else None


def _train_step(model, teacher, student, optimizer, scheduler, ids, config, device, teacher_device) -> float:
    """One masked distillation step on the windows ``ids`` (B, L); returns the loss."""
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids.to(teacher_device), use_cache=False).logits
    logits = model(input_ids=ids.to(device), use_cache=False).logits  # (B, L, V)
    loss = distill_loss(logits, teacher_logits.to(logits.device), ids.to(logits.device),
                        config.temperature, config.alpha)
    del teacher_logits, logits
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    student.mask_grads()
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(student.trainable, config.grad_clip)
    optimizer.step()
    scheduler.step()
    student.mask_weights()
    return float(loss.detach())


def _train(model, teacher, student, optimizer, scheduler, windows, config, report, tokenizer, data_dir,
           progress, eval_config, checkpoint_dir, metadata, callback) -> None:
    device, teacher_device = input_device(model), input_device(teacher)
    teacher.eval()
    model.train()
    checkpointing = config.gradient_checkpointing
    if checkpointing:  # non-reentrant: the frozen embeddings give the blocks inputs without grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    bar = progress_bar(config.steps, f"recover {config.method}", "step", disable=not progress,
                       initial=report.steps_done)
    try:
        for step in range(report.steps_done, config.steps):
            over = _budget_spent(config, report)
            if over:
                report.stopped = over
                break
            wall, cpu = time.perf_counter(), time.process_time()
            ids = windows[step * config.batch_size:(step + 1) * config.batch_size]  # (B, L)
            value = _train_step(model, teacher, student, optimizer, scheduler, ids, config, device,
                                teacher_device)
            if not math.isfinite(value):
                raise LlmpruneError(f"the recovery loss became {value} at step {step + 1}: lower the "
                                    f"learning rate (--lr, now {config.effective_lr:g})")
            report.steps_done = step + 1
            report.tokens += ids.numel()
            report.seconds += time.perf_counter() - wall
            report.cpu_seconds += time.process_time() - cpu
            report.losses.append(value)
            bar.update(1)
            bar.set_postfix_str(f"loss={value:.4f}, tok_s={report.tokens / max(report.seconds, 1e-9):.0f}")
            last = report.steps_done == config.steps
            if eval_config is not None and config.eval_every and report.steps_done % config.eval_every == 0 \
                    and not last:
                ppl = _evaluate(model, tokenizer, eval_config, data_dir, False, False)[0]
                report.curve.append(_point(report, ppl))
            every = config.checkpoint_every and report.steps_done % config.checkpoint_every == 0
            if checkpoint_dir is not None and (last or every):
                _save_checkpoint(model, tokenizer, student, optimizer, scheduler, config, report,
                                 checkpoint_dir, metadata)
            if callback is not None:
                callback(report.steps_done, report)
        else:
            return
        if checkpoint_dir is not None:  # stopped early by the time budget: keep where it stopped
            _save_checkpoint(model, tokenizer, student, optimizer, scheduler, config,
                             report, checkpoint_dir, metadata)
    finally:
        bar.close()
        if checkpointing:
            model.gradient_checkpointing_disable()


def _save_checkpoint(model, tokenizer, student, optimizer, scheduler,
                     config, report, folder, metadata) -> None:
    state = {"report": report.to_dict(), "zeros_before": report.zeros_before,
             "trained": student.trained_state(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict()}
    state_dict = student.save_state_dict()

    def write(model, tmp: Path) -> None:
        # save_pretrained may drop tied keys from the dict it is given: hand it a copy
        model.save_pretrained(tmp, safe_serialization=True,
                              state_dict=None if state_dict is None else dict(state_dict))
        torch.save(state, tmp / STATE_FILE)

    section = {"complete": False, "steps_done": report.steps_done, "steps": config.steps,
               "fingerprint": fingerprint(config)}
    save_pruned(model, tokenizer, folder, {**(metadata or {}), "recover": section}, overwrite=True,
                write_weights=write)


class _CallableModule(types.ModuleType):
    """``llmprune.recover(...)`` is the function even after ``import llmprune.recover`` has
    bound the package attribute of that name to this module."""

    def __call__(self, *args, **kwargs) -> RecoverReport:
        return recover(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
sys.modules[__name__].__signature__ = inspect.signature(recover)  # help() and inspect see recover's

__all__ = ["recover", "RecoverReport", "RecoverWarning", "distill_loss", "lr_factor", "gap_closed",
           "sparsity_counts", "check_teacher", "check_inputs", "check_resume", "fingerprint", "lora_targets",
           "pruning_record", "pruning_config", "require_peft", "STATE_FILE"]
