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

from llmprune.checks import as_tuple, check_positive, check_sparsity, choice, none_or_choice
from llmprune.errors import LlmpruneError
from llmprune.methods import ALLOCATIONS, BLOCK_STEPS, METHODS, RECONSTRUCTIONS, REFINERS, check_steps
from llmprune.registry import field_default as spec_default
from llmprune.registry import option, option_fields, owners

QUANT_TYPES = ("int8",)
SAVE_FORMATS = ("dense", "compressed", "compressed-tensors")
SAVE_DTYPES = ("float16", "bfloat16", "float32")
GGUF_TYPES = ("f16", "q8_0", "q5_0", "q4_0", "q4_k")  # llmprune.export.gguf.TYPES
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


def field_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of config class ``cls``."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def field_help(cls: type, name: str) -> str:
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("help", "")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data: the windows of text whose activations the methods measure
    (``PruneConfig(calib=...)``; the ``--calib``, ``--nsamples``, ``--seqlen``, ``--seed`` and
    ``--calib-batch-size`` flags; a recipe's ``calib:``).

    Fields:

    - ``dataset``: ``"c4"`` (the papers' choice), ``"wikitext2"``, ``"ptb"`` or the path of a local
      ``.txt``/``.jsonl`` file, read from the data dir (``data_dir=``, ``$LLMPRUNE_DATA_DIR``) or
      the hub.
    - ``nsamples``: how many windows (128 in the papers).
    - ``seqlen``: tokens per window; None: the model's context, at most 4096.
      :func:`llmprune.prune_model` also evaluates in windows of this length unless given an
      EvalConfig.
    - ``seed``: which windows are drawn (the reference scripts' sampling).
    - ``batch_size``: windows run through a block together (1 is fastest on a CPU; raise it on a GPU).

    Example::

        >>> import llmprune
        >>> calib = llmprune.CalibConfig(dataset="c4", nsamples=32, seqlen=512, seed=0)
        >>> config = llmprune.PruneConfig(method="wanda", calib=calib)
    """

    dataset: str = option("c4", "calibration data: c4, wikitext2, ptb or a local .txt/.jsonl file")
    nsamples: int = option(128, "calibration windows")
    seqlen: int | None = option(None, "window length for calibration and evaluation (default: model context, "
                                      "at most 4096)")
    seed: int = option(0, "calibration sampling seed")
    # 1, as the official Wanda/SparseGPT loops do: on a CPU one 2048-token window at a time keeps a
    # block's activations in cache and is the fastest (SmolLM2, 2 cores: stack forward 25 s at
    # batch 1, 39 s at batch 8); on a GPU a larger batch fills the device better
    batch_size: int = option(1, "calibration windows run through a block together (raise it on a GPU)")

    def __post_init__(self) -> None:
        check_positive(self.nsamples, "nsamples")
        check_positive(self.batch_size, "calibration batch size")
        if self.seqlen is not None:
            check_positive(self.seqlen, "seqlen")
            if self.seqlen < 2:
                raise LlmpruneError(f"seqlen {self.seqlen} is too short: use at least 2")


@dataclass(frozen=True, init=False)
class PruneConfig:
    """What to prune and how: the core fields below, and ``options``, the knobs of the method,
    allocation, refiner and reconstruction in use. Each knob is declared by its spec's options
    dataclass (``llmprune.methods``); here it is given flat, by name, as on the command line and
    in recipes: ``PruneConfig(method="ria", ria_a=0.7)``, and read back as ``config.ria_a`` or
    through :meth:`options_of`. A knob that no component in use declares is refused unless it has
    its default (so the records of older versions, which listed every knob, still read back).
    Every value is checked here: a bad one is an :class:`llmprune.LlmpruneError` naming it.

    Fields (each is the ``llmprune prune`` flag of the same name, ``--true-sequential`` for
    ``true_sequential``):

    - ``method``: the pruning method's name (``help(llmprune)`` lists the registered ones).
    - ``sparsity``: the fraction of weights removed, in [0, 1); None: 0.5, or 1 - N/M for N:M.
    - ``pattern``: ``"unstructured"`` or ``"N:M"`` (keep N of every M consecutive input weights).
    - ``true_sequential``: prune q/k/v, o, gate/up, down in turn, each from the pruned inputs.
    - ``include`` / ``exclude``: globs over ``layers.{i}.{name}`` (``"layers.*.mlp.*"``).
    - ``skip_attention`` / ``skip_mlp``: leave every attention / MLP layer dense.
    - ``allocation``: per-block sparsity: ``uniform``, ``owl`` or ``depth``.
    - ``permute``: RIA's channel permutation before an N:M mask.
    - ``refine``: a refiner after the method (``"dsnot"``); None: none.
    - ``reconstruct``: re-solve each layer's kept weights for the chosen mask: ``"obs"`` (the OBS
      sweep; ``True`` means it) or ``"admm"`` (Boža's ADMM update); None: none.
    - ``block_reconstruct``: then update the kept weights of each whole block toward the dense
      block's outputs: ``"lunch"`` (attention and MLP separately) or ``"ro"`` (Wanda++'s regional
      optimisation); None: none.
    - ``quantize``: ``"int8"`` weight-only quantization after pruning; None: none.
    - ``offload`` / ``offload_dir``: keep the blocks in CPU memory (``"cpu"``) or on disk
      (``"disk"``, in ``offload_dir``) while pruning a model larger than the device.
    - ``activations``: ``"cpu"`` keeps the calibration activations in CPU memory.
    - ``calib``: the :class:`CalibConfig` (a dict of its fields is accepted).
    - ``options``: the components' knobs, filled with their defaults (give them flat, by name).

    Example::

        >>> import llmprune
        >>> config = llmprune.PruneConfig(method="sparsegpt", pattern="2:4",
        ...                               calib=llmprune.CalibConfig(nsamples=64, seqlen=1024))
        >>> config.sparsity, str(config.pattern)
        (0.5, '2:4')
    """

    method: str = option("wanda", "pruning method (`llmprune prune --help` lists them)")
    sparsity: float | None = option(None, "fraction of weights removed, in [0, 1) (None: 0.5, or 1 - N/M for "
                                          "an N:M pattern)")
    pattern: Pattern = field(default_factory=Pattern, metadata={
        "help": "'unstructured' or N:M = keep N of every M consecutive input weights, e.g. 2:4"})
    true_sequential: bool = option(False, "prune q/k/v, o, gate/up, down in turn, each from inputs through "
                                          "the pruned stages")
    include: tuple[str, ...] = option((), "only layers matching these globs over 'layers.{i}.{name}', e.g. "
                                          "'layers.*.mlp.*' (empty: all)")
    exclude: tuple[str, ...] = option((), "skip layers matching these globs")
    skip_attention: bool = option(False, "leave every attention layer dense (shorthand for an exclude; see "
                                         "`llmprune inspect`)")
    skip_mlp: bool = option(False, "leave every MLP layer, experts included, dense")
    allocation: str = option("uniform",
                             "per-block sparsity: uniform, owl (outlier-weighted) or depth (linear in depth)")
    permute: bool = option(False,
                           "N:M channel permutation before masking (RIA's heuristic channel reallocation)")
    refine: str | None = option(None,
                                "refine the mask after the method: dsnot (training-free prune-and-grow)")
    reconstruct: str | bool | None = option(None, "after the mask is chosen, re-solve each layer's kept "
                                                  "weights for ||WX - W'X||^2, mask fixed: obs (the OBS "
                                                  "sweep; true or the flag alone) or admm (ADMM update)")
    block_reconstruct: str | None = option(None, "then update each block's kept weights toward the dense "
                                                 "block's outputs: lunch (attention and MLP separately) or "
                                                 "ro (Wanda++ regional optimisation)")
    quantize: str | None = option(None, "weight-only quantization of the pruned layers after pruning: int8 "
                                        "(per output channel, symmetric; zeros stay zero)")
    # out-of-core pruning: placement only, the pruned weights are the same (PLACEMENT_FIELDS)
    offload: str | None = option(None, "keep the decoder blocks off the compute device, each brought in only "
                                       "for its turn: cpu (in CPU memory) or disk (safetensors files in "
                                       "offload_dir)")
    offload_dir: str | None = option(None, "folder for offload disk: the blocks wait there, and are written "
                                           "back there pruned (a private subfolder, removed at the end)")
    activations: str | None = option(None, "cpu: keep the calibration activations in CPU memory and move one "
                                           "batch at a time to the compute device (None: on the compute "
                                           "device)")
    calib: CalibConfig = field(default_factory=CalibConfig)
    options: dict = field(default_factory=dict, hash=False, metadata={
        "help": "the knobs of the components in use, by name (filled with their defaults)"})

    def __init__(self, **kwargs: Any) -> None:
        given = dict(kwargs.pop("options", None) or {})
        core = {f.name: f for f in dataclasses.fields(PruneConfig) if f.name != "options"}
        for name in list(kwargs):
            if name not in core:
                given[name] = kwargs.pop(name)
        for name, _f in core.items():
            object.__setattr__(self, name, kwargs[name] if name in kwargs
                               else field_default(PruneConfig, name))
        self._check_core()
        object.__setattr__(self, "options", resolve_options(self, given))
        for spec in self.components():  # combinations each component refuses, before any work
            if spec.check is not None:
                spec.check(self)
        check_steps(self)

    def __getattr__(self, name: str) -> Any:  # only for names that are not fields: the options
        options = self.__dict__.get("options")
        if options is not None and name in options:
            return options[name]
        known = option_fields().get(name)
        if known is None:
            raise AttributeError(f"PruneConfig has no field or option {name!r}")
        return spec_default(known)

    def components(self) -> list:
        """The specs in use: the method, the allocation, the refiner, the reconstruction."""
        specs = [METHODS.get(self.method), ALLOCATIONS.get(self.allocation)]
        if self.refine is not None:
            specs.append(REFINERS.get(self.refine))
        if self.reconstruct is not None:
            specs.append(RECONSTRUCTIONS.get(self.reconstruct))
        if self.block_reconstruct is not None:
            specs.append(BLOCK_STEPS.get(self.block_reconstruct))
        return specs

    def derived(self, **changes: Any) -> "PruneConfig":
        """A copy with some fields or options changed and no check run again: the engine's
        per-block targets (an allocation's sparsity or N:M kept count, which the config-level
        checks such as OWL's spread do not apply to) and its magnitude fallback."""
        new = object.__new__(PruneConfig)
        new.__dict__.update(self.__dict__)
        options = dict(self.options)
        for name, value in changes.items():
            if name == "pattern":
                value = parse_pattern(value)
            if name in new.__dict__ and name != "options":
                object.__setattr__(new, name, value)
            else:
                options[name] = value
        object.__setattr__(new, "options", options)
        return new

    def options_of(self, spec) -> Any:
        """``spec``'s options dataclass with this config's values."""
        return spec.options(**{f.name: self.options[f.name] for f in dataclasses.fields(spec.options)})

    def _check_core(self) -> None:
        object.__setattr__(self, "pattern", parse_pattern(self.pattern))
        object.__setattr__(self, "method", str(self.method).strip().lower())
        object.__setattr__(self, "include", as_tuple(self.include))
        object.__setattr__(self, "exclude", as_tuple(self.exclude))
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
        object.__setattr__(self, "allocation", str(self.allocation).strip().lower())
        if self.refine is not None:
            refine = str(self.refine).strip().lower()
            object.__setattr__(self, "refine", None if refine in ("", "none") else refine)
        object.__setattr__(self, "reconstruct", _step_name(self.reconstruct, RECONSTRUCTIONS))
        object.__setattr__(self, "block_reconstruct", _step_name(self.block_reconstruct, BLOCK_STEPS))
        quantize = (None if self.quantize is None or str(self.quantize).strip().lower() in ("", "none")
                    else self.quantize)
        object.__setattr__(self, "quantize",
                           None if quantize is None else choice(quantize, QUANT_TYPES, "quantization type"))
        self._check_placement()

    def _check_placement(self) -> None:
        offload = none_or_choice(self.offload, OFFLOAD_MODES, "offload mode")
        object.__setattr__(self, "offload", offload)
        object.__setattr__(self, "activations", none_or_choice(self.activations, ACTIVATION_PLACES,
                                                                "activations place"))
        folder = (None if self.offload_dir is None or not str(self.offload_dir).strip()
                  else str(self.offload_dir))
        object.__setattr__(self, "offload_dir", folder)
        if offload == "disk" and folder is None:
            raise LlmpruneError("--offload disk keeps the blocks in files: give --offload-dir DIR "
                                "(offload_dir in a recipe), a writable folder with room for the model's "
                                "weights")
        if folder is not None and offload != "disk":
            raise LlmpruneError(f"--offload-dir {folder} is where --offload disk keeps the blocks: add "
                                "--offload disk or drop --offload-dir")

    def to_dict(self) -> dict[str, Any]:
        """Flat, as recipes and result records write it: the core fields, then the options."""
        return to_dict(self)


def _step_name(value: Any, registry) -> str | None:
    """A step's registered name from a flag or recipe value: False/None/"none" is no step; True (the
    records before the choice existed, and the bare flag) is the registry's first spec (``obs``)."""
    if value is None or value is False or str(value).strip().lower() in ("", "none", "false"):
        return None
    if value is True or str(value).strip().lower() == "true":
        return registry.names()[0]
    return registry.get(value).name


def resolve_options(config: PruneConfig, given: Mapping[str, Any]) -> dict[str, Any]:
    """The values of every option of ``config``'s components (given, else the default), each
    validated by its options dataclass; a given option no component declares is refused
    unless it equals its default."""
    known = option_fields()
    unknown = sorted(name for name in given if name not in known)
    if unknown:
        core = [f.name for f in dataclasses.fields(PruneConfig) if f.name != "options"]
        raise LlmpruneError(f"unknown prune option {unknown[0]!r}: known are "
                            f"{', '.join(sorted(core + list(known)))}")
    values: dict[str, Any] = {}
    for spec in config.components():
        names = [f.name for f in dataclasses.fields(spec.options)]
        try:
            instance = spec.options(**{k: given[k] for k in names if k in given})
        except TypeError as exc:
            raise LlmpruneError(f"{spec.name} options: {exc}") from None
        values.update({name: getattr(instance, name) for name in names})
    for name, value in given.items():
        if name not in values and value != spec_default(known[name]):
            raise LlmpruneError(f"{name}={value!r} does not apply here: it belongs to "
                                f"{' and '.join(owners(name))}, not to method {config.method} with "
                                f"allocation {config.allocation}"
                                + (f", refine {config.refine}" if config.refine else "")
                                + (f", reconstruct {config.reconstruct}" if config.reconstruct else "")
                                + (f", block_reconstruct {config.block_reconstruct}"
                                   if config.block_reconstruct else "") + "; drop it")
    return values


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity and zero-shot evaluation (:func:`llmprune.prune_model`'s ``evaluate=``; the
    ``--eval``/``--dataset``, ``--seqlen``, ``--batch-size``, ``--max-windows``, ``--zeroshot``
    and ``--limit`` flags; a recipe's ``eval:``).

    Fields:

    - ``datasets``: perplexity datasets: ``"wikitext2"`` (the papers report it first), ``"ptb"``,
      ``"c4"`` or local ``.txt``/``.jsonl`` paths; a tuple or a comma-separated string; ``()``: none.
    - ``seqlen``: tokens per window; None: the model's context, at most 4096.
    - ``batch_size``: windows per forward pass (and lm-eval's batch size).
    - ``max_windows``: evaluate only the first K windows, a quick look; None: all.
    - ``zeroshot``: lm-eval tasks, e.g. ``("boolq", "rte", "winogrande", "arc_easy")``; ``()``: none.
    - ``limit``: documents per zero-shot task; None: all. ``lambada_openai`` and ``gsm8k`` are
      zero-shot tasks too.
    - ``kl``: on each perplexity dataset, the distance to the dense model (``--eval-kl``): mean
      KL(dense || model) per token, its 90/99/99.9th percentiles, top-1 agreement
      (docs/evaluation.md).
    - ``kl_topk``: dense log-probs kept per position in the dense cache (32).
    - ``kl_exact``: also the exact KL, the dense model kept in memory and run again (about 2x).
    - ``kl_cache``: the caches' folder; None: ``$LLMPRUNE_CACHE_DIR``, else ``~/.cache/llmprune``.
    - ``generate``: greedy-continuation agreement with the dense model on this many C4 prompts; 0: off.
    - ``generate_tokens``: tokens generated per prompt (32).

    Example::

        >>> import llmprune
        >>> quick = llmprune.EvalConfig(datasets=("wikitext2",), seqlen=512, max_windows=16)
        >>> full = llmprune.EvalConfig(datasets="wikitext2,ptb", zeroshot=("boolq", "rte"), limit=100)
    """

    datasets: tuple[str, ...] = option(("wikitext2",), "perplexity datasets, comma separated: wikitext2, "
                                                       "ptb, c4, or a local .txt/.jsonl path")
    seqlen: int | None = option(None, "evaluation window length (None: the model's context, at most 4096)")
    batch_size: int = option(1, "evaluation windows per forward pass")
    max_windows: int | None = option(None, "evaluate only the first K windows (None: all)")
    zeroshot: tuple[str, ...] = option((), "zero-shot tasks through lm-eval, e.g. "
                                           "boolq,rte,winogrande,arc_easy,arc_challenge,openbookqa,piqa; "
                                           "also lambada_openai, gsm8k")
    limit: int | None = option(None, "zero-shot documents per task (None: all)")
    kl: bool = option(False, "distance to the dense model on each perplexity dataset: mean "
                             "KL(dense || model) per token, its 90/99/99.9th percentiles, top-1 agreement")
    kl_topk: int = option(32, "dense log-probs kept per token in the dense cache (the top-k approximation)")
    kl_exact: bool = option(False, "exact KL over the whole vocabulary beside the top-k approximation "
                                   "(the dense model is kept in memory and run again; about 2x the "
                                   "evaluation)")
    kl_cache: str | None = option(None, "folder of the dense side's cache (None: $LLMPRUNE_CACHE_DIR, else "
                                        "~/.cache/llmprune)")
    generate: int = option(0, "greedy-continuation agreement with the dense model on this many C4 prompts "
                              "(0: off)")
    generate_tokens: int = option(32, "tokens generated per prompt for the agreement check")

    def __post_init__(self) -> None:
        object.__setattr__(self, "datasets", as_tuple(self.datasets))
        object.__setattr__(self, "zeroshot", as_tuple(self.zeroshot))
        check_positive(self.batch_size, "batch size")
        check_positive(self.max_windows, "max_windows", allow_none=True)
        check_positive(self.limit, "limit", allow_none=True)
        check_positive(self.kl_topk, "kl_topk")
        check_positive(self.generate_tokens, "generate_tokens")
        if isinstance(self.generate, bool) or not isinstance(self.generate, int) or self.generate < 0:
            raise LlmpruneError(f"generate must be a number of prompts (0: off), got {self.generate!r}")
        if (self.kl or self.kl_exact) and not self.datasets:
            raise LlmpruneError("the KL distance is measured on the perplexity datasets, but none is given: "
                                "add one, e.g. --eval wikitext2")
        if self.seqlen is not None:
            check_positive(self.seqlen, "seqlen")
            if self.seqlen < 2:
                raise LlmpruneError(f"seqlen {self.seqlen} is too short: use at least 2")


EXECUTORS = ("local", "slurm", "submitit-local")


@dataclass(frozen=True)
class SlurmConfig:
    """Where and how big each job of a sweep is on SLURM (through submitit): one job per run."""

    partition: str | None = option(None, "SLURM partition (None: the cluster's default)")
    gpus_per_job: int = option(1, "GPUs per job (one run per job)")
    time: int = option(240, "time limit per job, in minutes")
    mem_gb: int | None = option(None, "memory per job in GB (None: the partition's default)")
    cpus_per_task: int | None = option(None, "CPUs per job (None: the partition's default)")
    array_parallelism: int = option(64, "at most this many jobs of the array run at once")

    def __post_init__(self) -> None:
        if self.partition is not None and (not isinstance(self.partition, str) or not self.partition.strip()):
            raise LlmpruneError(f"slurm partition must be a non-empty string, got {self.partition!r}")
        if isinstance(self.gpus_per_job, bool) or not isinstance(self.gpus_per_job, int) \
                or self.gpus_per_job < 0:
            raise LlmpruneError(f"gpus_per_job must be a non-negative integer, got {self.gpus_per_job!r}")
        check_positive(self.time, "slurm time (minutes)")
        check_positive(self.mem_gb, "slurm mem_gb", allow_none=True)
        check_positive(self.cpus_per_task, "slurm cpus_per_task", allow_none=True)
        check_positive(self.array_parallelism, "slurm array_parallelism")


@dataclass(frozen=True)
class ExportConfig:
    """How a pruned model is written: checkpoint format (``--save``, ``llmprune compress``,
    :func:`llmprune.prune_model`'s ``export=``) and GGUF type (``llmprune export``).

    Fields:

    - ``save_format``: ``"dense"`` (HF safetensors, loads anywhere), ``"compressed"`` (bitmask +
      nonzero values; int8 after ``quantize="int8"``) or ``"compressed-tensors"`` (int8 weight-only
      for vLLM / transformers; needs the compressed-tensors package).
    - ``save_dtype``: the stored floats of a compressed checkpoint: ``"float16"``, ``"bfloat16"``
      or ``"float32"``; None: the model's dtype.
    - ``gguf_type``: GGUF weight matrices: ``"f16"``, ``"q8_0"``, ``"q5_0"``, ``"q4_0"`` (written
      by gguf-py) or ``"q4_k"`` (llama.cpp's Q4_K_M, by llama.cpp's quantizer: needs
      llama-cpp-python).

    Example::

        >>> import llmprune
        >>> export = llmprune.ExportConfig(save_format="compressed", save_dtype="float16")
    """

    save_format: str = option("dense", "checkpoint format: dense (HF safetensors), compressed (bitmask + "
                                       "nonzero values; int8 values + scales after --quantize int8) or "
                                       "compressed-tensors (int8 weight-only, needs the compressed-tensors "
                                       "package)")
    save_dtype: str | None = option(None, "dtype of the stored floating-point values of a compressed "
                                          "checkpoint: float16, bfloat16 or float32 (default: the model's)")
    gguf_type: str = option("f16", "GGUF type of the weight matrices: f16, q8_0, q5_0, q4_0 or q4_k "
                                   "(llama.cpp's Q4_K_M; needs llama-cpp-python); norms stay f32")

    def __post_init__(self) -> None:
        object.__setattr__(self, "save_format", choice(self.save_format, SAVE_FORMATS, "save format"))
        if self.save_dtype is not None:
            object.__setattr__(self, "save_dtype", choice(self.save_dtype, SAVE_DTYPES, "save dtype"))
        object.__setattr__(self, "gguf_type", choice(self.gguf_type, GGUF_TYPES, "GGUF type"))


RECOVER_METHODS = ("kd", "lora")
LR_SCHEDULES = ("constant", "linear")
DEFAULT_RECOVER_LR = {"kd": 5e-5, "lora": 1e-3}  # see RecoverConfig.lr's help


@dataclass(frozen=True)
class RecoverConfig:
    """Recovery after pruning that keeps the zeros (:func:`llmprune.recover`, ``llmprune recover``,
    a recipe's ``recover:``); every field is the flag of the same name.

    Fields: ``method`` (``"kd"``: masked distillation from the dense teacher; ``"lora"``: LoRA
    adapters trained through the mask, then merged), ``steps``, ``seqlen`` and ``batch_size`` (the
    training windows), ``lr`` (None: 5e-5 for kd, 1e-3 for lora), ``warmup_steps``, ``lr_schedule``
    (``"constant"`` or ``"linear"``), ``weight_decay``, ``grad_clip`` (0: off), ``temperature``
    and ``alpha`` (the loss: ``(1 - alpha) * T^2 * KL + alpha * CE``), ``data`` (``"c4"``,
    ``"wikitext2"``, ``"ptb"`` train splits or a local file), ``seed`` (keep it apart from the
    calibration's), ``lora_rank``, ``lora_alpha``, ``lora_targets`` (name suffixes; empty: every
    pruned Linear), ``gradient_checkpointing``, ``checkpoint_every`` and ``eval_every`` (steps;
    0: off), ``max_minutes`` and ``max_cpu_minutes`` (time budgets; None: none).

    Example::

        >>> import llmprune
        >>> config = llmprune.RecoverConfig(method="kd", steps=100, seqlen=512, batch_size=2)
        >>> config.effective_lr
        5e-05
    """

    method: str = option("kd", "kd: train the pruned Linears, masked, on the dense teacher's logits; lora: "
                               "peft LoRA adapters on them, trained the same way through the mask, then "
                               "merged")
    steps: int = option(100, "optimizer steps")
    seqlen: int = option(512, "training window length in tokens")
    batch_size: int = option(2, "training windows per step")
    lr: float | None = option(None, "peak AdamW learning rate (None: 5e-5 for kd, 1e-3 for lora)")
    warmup_steps: int = option(5, "linear learning-rate warmup steps")
    lr_schedule: str = option("constant", "after warmup: constant (every point of a run is a finished "
                                          "shorter run) or linear (decay to 0 at the last step)")
    weight_decay: float = option(0.0, "AdamW weight decay (a pruned weight stays 0 either way)")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: off)")
    temperature: float = option(1.0, "distillation temperature T: KL between softmax(logits / T), times T^2")
    alpha: float = option(0.0, "weight of the next-token loss: (1 - alpha) * KL(teacher || student) "
                               "+ alpha * cross-entropy")
    data: str = option("c4",
                       "training windows: c4, wikitext2, ptb (train splits) or a local .txt/.jsonl file")
    seed: int = option(1, "training-window seed; keep it apart from the pruning calibration's seed")
    lora_rank: int = option(8, "LoRA rank r")
    lora_alpha: float = option(16.0, "LoRA alpha: the update B @ A is scaled by alpha / r")
    lora_targets: tuple[str, ...] = option((), "LoRA on the pruned Linears whose names end with these, e.g. "
                                               "q_proj,v_proj (empty: every pruned Linear)")
    gradient_checkpointing: bool = option(False, "recompute each block's activations in the backward pass: "
                                                 "less memory, slower")
    checkpoint_every: int = option(50, "write a resumable checkpoint to --save every K steps (0: only the "
                                       "final save)")
    eval_every: int = option(0, "evaluate perplexity every K steps along the way (0: only before and after)")
    max_minutes: float | None = option(None, "stop after the step that passes this many minutes of training "
                                             "(None: all steps)")
    max_cpu_minutes: float | None = option(None, "the same budget in this process's CPU minutes, which other "
                                                 "jobs on a shared machine do not eat (None: no limit)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", choice(self.method, RECOVER_METHODS, "recovery method"))
        object.__setattr__(self, "lr_schedule",
                           choice(self.lr_schedule, LR_SCHEDULES, "learning-rate schedule"))
        object.__setattr__(self, "lora_targets", as_tuple(self.lora_targets))
        for name in ("steps", "seqlen", "batch_size", "lora_rank"):
            check_positive(getattr(self, name), name)
        if self.seqlen < 2:
            raise LlmpruneError(f"seqlen {self.seqlen} is too short: use at least 2")
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LlmpruneError(f"{name} must be a non-negative integer, got {value!r}")
        # > 0; the others >= 0
        positive = ("lr", "temperature", "lora_alpha", "max_minutes", "max_cpu_minutes")
        for name in positive + ("weight_decay", "grad_clip", "alpha"):
            value = getattr(self, name)
            if value is None and name in ("lr", "max_minutes", "max_cpu_minutes"):
                continue
            number = (float(value) if isinstance(value, (int, float)) and not isinstance(value, bool)
                      else math.nan)
            if not math.isfinite(number) or number < 0 or (name in positive and number == 0):
                raise LlmpruneError(f"{name} must be a {'positive' if name in positive else 'non-negative'} "
                                    f"number, got {value!r}")
        if self.alpha > 1:
            raise LlmpruneError(f"alpha {self.alpha} is the next-token loss's weight: give a value in [0, 1]")

    @property
    def effective_lr(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_RECOVER_LR[self.method]


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (patterns as text, tuples as lists)."""
    out: dict[str, Any] = {}
    flat = obj.options if isinstance(obj, PruneConfig) else {}  # a PruneConfig's options: flat, by name
    for f in dataclasses.fields(obj):
        if isinstance(obj, PruneConfig) and f.name == "options":
            continue
        value = getattr(obj, f.name)
        if isinstance(value, Pattern):
            value = str(value)
        elif dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    out.update({k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()})
    return out


def from_dict(cls: type, data: Mapping[str, Any], where: str = "config") -> Any:
    """Build ``cls`` from a mapping, naming any unknown key and its path."""
    if not isinstance(data, Mapping):
        raise LlmpruneError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    if cls is PruneConfig:  # the options of every registered component are keys too
        names = {**{k: v for k, v in names.items() if k != "options"}, **option_fields()}
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
