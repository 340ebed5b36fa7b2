"""One call from Python that does what ``llmprune prune`` does: :func:`prune_model`.

The order is the command line's, and so are the checks (``llmprune prune`` is this function plus
printing):

1. the inputs (:func:`llmprune.preflight.check_inputs`): evaluation and calibration data, zero-shot
   tasks, output paths, dtype and device, before the model loads;
2. the model's shapes from its config alone (:func:`llmprune.preflight.check_shapes_early`);
3. the model loads (unless it was given loaded), :func:`llmprune.plan` checks it for real, and the
   evaluation's memory is checked: all of it before any evaluation or calibration;
4. the dense model is evaluated (``dense=True``), pruned (:func:`llmprune.run`) and evaluated again;
5. the result record (the ``--json`` file) is written, then the checkpoint; a failure to write one
   output does not stop the other, and is raised at the end as an :class:`llmprune.errors.OutputError`
   (an ``OSError``) carrying the result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmprune import evaluation
from llmprune.config import EvalConfig, ExportConfig, PruneConfig, from_dict
from llmprune.errors import LlmpruneError, OutputError
from llmprune.io import model_source, write_json_atomic
from llmprune.methods import ALLOCATIONS, BLOCK_STEPS, METHODS, RECONSTRUCTIONS, REFINERS, needs_for
from llmprune.preflight import check_data_dir, check_export, check_inputs, check_shapes_early
from llmprune.results import record_pattern, result_record

if TYPE_CHECKING:  # annotations only: this module loads without torch (the CLI imports it)
    from llmprune.engine import PruneReport
    from llmprune.evaluation.perplexity import PerplexityResult
    from llmprune.evaluation.zeroshot import ZeroShotResult

Echo = Callable[[str], None]


def available() -> str:
    """The registered methods, refiners, reconstructions and allocations, by the names configs take
    (``llmprune --help`` and ``help(llmprune)`` show it; asked of the registry, never typed)."""
    parts = [f"Methods: {', '.join(METHODS.names())}"]
    for label, registry in (("refiners", REFINERS), ("reconstructions", RECONSTRUCTIONS),
                            ("block reconstructions", BLOCK_STEPS), ("allocations", ALLOCATIONS)):
        if len(registry):
            parts.append(f"{label}: {', '.join(registry.names())}")
    return "; ".join(parts)


def ppl_table(rows: list[tuple[str, str, Any]]) -> str:
    """The perplexity table ``llmprune eval`` and ``prune`` print; rows: (model label, dataset,
    PerplexityResult)."""
    head = (f"{'model':<16} {'dataset':<10} {'seqlen':>6} {'windows':>7} {'tokens':>9} {'ppl':>10} "
            f"{'seconds':>8} {'tok/s':>8}")
    lines = [head, "-" * len(head)]
    for label, name, r in rows:
        lines.append(f"{label:<16} {name:<10} {r.seqlen:>6} {r.windows:>7} {r.tokens:>9} {r.ppl:>10.3f} "
                     f"{r.seconds:>8.1f} {r.tokens_per_s:>8.0f}")
    return "\n".join(lines)


def distance_line(d: Any) -> str:
    """One line for a :class:`~llmprune.evaluation.distance.DistanceResult`."""
    how = "exact" if d.exact else f"top-{d.topk} approximation"
    return (f"KL(dense || pruned) mean {d.kl_mean:.4f} nats/token, p90 {d.kl_p90:.4f}, p99 {d.kl_p99:.4f}, "
            f"p99.9 {d.kl_p999:.4f} ({how}, {d.positions} positions); top-1 agreement {d.top1_agreement:.2%}")


def generation_line(g: Any) -> str:
    """One line for a :class:`~llmprune.evaluation.generation.GenerationResult`."""
    return (f"greedy continuations ({g.prompts} C4 prompts x {g.new_tokens} tokens): {g.agreement:.2%} of "
            f"the tokens identical before the first divergence, first divergence at token "
            f"{g.first_divergence:.1f} "
            f"on average, {g.identical:.0%} identical")


@dataclass
class PruneResult:
    """What :func:`prune_model` did.

    ``model`` and ``tokenizer``: the pruned model (in place: the same object when one was given)
    and its tokenizer. ``report``: the :class:`llmprune.PruneReport`. ``config``: the PruneConfig.
    ``eval_config``: the EvalConfig as run (its ``seqlen`` resolved). ``perplexity`` and
    ``zeroshot``: the pruned model's results ({dataset: PerplexityResult}, a ZeroShotResult or
    None; each PerplexityResult carries its ``distance`` to the dense model when ``kl``);
    ``generation``: the greedy-continuation agreement (``generate``); ``dense_perplexity`` and
    ``dense_zeroshot``: the dense model's, before pruning (empty
    and None with ``dense=False``). ``record``: the result record, the same dict ``llmprune prune
    --json`` writes (and ``llmprune.json`` of a saved checkpoint holds). ``saved``: the checkpoint
    folder, ``json_path``: the JSON file, each None when not asked for or not written; ``errors``:
    one line per output that could not be written.

    Example::

        >>> import llmprune
        >>> result = llmprune.prune_model("smollm2-135m", llmprune.PruneConfig(method="magnitude"))
        >>> round(result.report.overall_sparsity, 2)
        0.5
        >>> result.record["method"]
        'magnitude'
    """

    model: Any
    tokenizer: Any
    report: PruneReport
    config: PruneConfig
    eval_config: EvalConfig
    perplexity: dict[str, PerplexityResult] = field(default_factory=dict)
    zeroshot: ZeroShotResult | None = None
    dense_perplexity: dict[str, PerplexityResult] = field(default_factory=dict)
    dense_zeroshot: ZeroShotResult | None = None
    generation: Any = None
    record: dict = field(default_factory=dict)
    saved: Path | None = None
    json_path: Path | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """How tables name the pruned model: method and pattern or sparsity, e.g. ``wanda 50%``
        (a depth method: the blocks it removed, e.g. ``shortgpt -4 blocks``)."""
        c = self.config
        if self.report.depth:
            return f"{c.method} -{len(self.report.depth['removed_blocks'])} blocks"
        return f"{c.method} {c.pattern if c.pattern.structured else f'{c.sparsity:.0%}'}"

    def summary(self) -> str:
        """Dense and pruned perplexities (and zero-shot tables) as ``llmprune prune`` prints them;
        empty when nothing was evaluated."""
        name = str(self.record.get("model", "model"))
        rows = [(name + " dense", n, r) for n, r in self.dense_perplexity.items()]
        rows += [(self.label, n, r) for n, r in self.perplexity.items()]
        lines = [ppl_table(rows)] if rows else []
        for dataset, r in self.perplexity.items():
            if dataset in self.dense_perplexity:
                lines.append(f"{dataset}: dense {self.dense_perplexity[dataset].ppl:.3f} -> {self.label} "
                             f"{r.ppl:.3f} (pruning took {self.report.seconds:.1f} s)")
        for dataset, r in self.perplexity.items():
            if getattr(r, "distance", None) is not None:
                lines.append(f"{dataset}: {distance_line(r.distance)}")
        if self.generation is not None:
            lines.append(generation_line(self.generation))
        if self.dense_zeroshot is not None:
            lines.append("dense:\n" + self.dense_zeroshot.markdown_table())
        if self.zeroshot is not None:
            lines.append(f"{self.label}:\n" + self.zeroshot.markdown_table())
        return "\n".join(lines)


def as_eval_config(evaluate: EvalConfig | str | os.PathLike | Sequence[str] | None,
                   seqlen: int | None = None) -> EvalConfig:
    """``prune_model``'s ``evaluate``: an EvalConfig as given; dataset names (one, a comma-separated
    string or a list) become an EvalConfig with the calibration's ``seqlen``, as ``--seqlen`` sets
    both on the command line; None: nothing to evaluate."""
    if isinstance(evaluate, EvalConfig):
        return evaluate
    if evaluate is None:
        return EvalConfig(datasets=(), seqlen=seqlen)
    if isinstance(evaluate, (str, os.PathLike)):
        return EvalConfig(datasets=str(evaluate), seqlen=seqlen)
    if isinstance(evaluate, Sequence):
        return EvalConfig(datasets=tuple(str(name) for name in evaluate), seqlen=seqlen)
    raise LlmpruneError("evaluate must be an EvalConfig, dataset names or None, got "
                        f"{type(evaluate).__name__}")


def _as_config(config: PruneConfig | Mapping[str, Any] | None) -> PruneConfig:
    if config is None:
        return PruneConfig()
    if isinstance(config, PruneConfig):
        return config
    if isinstance(config, Mapping):
        return from_dict(PruneConfig, config, "config")
    raise LlmpruneError("config must be a PruneConfig or a mapping of its fields, got "
                        f"{type(config).__name__}")


def _as_pair(model: Any) -> tuple[Any, Any] | None:
    """None for a model reference (a name or path to load); the (model, tokenizer) pair otherwise."""
    if isinstance(model, (str, os.PathLike)):
        return None
    if isinstance(model, (tuple, list)) and len(model) == 2:
        return model[0], model[1]
    raise LlmpruneError("model must be a hub id, a local folder, a .gguf file or 'smollm2-135m', or the "
                        f"(model, tokenizer) pair load_model returns; got {type(model).__name__}")


def preflight(model: str | None, config: PruneConfig, eval_config: EvalConfig, data_dir: Path | None, *,
              save: str | os.PathLike | None = None, json_path: str | os.PathLike | None = None,
              overwrite: bool = False, device: Any = None, dtype: Any = "float32", device_map: Any = None,
              export: ExportConfig | None = None) -> None:
    """Every check of ``llmprune prune`` that needs no weights, in its order. ``model``: the
    reference to load, or None for a model already in memory (no path or shape check of it)."""
    from llmprune.offload import check_offload

    export = ExportConfig() if export is None else export
    check_export(export, config.quantize)
    if evaluation.needs_dense(eval_config) and config.offload is not None:
        raise LlmpruneError("the KL distance and the continuation agreement keep the dense model's outputs, "
                            "which an offloaded run does not hold: drop --offload, or --eval-kl/--generate")
    if evaluation.needs_dense(eval_config) and model is not None:
        evaluation.check_dense_source(model)
    check_offload(config, device_map, export.save_format)
    offload_dir = config.offload_dir if config.offload == "disk" else None
    check_inputs(eval_config, data_dir, model=model, dtype=dtype, device=device, device_map=device_map,
                 json_path=json_path, save=save, overwrite=overwrite,
                 calib=config.calib.dataset if needs_for(config) else None,
                 calib_seqlen=config.calib.seqlen if needs_for(config) else None,
                 paths=(("--offload-dir", offload_dir, "workdir"),))
    if model is not None:
        check_shapes_early(model, eval_config, config, dtype=dtype, device=device, device_map=device_map)


def prune_model(
    model: str | os.PathLike | tuple[Any, Any],
    config: PruneConfig | Mapping[str, Any] | None = None,
    evaluate: EvalConfig | str | Sequence[str] | None = None,
    save: str | os.PathLike | None = None,
    json: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    dense: bool = True,
    overwrite: bool = False,
    device: str | Any | None = None,
    dtype: str | Any = "float32",
    progress: bool = True,
    *,
    export: ExportConfig | None = None,
    device_map: str | dict | None = None,
    echo: Echo | None = None,
) -> PruneResult:
    """Prune a model in one call, as ``llmprune prune`` does: check, load, evaluate, prune, evaluate,
    save. Every input is checked before the model loads and every shape before any evaluation or
    calibration: a missing evaluation file fails in a second, not after the pruning.

    ``model``: a hub id, a local folder, a ``.gguf`` file or ``"smollm2-135m"`` (loaded with
    ``dtype`` on ``device``, as :func:`llmprune.load_model` does), or a ``(model, tokenizer)``
    pair already loaded (pruned in place). ``config``: a :class:`llmprune.PruneConfig` or a dict of
    its fields (None: wanda at 50%). ``evaluate``: an :class:`llmprune.EvalConfig`, dataset names
    (``"wikitext2"``, ``["wikitext2", "ptb"]``, in windows of the calibration's seqlen) or None.
    ``save``: a folder for the pruned checkpoint (``overwrite``: it may replace an earlier llmprune
    checkpoint); ``json``: a file for the result record. ``data_dir``: local copies of the
    datasets (default: ``$LLMPRUNE_DATA_DIR``, else the hub). ``dense``: evaluate the dense model
    first. ``device``: where blocks compute (default: cuda if available; a loaded model: where it
    lives). ``progress``: progress bars. ``export``: the checkpoint format (an ExportConfig).
    ``device_map``: accelerate's. ``echo``: called with each text the CLI prints (``echo=print``).

    Raises :class:`llmprune.LlmpruneError` for a bad input; :class:`llmprune.errors.OutputError`
    (an ``OSError`` with ``.result``) when an output could not be written (the others are).

    Example::

        >>> import llmprune
        >>> config = llmprune.PruneConfig(method="wanda", sparsity=0.5,
        ...                               calib=llmprune.CalibConfig(nsamples=16, seqlen=512))
        >>> result = llmprune.prune_model("smollm2-135m", config, evaluate="wikitext2",
        ...                               save="smollm2-wanda", data_dir="../shared/data")
        >>> result.dense_perplexity["wikitext2"].ppl < result.perplexity["wikitext2"].ppl
        True
    """
    return _prune(model, _as_config(config), evaluate, save=save, json_path=json, data_dir=data_dir,
                  dense=dense, overwrite=overwrite, device=device, dtype=dtype, progress=progress,
                  export=export, device_map=device_map, echo=echo)


def _prune(model: Any, config: PruneConfig, evaluate: Any, *, save: Any, json_path: Any, data_dir: Any,
           dense: bool, overwrite: bool, device: Any, dtype: Any, progress: bool, export: ExportConfig | None,
           device_map: Any, echo: Echo | None) -> PruneResult:
    eval_config = as_eval_config(evaluate, config.calib.seqlen)
    data_dir = check_data_dir(data_dir)
    pair = _as_pair(model)
    name = str(model) if pair is None else (model_source(pair[0]) or type(pair[0]).__name__)
    preflight(name if pair is None else None, config, eval_config, data_dir, save=save, json_path=json_path,
              overwrite=overwrite, device=device, dtype=dtype, device_map=device_map, export=export)
    if pair is None:
        loaded, tokenizer, store, compute = _load(name, config, dtype, device, device_map, progress)
    else:
        (loaded, tokenizer), store, compute = pair, None, device
    try:
        result = prune_loaded(loaded, tokenizer, config, eval_config, data_dir=data_dir, dense=dense,
                              progress=progress, device=compute, store=store, name=name, echo=echo)
        result.errors = write_results(result, save=save, json_path=json_path, overwrite=overwrite,
                                      export=export, store=store, echo=echo)
    finally:
        if store is not None:
            store.close()
    if result.errors:
        raise OutputError(result.errors, result)
    return result


def _load(name: str, config: PruneConfig, dtype: Any, device: Any, device_map: Any, progress: bool) -> tuple:
    """``(model, tokenizer, store, compute device)``: the model loaded whole, or with its blocks in an
    offload store (``config.offload``)."""
    from llmprune import models, offload

    with _library_bars(progress):
        if config.offload is None:
            model, tokenizer = models.load_model(name, dtype=dtype, device=device, seqlen=config.calib.seqlen,
                                                 device_map=device_map)
            # with a device map, each block computes where it lives
            return model, tokenizer, None, None if device_map else device
        # the blocks wait in CPU memory or on disk; each computes on the device in its turn
        model, tokenizer, store = offload.load_for_offload(name, config.offload, dtype=dtype, device=device,
                                                           folder=config.offload_dir,
                                                           seqlen=config.calib.seqlen)
        return model, tokenizer, store, store.compute


@contextlib.contextmanager
def _library_bars(progress: bool):
    """Without ``progress``, transformers' own bars (loading weights, de-quantizing a GGUF) are hidden
    too, for the load only (the setting is global: it is put back)."""
    import transformers

    logging = transformers.utils.logging
    hide = not progress and logging.is_progress_bar_enabled()
    if hide:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if hide:
            logging.enable_progress_bar()


def _whole_model(store: Any, eval_config: EvalConfig):
    """Around an evaluation of an offloaded model: the whole model on the compute device (it
    must fit), unless there is nothing to evaluate."""
    if store is None or not (eval_config.datasets or eval_config.zeroshot):
        return contextlib.nullcontext()
    return store.whole()


def prune_loaded(model: Any, tokenizer: Any, config: PruneConfig, eval_config: EvalConfig, *,
                 data_dir: Path | None = None, dense: bool = True, progress: bool = True, device: Any = None,
                 store: Any = None, name: str | None = None, echo: Echo | None = None) -> PruneResult:
    """:func:`prune_model` once the model is in memory and the inputs are checked: the shape checks
    (:func:`llmprune.plan`, the evaluation memory), the dense evaluation, pruning, the evaluation,
    the result record. Writes nothing."""
    from llmprune.engine import plan, run

    name = name or model_source(model) or type(model).__name__
    the_plan = plan(model, config, device)  # before any evaluation or calibration
    evaluation.check_eval_memory(model, eval_config)
    reference = evaluation.dense_reference(model, eval_config)  # its fingerprint, before any weight changes
    dense_ppl, dense_zs = {}, None
    if dense or reference is not None:  # the distances need the dense pass: it writes their caches
        recorded = dataclasses.replace(reference, record=True) if reference is not None else None
        # without ``dense``, only what the caches need: no zero-shot tasks on the dense model
        dense_config = eval_config if dense else dataclasses.replace(eval_config, zeroshot=())
        with _whole_model(store, eval_config):
            before = evaluation.evaluate(model, tokenizer, dense_config, data_dir, progress, dense=recorded)
        dense_ppl, dense_zs = before.perplexity, before.zeroshot
    report = run(the_plan, model, tokenizer, data_dir=data_dir, progress=progress, device=device,
                 model_name=name, store=store)
    if echo is not None:
        echo(report.table())
    with _whole_model(store, eval_config):
        after = evaluation.evaluate(model, tokenizer, eval_config, data_dir, progress, dense=reference)
    result = PruneResult(model=model, tokenizer=tokenizer, report=report, config=config,
                         eval_config=after.config,
                         perplexity=after.perplexity, zeroshot=after.zeroshot, generation=after.generation,
                         dense_perplexity=dense_ppl, dense_zeroshot=dense_zs)
    dense_section = {"perplexity": {k: v.to_dict() for k, v in dense_ppl.items()},
                     "zeroshot": dense_zs.to_dict() if dense_zs is not None else None}
    # a depth method is named by the blocks it removed (its config's sparsity may not have set them)
    run_name = (f"{config.method}-depth-{len(report.depth['removed_blocks'])}" if report.depth
                else f"{config.method}-{record_pattern(config)}-{config.sparsity:g}")
    result.record = result_record(name=run_name,
                                  model=name, config=config, eval_config=after.config,
                                  perplexity=after.perplexity,
                                  zeroshot=after.zeroshot, prune_report=report, dense=dense_section,
                                  generation=after.generation_dict())
    text = result.summary()
    if echo is not None and text:
        echo(text)
    return result


def write_results(result: PruneResult, *, save: str | os.PathLike | None = None,
                  json_path: str | os.PathLike | None = None, overwrite: bool = False,
                  export: ExportConfig | None = None, store: Any = None,
                  echo: Echo | None = None) -> list[str]:
    """Write the result record to ``json_path`` and the checkpoint to ``save`` (in ``export``'s
    format; an offloaded model's from its block files, one block in memory at a time). Sets
    ``result.json_path`` and ``result.saved``; returns the failures, one line each."""
    export = ExportConfig() if export is None else export
    writers: list[tuple[str, Callable[[], str]]] = []
    if json_path:
        def write_json() -> str:
            result.json_path = write_json_atomic(json_path, result.record)
            return f"wrote {result.json_path}"

        writers.append((str(json_path), write_json))
    if save:
        def write_checkpoint() -> str:
            from llmprune import export as formats

            if store is not None and store.mode == "disk":
                line = formats.save(result.model, result.tokenizer, save, result.record, overwrite, "shards",
                                    store=store)
            else:
                line = formats.save(result.model, result.tokenizer, save, result.record, overwrite,
                                    export.save_format, what="--save", quantize=result.config.quantize,
                                    dtype=export.save_dtype)
            result.saved = Path(save).expanduser().resolve()
            return line

        writers.append((f"the checkpoint {save}", write_checkpoint))
    return write_outputs(writers, echo)


def write_outputs(writers: list[tuple[str, Callable[[], str]]], echo: Echo | None = None,
                  warn: Echo | None = None) -> list[str]:
    """Run every writer even when one fails (a late failure must not lose the other results);
    ``echo`` gets each writer's line, ``warn`` each failure's. Returns the failures, one line each."""
    failed = []
    for what, write in writers:
        try:
            line = write()
        except (OSError, LlmpruneError) as exc:
            failed.append(f"could not write {what}: {exc}")
            if warn is not None:
                warn(failed[-1])
            continue
        if echo is not None:
            echo(line)
    return failed
