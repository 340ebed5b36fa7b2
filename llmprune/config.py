"""Frozen configuration: the one source of defaults.

CLI flags and YAML recipe keys map onto the same fields. ``from_dict`` rejects unknown keys by
name, and every value is validated once here, so the rest of the library can trust its config.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from llmprune.errors import LlmpruneError

GROUPS = ("row", "column", "layer")
METRICS = ("weight", "activation", "wanda")
# issue 9, deployable output: structured pruning, int8 weights, checkpoint formats, GGUF
STRUCTURES = ("mlp", "heads", "both")
QUANT_TYPES = ("int8",)
SAVE_FORMATS = ("dense", "compressed", "compressed-tensors")
SAVE_DTYPES = ("float16", "bfloat16", "float32")
GGUF_TYPES = ("f16", "q8_0")
# issue 11, out-of-core pruning: where the blocks and the calibration activations wait their turn
OFFLOAD_MODES = ("cpu", "disk")
ACTIVATION_PLACES = ("cpu",)
# fields that say where the work runs, never what it computes: a result does not depend on them
PLACEMENT_FIELDS = ("offload", "offload_dir", "activations")


@dataclass(frozen=True)
class Pattern:
    """Sparsity pattern. ``n``/``m`` are None for unstructured.

    N:M keeps exactly ``n`` weights in every ``m`` consecutive input weights of each row
    (NVIDIA's 2:4 convention), so its sparsity is ``1 - n/m``.
    """

    n: int | None = None
    m: int | None = None

    @property
    def structured(self) -> bool:
        return self.m is not None

    @property
    def sparsity(self) -> float | None:
        return None if self.m is None else 1.0 - self.n / self.m

    def __str__(self) -> str:
        return "unstructured" if self.m is None else f"{self.n}:{self.m}"


_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(text: str | Pattern) -> Pattern:
    """Parse ``"unstructured"`` or ``"N:M"`` (1 <= N < M) into a Pattern."""
    if isinstance(text, Pattern):
        return text
    s = str(text).strip().lower()
    if s in ("unstructured", "", "none"):
        return Pattern()
    match = _NM.match(s)
    if not match:
        raise LlmpruneError(
            f"pattern {text!r} is not understood: use 'unstructured' or 'N:M' such as '2:4'"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if n < 1 or n >= m:
        raise LlmpruneError(
            f"pattern {text!r} is invalid: N:M keeps N of every M weights, so it needs 1 <= N < M"
        )
    return Pattern(n, m)


def check_sparsity(value: float, name: str = "sparsity") -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise LlmpruneError(f"{name} {value!r} is not a number: give a fraction in [0, 1)")
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise LlmpruneError(f"{name} {value} is outside [0, 1): give a fraction such as 0.5")
    return value


def _opt(default: Any, help: str) -> Any:
    """A dataclass field with its help text: CLI flags take both default and help from here."""
    return field(default=default, metadata={"help": help})


def field_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of config class ``cls``."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def field_help(cls: type, name: str) -> str:
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("help", "")


def _check_positive(value: Any, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LlmpruneError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data: which windows feed the hooks."""

    dataset: str = _opt("c4", "calibration data: c4, wikitext2, ptb or a local .txt/.jsonl file")
    nsamples: int = _opt(128, "calibration windows")
    seqlen: int | None = _opt(None, "window length for calibration and evaluation (default: model context, at most 4096)")
    seed: int = _opt(0, "calibration sampling seed")
    # 1, as the official Wanda/SparseGPT loops do: on a CPU one 2048-token window at a time keeps a
    # block's activations in cache and is the fastest (SmolLM2, 2 cores: stack forward 25 s at
    # batch 1, 39 s at batch 8); on a GPU a larger batch fills the device better
    batch_size: int = _opt(1, "calibration windows run through a block together (raise it on a GPU)")

    def __post_init__(self) -> None:
        _check_positive(self.nsamples, "nsamples")
        _check_positive(self.batch_size, "calibration batch size")
        if self.seqlen is not None:
            _check_positive(self.seqlen, "seqlen")
            if self.seqlen < 2:
                raise LlmpruneError(f"seqlen {self.seqlen} is too short: use at least 2")


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how. ``group``/``metric`` None means the method's own default."""

    method: str = _opt("wanda", "pruning method (see `llmprune.methods.METHODS`)")
    sparsity: float | None = _opt(None, "fraction of weights removed, in [0, 1) (None: 0.5, or 1 - N/M for an N:M pattern)")
    pattern: Pattern = field(default_factory=Pattern, metadata={
        "help": "'unstructured' or N:M = keep N of every M consecutive input weights, e.g. 2:4"})
    group: str | None = _opt(None, "comparison group: row, column or layer (None: the method's)")
    metric: str | None = _opt(None, "score: weight, activation or wanda (None: the method's)")
    use_variant: bool = _opt(False, "Wanda's alpha variant (per-row cumulative-score threshold)")
    true_sequential: bool = _opt(False, "prune q/k/v, o, gate/up, down in turn, each from inputs through the pruned stages")
    include: tuple[str, ...] = _opt((), "only layers matching these globs over 'layers.{i}.{name}', e.g. 'layers.*.mlp.*' (empty: all)")
    exclude: tuple[str, ...] = _opt((), "skip layers matching these globs")
    skip_attention: bool = _opt(False, "leave every attention layer dense (shorthand for an exclude; see `llmprune inspect`)")
    skip_mlp: bool = _opt(False, "leave every MLP layer, experts included, dense")
    percdamp: float = _opt(0.01, "SparseGPT Hessian damping, as a fraction of mean diag(H)")
    blocksize: int = _opt(128, "SparseGPT column block size")
    # beyond Wanda (issue 8): per-layer sparsity, RIA, DSnoT, mask-fixed reconstruction
    allocation: str = _opt("uniform", "per-block sparsity: uniform, owl (outlier-weighted) or depth (linear in depth)")
    owl_m: float = _opt(5.0, "OWL outlier threshold M: a Wanda score is an outlier above M x the block's mean score")
    owl_lambda: float = _opt(0.08, "OWL lambda: block sparsities span 2*lambda around the target (N:M: lambda*M weights per group)")
    owl_nsamples: int | None = _opt(None, "calibration windows for OWL's dense statistics pass (None: all, as the official code)")
    depth_delta: float = _opt(0.08, "depth allocation: first block target - delta, last target + delta")
    ria_a: float = _opt(0.5, "RIA activation exponent a in (|W|/sum_row + |W|/sum_col) * ||X||^a")
    permute: bool = _opt(False, "N:M channel permutation before masking (RIA's heuristic channel reallocation)")
    refine: str | None = _opt(None, "refine the mask after the method: dsnot (training-free prune-and-grow)")
    dsnot_cycles: int = _opt(50, "DSnoT maximum prune-and-grow cycles per layer")
    dsnot_threshold: float = _opt(0.1, "DSnoT update threshold on |reconstruction error| per row")
    dsnot_var_power: float = _opt(1.0, "DSnoT exponent of the input variance in the growing criterion")
    dsnot_skip: str = _opt("mlp", "DSnoT leaves these layers' masks as they are: mlp (official default), self_attn or none")
    reconstruct: bool = _opt(False, "after the mask is chosen, update the kept weights to minimise ||WX - W'X||^2 (OBS sweep, mask fixed)")
    # deployable output (issue 9): structured methods (wanda-sp, flap) and int8 weights
    structure: str = _opt("mlp", "structured methods (wanda-sp, flap): remove mlp (intermediate channels), heads (whole KV groups: a KV head with its query heads) or both")
    channel_multiple: int = _opt(32, "structured methods: keep a multiple of this many MLP channels (32: llama.cpp's q8_0 block; 1: the exact ratio)")
    quantize: str | None = _opt(None, "weight-only quantization of the pruned layers after pruning: int8 (per output channel, symmetric; zeros stay zero)")
    # out-of-core pruning (issue 11): placement only, the pruned weights are the same (PLACEMENT_FIELDS)
    offload: str | None = _opt(None, "keep the decoder blocks off the compute device, each brought in only for its "
                                     "turn: cpu (in CPU memory) or disk (safetensors files in offload_dir)")
    offload_dir: str | None = _opt(None, "folder for offload disk: the blocks wait there, and are written back there "
                                         "pruned (a private subfolder, removed at the end)")
    activations: str | None = _opt(None, "cpu: keep the calibration activations in CPU memory and move one batch at a "
                                         "time to the compute device (None: on the compute device)")
    calib: CalibConfig = field(default_factory=CalibConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", parse_pattern(self.pattern))
        object.__setattr__(self, "method", str(self.method).lower())
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if isinstance(self.calib, Mapping):
            object.__setattr__(self, "calib", from_dict(CalibConfig, self.calib, "calib"))
        if self.pattern.structured:
            implied = self.pattern.sparsity
            if self.sparsity is None:
                object.__setattr__(self, "sparsity", implied)
            elif not math.isclose(float(self.sparsity), implied, abs_tol=1e-9):
                raise LlmpruneError(
                    f"sparsity {self.sparsity} disagrees with pattern {self.pattern}, which keeps "
                    f"{self.pattern.n} of every {self.pattern.m} weights (sparsity {implied:g}): "
                    "drop --sparsity or make them agree"
                )
        elif self.sparsity is None:
            object.__setattr__(self, "sparsity", 0.5)
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
        if self.group is not None and self.group not in GROUPS:
            raise LlmpruneError(f"unknown comparison group {self.group!r}: use one of {', '.join(GROUPS)}")
        if self.metric is not None and self.metric not in METRICS:
            raise LlmpruneError(f"unknown metric {self.metric!r}: use one of {', '.join(METRICS)}")
        if not (0.0 <= float(self.percdamp) < 1e3):
            raise LlmpruneError(f"percdamp {self.percdamp} must be a small non-negative fraction such as 0.01")
        _check_positive(self.blocksize, "blocksize")
        object.__setattr__(self, "allocation", str(self.allocation).lower())
        if self.refine is not None:
            refine = str(self.refine).strip().lower()
            object.__setattr__(self, "refine", None if refine in ("", "none") else refine)
        _check_positive(self.owl_nsamples, "owl_nsamples", allow_none=True)
        object.__setattr__(self, "structure", _choice(self.structure, STRUCTURES, "structure"))
        _check_positive(self.channel_multiple, "channel_multiple")
        quantize = None if self.quantize is None or str(self.quantize).strip().lower() in ("", "none") else self.quantize
        object.__setattr__(self, "quantize", None if quantize is None else _choice(quantize, QUANT_TYPES, "quantization type"))
        _check_positive(self.dsnot_cycles, "dsnot_cycles")
        self._check_placement()

    def _check_placement(self) -> None:
        offload = _none_or_choice(self.offload, OFFLOAD_MODES, "offload mode")
        object.__setattr__(self, "offload", offload)
        object.__setattr__(self, "activations", _none_or_choice(self.activations, ACTIVATION_PLACES,
                                                                "activations place"))
        folder = None if self.offload_dir is None or not str(self.offload_dir).strip() else str(self.offload_dir)
        object.__setattr__(self, "offload_dir", folder)
        if offload == "disk" and folder is None:
            raise LlmpruneError("--offload disk keeps the blocks in files: give --offload-dir DIR (offload_dir in a "
                                "recipe), a writable folder with room for the model's weights")
        if folder is not None and offload != "disk":
            raise LlmpruneError(f"--offload-dir {folder} is where --offload disk keeps the blocks: add --offload disk "
                                "or drop --offload-dir")

    def to_dict(self) -> dict[str, Any]:
        out = to_dict(self)
        out["pattern"] = str(self.pattern)
        return out


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity and zero-shot evaluation."""

    datasets: tuple[str, ...] = _opt(("ptb",), "perplexity datasets, comma separated: wikitext2, ptb, c4, or a local .txt/.jsonl path")
    seqlen: int | None = _opt(None, "evaluation window length (None: the model's context, at most 4096)")
    batch_size: int = _opt(1, "evaluation windows per forward pass")
    max_windows: int | None = _opt(None, "evaluate only the first K windows (None: all)")
    zeroshot: tuple[str, ...] = _opt((), "zero-shot tasks through lm-eval, e.g. boolq,rte,winogrande,arc_easy,arc_challenge,openbookqa,piqa")
    limit: int | None = _opt(None, "zero-shot documents per task (None: all)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "datasets", _as_tuple(self.datasets))
        object.__setattr__(self, "zeroshot", _as_tuple(self.zeroshot))
        _check_positive(self.batch_size, "batch size")
        _check_positive(self.max_windows, "max_windows", allow_none=True)
        _check_positive(self.limit, "limit", allow_none=True)
        if self.seqlen is not None:
            _check_positive(self.seqlen, "seqlen")
            if self.seqlen < 2:
                raise LlmpruneError(f"seqlen {self.seqlen} is too short: use at least 2")


EXECUTORS = ("local", "slurm", "submitit-local")


@dataclass(frozen=True)
class SlurmConfig:
    """Where and how big each job of a sweep is on SLURM (through submitit): one job per run."""

    partition: str | None = _opt(None, "SLURM partition (None: the cluster's default)")
    gpus_per_job: int = _opt(1, "GPUs per job (one run per job)")
    time: int = _opt(240, "time limit per job, in minutes")
    mem_gb: int | None = _opt(None, "memory per job in GB (None: the partition's default)")
    cpus_per_task: int | None = _opt(None, "CPUs per job (None: the partition's default)")
    array_parallelism: int = _opt(64, "at most this many jobs of the array run at once")

    def __post_init__(self) -> None:
        if self.partition is not None and (not isinstance(self.partition, str) or not self.partition.strip()):
            raise LlmpruneError(f"slurm partition must be a non-empty string, got {self.partition!r}")
        if isinstance(self.gpus_per_job, bool) or not isinstance(self.gpus_per_job, int) or self.gpus_per_job < 0:
            raise LlmpruneError(f"gpus_per_job must be a non-negative integer, got {self.gpus_per_job!r}")
        _check_positive(self.time, "slurm time (minutes)")
        _check_positive(self.mem_gb, "slurm mem_gb", allow_none=True)
        _check_positive(self.cpus_per_task, "slurm cpus_per_task", allow_none=True)
        _check_positive(self.array_parallelism, "slurm array_parallelism")


@dataclass(frozen=True)
class ExportConfig:
    """How a pruned model is written: checkpoint format (``--save``, ``llmprune compress``) and GGUF type."""

    save_format: str = _opt("dense", "checkpoint format: dense (HF safetensors), compressed (bitmask + nonzero values; int8 values + scales after --quantize int8) or compressed-tensors (int8 weight-only, needs the compressed-tensors package)")
    save_dtype: str | None = _opt(None, "dtype of the stored floating-point values of a compressed checkpoint: float16, bfloat16 or float32 (default: the model's)")
    gguf_type: str = _opt("f16", "GGUF type of the weight matrices: f16 or q8_0 (norms stay f32)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "save_format", _choice(self.save_format, SAVE_FORMATS, "save format"))
        if self.save_dtype is not None:
            object.__setattr__(self, "save_dtype", _choice(self.save_dtype, SAVE_DTYPES, "save dtype"))
        object.__setattr__(self, "gguf_type", _choice(self.gguf_type, GGUF_TYPES, "GGUF type"))


RECOVER_METHODS = ("kd", "lora")
LR_SCHEDULES = ("constant", "linear")
DEFAULT_RECOVER_LR = {"kd": 5e-5, "lora": 1e-3}  # see RecoverConfig.lr's help


@dataclass(frozen=True)
class RecoverConfig:
    """Recovery after pruning that keeps the zeros (``llmprune recover``, a recipe's ``recover:``)."""

    method: str = _opt("kd", "kd: train the pruned Linears, masked, on the dense teacher's logits; lora: peft LoRA "
                             "adapters on them, trained the same way through the mask, then merged")
    steps: int = _opt(100, "optimizer steps")
    seqlen: int = _opt(512, "training window length in tokens")
    batch_size: int = _opt(2, "training windows per step")
    lr: float | None = _opt(None, "peak AdamW learning rate (None: 5e-5 for kd, 1e-3 for lora)")
    warmup_steps: int = _opt(5, "linear learning-rate warmup steps")
    lr_schedule: str = _opt("constant", "after warmup: constant (every point of a run is a finished shorter run) "
                                        "or linear (decay to 0 at the last step)")
    weight_decay: float = _opt(0.0, "AdamW weight decay (a pruned weight stays 0 either way)")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this (0: off)")
    temperature: float = _opt(1.0, "distillation temperature T: KL between softmax(logits / T), times T^2")
    alpha: float = _opt(0.0, "weight of the next-token loss: (1 - alpha) * KL(teacher || student) + alpha * cross-entropy")
    data: str = _opt("c4", "training windows: c4, wikitext2, ptb (train splits) or a local .txt/.jsonl file")
    seed: int = _opt(1, "training-window seed; keep it apart from the pruning calibration's seed")
    lora_rank: int = _opt(8, "LoRA rank r")
    lora_alpha: float = _opt(16.0, "LoRA alpha: the update B @ A is scaled by alpha / r")
    lora_targets: tuple[str, ...] = _opt((), "LoRA on the pruned Linears whose names end with these, e.g. q_proj,v_proj "
                                             "(empty: every pruned Linear)")
    gradient_checkpointing: bool = _opt(False, "recompute each block's activations in the backward pass: less memory, slower")
    checkpoint_every: int = _opt(50, "write a resumable checkpoint to --save every K steps (0: only the final save)")
    eval_every: int = _opt(0, "evaluate perplexity every K steps along the way (0: only before and after)")
    max_minutes: float | None = _opt(None, "stop after the step that passes this many minutes of training (None: all steps)")
    max_cpu_minutes: float | None = _opt(None, "the same budget in this process's CPU minutes, which other jobs on a "
                                               "shared machine do not eat (None: no limit)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", _choice(self.method, RECOVER_METHODS, "recovery method"))
        object.__setattr__(self, "lr_schedule", _choice(self.lr_schedule, LR_SCHEDULES, "learning-rate schedule"))
        object.__setattr__(self, "lora_targets", _as_tuple(self.lora_targets))
        for name in ("steps", "seqlen", "batch_size", "lora_rank"):
            _check_positive(getattr(self, name), name)
        if self.seqlen < 2:
            raise LlmpruneError(f"seqlen {self.seqlen} is too short: use at least 2")
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LlmpruneError(f"{name} must be a non-negative integer, got {value!r}")
        positive = ("lr", "temperature", "lora_alpha", "max_minutes", "max_cpu_minutes")  # > 0; the others >= 0
        for name in positive + ("weight_decay", "grad_clip", "alpha"):
            value = getattr(self, name)
            if value is None and name in ("lr", "max_minutes", "max_cpu_minutes"):
                continue
            number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
            if not math.isfinite(number) or number < 0 or (name in positive and number == 0):
                raise LlmpruneError(f"{name} must be a {'positive' if name in positive else 'non-negative'} "
                                    f"number, got {value!r}")
        if self.alpha > 1:
            raise LlmpruneError(f"alpha {self.alpha} is the next-token loss's weight: give a value in [0, 1]")

    @property
    def effective_lr(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_RECOVER_LR[self.method]


def _choice(value: Any, allowed: tuple[str, ...], what: str) -> str:
    name = str(value).strip().lower()
    if name not in allowed:
        raise LlmpruneError(f"unknown {what} {value!r}: use {', '.join(allowed)}")
    return name


def _none_or_choice(value: Any, allowed: tuple[str, ...], what: str) -> str | None:
    """None for None, '' or 'none' (the default place), else one of ``allowed``."""
    if value is None or str(value).strip().lower() in ("", "none"):
        return None
    return _choice(value, allowed, what)


def _as_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(str(v) for v in value)


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (patterns as text, tuples as lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Pattern):
            value = str(value)
        elif dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def from_dict(cls: type, data: Mapping[str, Any], where: str = "config") -> Any:
    """Build ``cls`` from a mapping, naming any unknown key and its path."""
    if not isinstance(data, Mapping):
        raise LlmpruneError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise LlmpruneError(
            f"unknown key {where}.{unknown[0]}: known keys are {', '.join(sorted(names))}"
        )
    kwargs = dict(data)
    if cls is PruneConfig and "calib" in kwargs and isinstance(kwargs["calib"], Mapping):
        kwargs["calib"] = from_dict(CalibConfig, kwargs["calib"], f"{where}.calib")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # wrong types that the dataclass itself trips over
        raise LlmpruneError(f"{where}: {exc}") from None
