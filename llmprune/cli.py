"""Command line: parse flags into configs, call the library, print. Nothing else lives here.

Flag defaults and help texts come from the config dataclasses (``llmprune.config``), so
``llmprune prune --help`` and ``PruneConfig()`` cannot disagree. User errors
(``LlmpruneError``, bad flags) print one line on stderr and exit with code 2, found before the
model loads where the inputs alone tell, right after it where the model's shapes are needed.
A failure to write an output after the work is done prints one line and exits with code 1,
once every other output has been written; so does any other failure of the machine (a full
disk, a file-size limit, a read-only folder). Ctrl-C exits with 130 and SIGTERM with 143, after
the cleanup code has run, with one line and no traceback, from the first import on.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

try:  # what these import loads for seconds on a busy machine: Ctrl-C then is one line, not a traceback
    from llmprune import __version__
    from llmprune.config import (
        EXECUTORS,
        RECOVER_METHODS,
        CalibConfig,
        EvalConfig,
        ExportConfig,
        Pattern,
        PruneConfig,
        RecoverConfig,
        SlurmConfig,
        field_default,
        field_help,
    )
    from llmprune.errors import LlmpruneError, OutputError
    from llmprune.evaluation import (
        check_dense_source,
        check_eval_memory,
        dense_caches_ready,
        dense_reference,
        evaluate,
        llamacpp,
        needs_dense,
    )
    from llmprune.executors import check_executor, run_recipe_submitit
    from llmprune.io import (
        check_apart,
        check_output_file,
        check_save_dir,
        exit_code,
        save_pruned,
        signals_raise,
        write_json_atomic,
    )
    from llmprune.jobs import list_runs
    from llmprune.methods import BLOCK_STEPS, METHODS, RECONSTRUCTIONS
    from llmprune.pipeline import (
        available,
        distance_line,
        generation_line,
        ppl_table,
        prune_model,
        write_outputs,
    )
    from llmprune.preflight import (
        check_data_dir,
        check_export,
        check_gguf_export,
        check_inputs,
        check_shapes_early,
        model_path,
    )
    from llmprune.recipes import load_recipe
    from llmprune.registry import option_fields
    from llmprune.report import ReportWarning, write_report
    from llmprune.results import result_record
except KeyboardInterrupt:
    sys.stderr.write("llmprune: interrupted\n")
    raise SystemExit(130) from None

EXIT_USER_ERROR = 2
_SLURM_FLAGS = ("partition", "gpus_per_job", "time", "mem_gb", "cpus_per_task", "array_parallelism")
EXIT_OUTPUT_FAILED = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        raise LlmpruneError(f"{message} (see `{self.prog} --help`)")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _shown(value) -> str:
    if isinstance(value, tuple):
        return ",".join(value) if value else "none"
    return str(value)


def _field(p: argparse.ArgumentParser, cls: type, name: str, *flags: str, default_label: str | None = None,
           **kw):
    """Add a flag whose default and help come from field ``name`` of config class ``cls``."""
    default = field_default(cls, name)
    if isinstance(default, Pattern):
        default = str(default)
    label = default_label if default_label is not None else _shown(default)
    if isinstance(default, bool):
        kw.setdefault("action", "store_true")
    elif isinstance(default, tuple):
        kw.setdefault("type", _csv)
    elif default is not None and not isinstance(default, str):
        kw.setdefault("type", type(default))
    kw.setdefault("default", default)
    p.add_argument(*flags, help=f"{field_help(cls, name)} (default: {label})", **kw)


def _option_flag(p: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    """``--name-with-dashes`` for a registered option (a spec's options field), typed by its default."""
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    kw: dict = {"default": default}
    if isinstance(default, bool):
        kw["action"] = "store_true"
    elif isinstance(default, tuple):
        kw["type"] = _csv
    elif default is not None and not isinstance(default, str):
        kw["type"] = type(default)
    elif default is None:
        kw["type"] = int if "int" in str(f.type) else float if "float" in str(f.type) else str
    p.add_argument("--" + f.name.replace("_", "-"),
                   help=f"{f.metadata.get('help', '')} (default: {_shown(default)})", **kw)


def _add_model(p: argparse.ArgumentParser, model_help: str | None = None) -> None:
    if model_help:  # a model the command cannot default (llmprune recover's pruned student)
        p.add_argument("--model", required=True, help=model_help)
    else:
        p.add_argument("--model", default="smollm2-135m",
                       help="hub id, local HF directory, .gguf file, or 'smollm2-135m' (default: the bundled "
                            "model)")
    p.add_argument("--dtype", default="float32", help="float32 (default on CPU), bfloat16, float16 or auto")
    p.add_argument("--device", default=None,
                   help="compute device, e.g. cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--device-map", default=None,
                   help="accelerate device map for models that do not fit one device, e.g. 'auto' "
                        "(multi-GPU / CPU offload); pruning then runs each block where it lives")


def _add_eval(p: argparse.ArgumentParser, dataset_flag: str, training: bool = False) -> None:
    """The evaluation flags; with ``training`` (llmprune recover), --seqlen and --batch-size size
    the training windows, so evaluation's are --eval-seqlen and --eval-batch-size."""
    _field(p, EvalConfig, "datasets", dataset_flag, metavar="NAMES", default=None,
           default_label="wikitext2, or none when --zeroshot is given")
    if training:
        _field(p, EvalConfig, "seqlen", "--eval-seqlen", dest="eval_seqlen", type=int)
    else:
        _field(p, CalibConfig, "seqlen", "--seqlen", type=int)
    p.add_argument("--data-dir", default=None,
                   help="folder with local copies of the datasets (default: "
                        "$LLMPRUNE_DATA_DIR, else the hub)")
    _field(p, EvalConfig, "max_windows", "--max-windows", type=int)
    if training:
        _field(p, EvalConfig, "batch_size", "--eval-batch-size", dest="eval_batch_size")
    else:
        _field(p, EvalConfig, "batch_size", "--batch-size")
    _field(p, EvalConfig, "zeroshot", "--zeroshot", metavar="TASKS")
    _field(p, EvalConfig, "limit", "--limit", type=int)
    _field(p, EvalConfig, "kl", "--eval-kl", dest="kl")
    _field(p, EvalConfig, "kl_topk", "--kl-topk", metavar="K")
    _field(p, EvalConfig, "kl_exact", "--kl-exact")
    _field(p, EvalConfig, "kl_cache", "--kl-cache", metavar="DIR", type=str,
           default_label="$LLMPRUNE_CACHE_DIR, else ~/.cache/llmprune")
    _field(p, EvalConfig, "generate", "--generate", metavar="N")
    _field(p, EvalConfig, "generate_tokens", "--generate-tokens", metavar="T")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


# PruneConfig's own fields that are flags of `llmprune prune`, named as the fields
_CORE_FIELDS = ("method", "sparsity", "pattern", "true_sequential", "include", "exclude", "skip_attention",
                "skip_mlp", "allocation", "permute", "refine", "reconstruct", "block_reconstruct", "quantize",
                "offload", "offload_dir", "activations")
_CORE_KW = {"method": {"metavar": "|".join(METHODS.names())}, "sparsity": {"type": float},
            "include": {"metavar": "GLOBS"}, "exclude": {"metavar": "GLOBS"},
            "quantize": {"type": str}, "refine": {"type": str},
            # --reconstruct alone is the OBS sweep, as before there was a choice
            "reconstruct": {"type": str, "nargs": "?", "const": "obs", "default_label": "none",
                            "metavar": "|".join(RECONSTRUCTIONS.names())},
            "block_reconstruct": {"type": str, "default_label": "none",
                                  "metavar": "|".join(BLOCK_STEPS.names())},
            "offload": {"type": str, "metavar": "cpu|disk", "default_label": "none"},
            "offload_dir": {"type": str, "metavar": "DIR", "default_label": "none"},
            "activations": {"type": str, "metavar": "cpu", "default_label": "the compute device"}}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmprune", description="One-shot pruning of open LLMs, unstructured, N:M or "
                     f"structured. {available()}.")
    parser.add_argument("--version", action="version", version=f"llmprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ev = sub.add_parser("eval", help="perplexity / zero-shot accuracy of a model")
    _add_model(ev)
    ev.add_argument("--dense", default=None, metavar="MODEL",
                    help="the dense model --model was pruned from, for --eval-kl and --generate: hub id, "
                         "directory, .gguf file or 'smollm2-135m'")
    _add_eval(ev, "--dataset")

    _add_prune_command(sub)
    _add_recover_command(sub)
    _add_run_command(sub)
    _add_model_file_commands(sub)
    _add_llamacpp_command(sub)

    rp = sub.add_parser("report", help="tables and plots from a results folder")
    rp.add_argument("results", help="folder of result JSON files")
    return parser


def _add_prune_command(sub) -> None:
    """``llmprune prune``: the core configs' fields, every registered component's options."""
    pr = sub.add_parser("prune", help="prune a model, then evaluate dense and pruned")
    _add_model(pr)
    for name in _CORE_FIELDS:  # --method, --sparsity, ..., --offload-dir
        _field(pr, PruneConfig, name, "--" + name.replace("_", "-"), **_CORE_KW.get(name, {}))
    _field(pr, CalibConfig, "dataset", "--calib")
    _field(pr, CalibConfig, "nsamples", "--nsamples")
    _field(pr, CalibConfig, "seed", "--seed")
    _field(pr, CalibConfig, "batch_size", "--calib-batch-size")
    for f in option_fields().values():  # every registered method's, allocation's and step's knobs
        _option_flag(pr, f)
    _field(pr, ExportConfig, "save_format", "--save-format")
    _field(pr, ExportConfig, "save_dtype", "--save-dtype", type=str)
    pr.add_argument("--skip-dense", action="store_true", help="do not evaluate the dense model first")
    pr.add_argument("--save", default=None, metavar="DIR", help="save the pruned model as an HF checkpoint")
    pr.add_argument("--overwrite", action="store_true",
                    help="let --save replace an earlier llmprune checkpoint (never a folder "
                         "with other files)")
    _add_eval(pr, "--eval")


def _add_recover_command(sub) -> None:
    """``llmprune recover``: the RecoverConfig fields, the teacher, resumable checkpoints."""
    rc = sub.add_parser("recover", help="train a pruned model towards its dense original, keeping its zeros "
                                        "(kd or LoRA)")
    _add_model(rc, model_help="the pruned model (student): local HF directory, e.g. a `llmprune prune "
                              "--save` folder")
    rc.add_argument("--teacher", required=True,
                    help="the dense model it was pruned from: hub id, directory, .gguf file or "
                         "'smollm2-135m'")
    for f in dataclasses.fields(RecoverConfig):
        _field(rc, RecoverConfig, f.name, "--" + f.name.replace("_", "-"),
               **{"lr": {"type": float, "default_label": "the method's"}, "max_minutes": {"type": float},
                  "max_cpu_minutes": {"type": float}, "method": {"choices": RECOVER_METHODS},
                  "lora_targets": {"metavar": "NAMES"}}.get(f.name, {}))
    rc.add_argument("--skip-dense", action="store_true",
                    help="do not evaluate the teacher (the dense baseline)")
    rc.add_argument("--save", default=None, metavar="DIR",
                    help="save the recovered model as an HF checkpoint; resumable checkpoints go there while "
                         "it trains")
    rc.add_argument("--overwrite", action="store_true",
                    help="let --save replace an earlier llmprune checkpoint (never a folder "
                         "with other files)")
    rc.add_argument("--resume", action="store_true",
                    help="continue the interrupted run whose checkpoint is in --save")
    _add_eval(rc, "--eval", training=True)


def _add_run_command(sub) -> None:
    """``llmprune run``: a recipe, its output folder and the executor with its SLURM sizes."""
    rn = sub.add_parser("run", help="run every run of a YAML recipe (resumable), then write the report",
                        description="Run every run of a YAML recipe (docs/recipes.md describes the "
                                    "format), one result JSON per run in --out; runs whose result is "
                                    "already there are skipped. --list shows the runs first.")
    rn.add_argument("recipe", help="recipe YAML file, e.g. recipes/smollm2_cpu.yaml")
    rn.add_argument("--list", action="store_true",
                    help="print the recipe's runs, dense baselines included, and what each one is (with "
                         "--out: whether its result is there and still valid), then exit; loads no model")
    rn.add_argument("--out", default=None, help="results folder (default: results/NAME for recipe NAME.yaml)")
    rn.add_argument("--data-dir", default=None, help="folder with local copies of the datasets")
    rn.add_argument("--only", type=_csv, default=None, metavar="NAMES",
                    help="run only these runs: a comma-separated list of run names as --list prints them, "
                         "e.g. --only dense,wanda-2:4 (dense baselines run only when named)")
    rn.add_argument("--force", action="store_true",
                    help="reuse an output folder that holds another recipe's results")
    rn.add_argument("--no-progress", action="store_true", help="hide progress bars")
    rn.add_argument("--executor", default="local", choices=EXECUTORS,
                    help="local: every run in this process (default); slurm: one SLURM job per run through "
                         "submitit (a job array); submitit-local: one local process per run through submitit")
    for name in _SLURM_FLAGS:
        _field(rn, SlurmConfig, name, "--" + name.replace("_", "-"), default=None,
               type=str if name == "partition" else int,
               default_label=f"the recipe's slurm: block, else {_shown(field_default(SlurmConfig, name))}")


def _add_model_file_commands(sub) -> None:
    """``llmprune inspect``, ``compress`` and ``export``: one model in, a description or a file out."""
    ins = sub.add_parser("inspect", help="what llmprune finds in a model: blocks, prunable layers, groups, "
                                         "stages, experts")
    ins.add_argument("model", help="hub id, local HF directory, .gguf file, or 'smollm2-135m'")
    ins.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or auto")
    ins.add_argument("--device", default="cpu", help="where the discovery forward runs (default: cpu)")

    co = sub.add_parser("compress",
                        help="re-write a (pruned) checkpoint as bitmask + nonzero values, optionally int8")
    co.add_argument("src", help="hub id, local HF or compressed directory, .gguf file, or 'smollm2-135m'")
    co.add_argument("dst", help="new folder for the compressed checkpoint")
    _field(co, PruneConfig, "quantize", "--quantize", type=str)
    _field(co, ExportConfig, "save_format", "--format", dest="save_format", default="compressed")
    _field(co, ExportConfig, "save_dtype", "--save-dtype", type=str)
    co.add_argument("--overwrite", action="store_true", help="replace an earlier llmprune checkpoint at DST")
    co.add_argument("--dtype", default="auto", help="dtype to load SRC in (default: auto, as saved)")

    ex = sub.add_parser("export", help="write a model as GGUF (llama.cpp's LLaMA layout)")
    ex.add_argument("model", help="hub id, local HF or compressed directory, .gguf file, or 'smollm2-135m'")
    ex.add_argument("out", help="the .gguf file to write")
    _field(ex, ExportConfig, "gguf_type", "--type", dest="gguf_type")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing file at OUT")


def _add_llamacpp_command(sub) -> None:
    """``llmprune llamacpp``: a GGUF file run in llama.cpp itself (the llamacpp extra)."""
    lc = sub.add_parser("llamacpp", help="perplexity (and tokens/s) of a .gguf file in llama.cpp, on the "
                                         "windows `llmprune eval` scores (needs llmprune[llamacpp])")
    lc.add_argument("gguf", help="the .gguf file, e.g. one written by `llmprune export`")
    lc.add_argument("--tokenizer", default=None, metavar="MODEL",
                    help="tokenize with this model's tokenizer: hub id, HF directory, .gguf file or "
                         "'smollm2-135m' (default: the GGUF's own)")
    lc.add_argument("--dataset", default="wikitext2", help="wikitext2 (default), ptb, c4 or a local file")
    lc.add_argument("--seqlen", type=int, default=2048,
                    help="window length = llama.cpp's n_ctx (default: 2048)")
    lc.add_argument("--max-windows", type=int, default=None, help="only the first K windows (default: all)")
    lc.add_argument("--data-dir", default=None,
                    help="folder with local copies of the datasets (default: $LLMPRUNE_DATA_DIR, else the "
                         "hub)")
    lc.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: every core)")
    lc.add_argument("--speed", action="store_true",
                    help="also prefill and decode tokens/s and peak memory, in a fresh process")
    lc.add_argument("--prompt-tokens", type=int, default=512, help="--speed's prompt (default: 512)")
    lc.add_argument("--gen-tokens", type=int, default=64, help="--speed's generated tokens (default: 64)")
    lc.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    lc.add_argument("--no-progress", action="store_true", help="hide progress bars")


# ---------------------------------------------------------------- helpers


def _data_dir(arg: str | None):
    return check_data_dir(arg)


def _eval_config(args, datasets) -> EvalConfig:
    training = "eval_seqlen" in vars(args)  # llmprune recover: --seqlen/--batch-size are the training's
    return EvalConfig(datasets=datasets or (), seqlen=args.eval_seqlen if training else args.seqlen,
                      batch_size=args.eval_batch_size if training else args.batch_size,
                      max_windows=args.max_windows, zeroshot=args.zeroshot, limit=args.limit,
                      kl=args.kl, kl_topk=args.kl_topk, kl_exact=args.kl_exact, kl_cache=args.kl_cache,
                      generate=args.generate, generate_tokens=args.generate_tokens)


def _check_inputs(eval_config: EvalConfig, data_dir, args, paths: tuple = ()) -> None:
    """:func:`llmprune.preflight.check_inputs` with the command's flags (``llmprune eval`` and
    ``recover``; ``prune`` goes through :func:`llmprune.prune_model`, which calls the same)."""
    check_inputs(eval_config, data_dir, model=args.model, dtype=args.dtype, device=args.device,
                 device_map=args.device_map, json_path=args.json, save=getattr(args, "save", None),
                 overwrite=getattr(args, "overwrite", False),
                 data_flag="--dataset" if args.command == "eval" else "--eval", paths=paths)


def _check_shapes_early(args, eval_config: EvalConfig, seqlens: tuple = ()) -> None:
    """:func:`llmprune.preflight.check_shapes_early` with the command's flags."""
    check_shapes_early(args.model, eval_config, dtype=args.dtype, device=args.device,
                       device_map=args.device_map, seqlens=seqlens)


def _load(args, name=None):
    from llmprune.models import load_model

    return load_model(name or args.model, dtype=args.dtype, device=args.device, seqlen=args.seqlen,
                      device_map=args.device_map)


def _quiet_libraries(progress: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        if not progress:  # transformers 5 draws a bar while loading weights
            transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _write_outputs(writers: list[tuple[str, object]]) -> int:
    """Run every writer even when one fails (a late failure must not lose the other results);
    each failure is one line on stderr. Returns the exit code."""
    failed = write_outputs(writers, echo=print, warn=lambda line: print(f"llmprune: error: {line}",
                                                                        file=sys.stderr))
    return EXIT_OUTPUT_FAILED if failed else 0


def _json_writer(path: str, record: dict):
    return lambda: f"wrote {write_json_atomic(path, record)}"


# ---------------------------------------------------------------- commands


def cmd_eval(args) -> int:
    datasets = args.dataset if args.dataset is not None else (() if args.zeroshot else ("wikitext2",))
    eval_config = _eval_config(args, datasets)  # before torch loads (what follows imports it)
    data_dir = _data_dir(args.data_dir)
    compare = needs_dense(eval_config)
    if compare and args.dense is None:
        raise LlmpruneError("--eval-kl and --generate compare --model with the dense model it was pruned "
                            "from: give that model with --dense MODEL")
    if args.dense is not None and not compare:
        raise LlmpruneError("--dense is the reference of --eval-kl and --generate: add one of them, or drop "
                            "--dense")
    if compare:
        check_dense_source(args.dense, "--dense")
    _check_inputs(eval_config, data_dir, args, paths=(("--dense", model_path(args.dense), "input"),)
                  if compare else ())
    _check_shapes_early(args, eval_config)
    progress = not args.no_progress
    reference = None
    if compare:  # the dense side first: its caches, then (unless --kl-exact) it leaves memory
        dense_model, dense_tok = _load(args, args.dense)
        reference = dense_reference(dense_model, eval_config, keep=eval_config.kl_exact)
        setting = dataclasses.replace(eval_config, zeroshot=())
        if not dense_caches_ready(dense_model, dense_tok, setting, reference, data_dir):  # else: reused
            recorded = dataclasses.replace(reference, record=True)
            evaluate(dense_model, dense_tok, setting, data_dir, progress, dense=recorded)
        del dense_model
    model, tokenizer = _load(args)
    if compare and _vocabulary(tokenizer) != _vocabulary(dense_tok):
        raise LlmpruneError(f"--model and --dense {args.dense} have different tokenizers: the KL compares "
                            "next-token distributions over one vocabulary")
    check_eval_memory(model, eval_config)
    result = evaluate(model, tokenizer, eval_config, data_dir, progress, dense=reference)
    eval_config, ppl, zs = result.config, result.perplexity, result.zeroshot
    if ppl:
        print(ppl_table([(args.model, name, r) for name, r in ppl.items()]))
        for name, r in ppl.items():
            if r.distance is not None:
                print(f"{name}: {distance_line(r.distance)}")
    if result.generation is not None:
        print(generation_line(result.generation))
    if zs is not None:
        print(zs.markdown_table())
    if not args.json:
        return 0
    record = result_record(name="dense" if not compare else Path(str(args.model)).name, model=args.model,
                           eval_config=eval_config, perplexity=ppl, zeroshot=zs,
                           generation=result.generation_dict())
    if compare:
        record["dense_model"] = args.dense
    return _write_outputs([(args.json, _json_writer(args.json, record))])


def _vocabulary(tokenizer) -> tuple:
    probe = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("the model"))
    return (len(tokenizer), tokenizer.eos_token_id, probe)


def cmd_prune(args) -> int:
    # the configs first: what they refuse is refused before torch loads (seconds on a busy machine)
    calib = CalibConfig(dataset=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                        batch_size=args.calib_batch_size)
    config = PruneConfig(calib=calib, **{name: getattr(args, name) for name in _CORE_FIELDS},
                         options={name: getattr(args, name) for name in option_fields()})
    eval_config = _eval_config(args, args.eval if args.eval is not None else ("wikitext2",))
    data_dir = _data_dir(args.data_dir)
    export = _export_config(args, args.save, "--save", config.quantize)
    try:  # the library's one call: the same checks, in the same order, as any Python caller gets
        prune_model(args.model, config, eval_config, save=args.save, json=args.json, data_dir=data_dir,
                    dense=not args.skip_dense, overwrite=args.overwrite, device=args.device, dtype=args.dtype,
                    progress=not args.no_progress, export=export, device_map=args.device_map, echo=print)
    except OutputError as exc:  # the other outputs are written: one line per failure
        for line in exc.errors:
            print(f"llmprune: error: {line}", file=sys.stderr)
        return EXIT_OUTPUT_FAILED
    return 0


def _recover_inputs(args, config: RecoverConfig) -> tuple:
    """What ``llmprune recover`` reads besides --model, for :func:`llmprune.io.check_apart`."""
    data = config.data if Path(config.data).expanduser().is_file() else None
    return (("--teacher", model_path(args.teacher), "input"), ("--data", data, "input"))


def _recover_preflight(args, config: RecoverConfig, eval_config: EvalConfig, data_dir) -> tuple:
    """What ``llmprune recover`` checks before any model loads. Returns the record of a checkpoint
    already in --save (or None), the pruned model's record and its PruneConfig (or None)."""
    from llmprune.recover import check_inputs, check_resume, pruning_config, pruning_record

    earlier = pruning_record(args.save) if args.save else None  # a checkpoint already in --save
    if args.resume:
        if not args.save:
            raise LlmpruneError("--resume continues the run whose checkpoint is in --save DIR: give --save")
        check_resume(args.save, config)
    elif not args.overwrite and isinstance((earlier or {}).get("recover"), dict) \
            and not earlier["recover"].get("complete"):
        raise LlmpruneError(f"{args.save} holds an unfinished recovery: add --resume to continue it, or "
                            "--overwrite to start again")
    pruned = pruning_record(args.model) or {}
    pruned_with = pruning_config(pruned)
    check_inputs(config, data_dir, eval_config.datasets, pruned_with)
    args.overwrite = args.overwrite or args.resume  # resuming replaces our own checkpoint
    _check_inputs(eval_config, data_dir, args, paths=_recover_inputs(args, config))  # the teacher's name too
    _check_shapes_early(args, eval_config, seqlens=(config.seqlen,))
    return earlier, pruned, pruned_with


def _recover_noting_checkpoint(args, model, teacher, tokenizer, config: RecoverConfig,
                               eval_config: EvalConfig, data_dir, progress: bool, dense: dict | None):
    """:func:`llmprune.recover.recover`, its warnings one line each; on Ctrl-C, the line saying
    which step the checkpoint in --save holds."""
    from llmprune.recover import RecoverWarning, pruning_record, recover

    with _one_line_warnings(RecoverWarning):
        try:
            return recover(model, teacher, tokenizer, config, data_dir=data_dir, progress=progress,
                           eval_config=eval_config, checkpoint_dir=args.save, resume=args.resume,
                           metadata={"model": args.model, "teacher": args.teacher, "dense": dense})
        except KeyboardInterrupt:
            done = ((pruning_record(args.save) or {}).get("recover") or {}) if args.save else {}
            if done.get("steps_done"):
                print(f"llmprune: {args.save} holds the checkpoint of step {done['steps_done']}: "
                      "run the same command with --resume to continue", file=sys.stderr)
            raise


def _print_recovery(label: str, report, after: dict, dense: dict | None) -> None:
    """The training in one line, then per dataset: dense, pruned and recovered perplexity."""
    from llmprune.recover import gap_closed

    print(f"{label}: {report.steps_done} steps, {report.tokens} tokens, {report.seconds / 60:.1f} min of "
          f"training ({report.tokens / max(report.seconds, 1e-9):.0f} tokens/s; stopped by "
          f"{report.stopped}); sparsity {report.sparsity_before:.4%} -> {report.sparsity_after:.4%}")
    for name, result in (after.get("perplexity") or {}).items():
        before = report.perplexity_before.get(name, {}).get("ppl")
        base = ((dense or {}).get("perplexity") or {}).get(name, {}).get("ppl")
        closed = gap_closed(base, before, result["ppl"])
        print(f"{name}: " + (f"dense {base:.3f} | " if base is not None else "") +
              (f"pruned {before:.3f} -> " if before is not None else "") + f"recovered {result['ppl']:.3f}" +
              (f" (gap to dense closed: {closed:.1%})" if closed is not None else ""))


def cmd_recover(args) -> int:
    from llmprune.models import load_model, resolve_seqlen
    from llmprune.recover import check_teacher

    data_dir = _data_dir(args.data_dir)
    config = RecoverConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RecoverConfig)})
    eval_config = _eval_config(args, args.eval if args.eval is not None else ("wikitext2",))
    if needs_dense(eval_config):
        raise LlmpruneError("llmprune recover does not measure --eval-kl or --generate yet: measure the "
                            "recovered checkpoint with `llmprune eval --model DIR --dense TEACHER --eval-kl`")
    earlier, pruned, pruned_with = _recover_preflight(args, config, eval_config, data_dir)
    progress = not args.no_progress
    load = dict(dtype=args.dtype, device=args.device, seqlen=args.eval_seqlen, device_map=args.device_map)
    model, tokenizer = load_model(args.model, **load)
    teacher, _ = load_model(args.teacher, **load)
    check_teacher(model, teacher)
    check_eval_memory(model, eval_config)

    dense = (earlier or {}).get("dense") if args.resume else None
    if dense is None and not args.skip_dense and (eval_config.datasets or eval_config.zeroshot):
        before = evaluate(teacher, tokenizer, eval_config, data_dir, progress)
        dense_ppl, dense_zs = before.perplexity, before.zeroshot
        dense = {"perplexity": {k: v.to_dict() for k, v in dense_ppl.items()},
                 "zeroshot": dense_zs.to_dict() if dense_zs is not None else None}
    report = _recover_noting_checkpoint(args, model, teacher, tokenizer, config, eval_config, data_dir,
                                        progress, dense)
    del teacher

    after = report.curve[-1] if report.curve else {}
    label = f"{pruned.get('name') or Path(args.model).name}+{config.method}"
    _print_recovery(label, report, after, dense)
    resolved = dataclasses.replace(eval_config, seqlen=resolve_seqlen(model, eval_config.seqlen))
    record = result_record(name=label, model=args.model, config=pruned_with, eval_config=resolved,
                           perplexity=after.get("perplexity"), zeroshot=after.get("zeroshot"),
                           prune_report=pruned.get("prune"), dense=dense,
                           recover=report.to_dict() | {"teacher": args.teacher, "complete": True})
    writers = []
    if args.json:
        writers.append((args.json, _json_writer(args.json, record)))
    if args.save:
        def save():
            saved = save_pruned(model, tokenizer, args.save, record, overwrite=True)
            return f"saved the recovered model to {saved}"

        writers.append((f"the checkpoint {args.save}", save))
    return _write_outputs(writers)


def cmd_run(args) -> int:
    if args.list:  # reads the recipe and the --out folder's JSON only: no torch, no model
        lines = list_runs(args.recipe, args.out, only=args.only)
        try:
            print("\n".join(lines), flush=True)
        except BrokenPipeError:  # `llmprune run R --list | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    given = {name: getattr(args, name) for name in _SLURM_FLAGS if getattr(args, name) is not None}
    check_executor(args.executor, slurm_options_given=bool(given))
    data_dir = _data_dir(args.data_dir)
    out = args.out or Path("results") / Path(args.recipe).stem
    with _one_line_warnings(ReportWarning):  # the report at the end leaves out damaged files, one line each
        if args.executor == "local":
            from llmprune.runner import run_recipe

            written = run_recipe(args.recipe, out, data_dir=data_dir, only=args.only, force=args.force,
                                 progress=not args.no_progress)
        else:
            slurm = dataclasses.replace(load_recipe(args.recipe).slurm or SlurmConfig(), **given)
            written = run_recipe_submitit(args.recipe, out, data_dir=data_dir, only=args.only,
                                          force=args.force, executor=args.executor, slurm=slurm,
                                          progress=not args.no_progress)
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_inspect(args) -> int:
    from llmprune.models import describe, load_model

    model, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    print(describe(model))
    return 0


@contextlib.contextmanager
def _one_line_warnings(category: type):
    """Warnings of ``category`` as one line each on stderr (no source line), every time."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, category, *rest, **kw: print(
            f"llmprune: warning: {message}", file=sys.stderr)
        warnings.simplefilter("always", category)
        yield


def cmd_report(args) -> int:
    with _one_line_warnings(ReportWarning):
        try:
            outputs = write_report(args.results)
        except OSError as exc:  # a read-only or full folder: the results themselves are untouched
            print(f"llmprune: error: could not write the report into {args.results}: {exc}", file=sys.stderr)
            return EXIT_OUTPUT_FAILED
    for path in outputs.values():
        print(f"wrote {path}")
    return 0


def _export_config(args, target: str | None, flag: str, quantize: str | None) -> ExportConfig:
    """The checkpoint format flags, checked before the model loads."""
    export = ExportConfig(save_format=args.save_format, save_dtype=args.save_dtype)
    if target is None and (export.save_format != "dense" or export.save_dtype is not None):
        raise LlmpruneError(f"--save-format/--save-dtype say how to write {flag}: give {flag} DIR too")
    check_export(export, quantize)
    return export


def _save(model, tokenizer, path, record: dict, overwrite: bool, export: ExportConfig, quantize: str | None,
          what: str = "--save") -> str:
    """Write the checkpoint in the chosen format (the format registry's save); the line to print."""
    from llmprune.export import save

    return save(model, tokenizer, path, record, overwrite, export.save_format, what=what, quantize=quantize,
                dtype=export.save_dtype)


def cmd_compress(args) -> int:
    from llmprune.models import load_model

    quantize = PruneConfig(quantize=args.quantize).quantize
    export = _export_config(args, args.dst, "DST", quantize)
    if export.save_format == "dense":
        raise LlmpruneError("--format dense is what `llmprune compress` undoes: use compressed or "
                            "compressed-tensors")
    check_apart([("SRC", model_path(args.src), "input"), ("DST", args.dst, "folder")])
    check_save_dir(args.dst, args.overwrite, "DST")
    model, tokenizer = load_model(args.src, dtype=args.dtype)
    try:
        record = json.loads((Path(args.src) / "llmprune.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    record = {k: v for k, v in record.items() if k != "files"} if isinstance(record, dict) else {}
    record["compressed_from"] = str(args.src)
    return _write_outputs([(f"the checkpoint {args.dst}",
                            lambda: _save(model, tokenizer, args.dst, record, args.overwrite, export,
                                          quantize, "DST"))])


def cmd_export(args) -> int:
    from llmprune.export.gguf import export_gguf
    from llmprune.models import load_model, source_gguf

    export = ExportConfig(gguf_type=args.gguf_type)
    out = check_output_file(args.out, "OUT")
    if out.suffix != ".gguf":
        raise LlmpruneError(f"OUT {out} must end in .gguf (readers find GGUF files by that name)")
    check_apart([("MODEL", model_path(args.model), "input"), ("OUT", out, "file")])
    if out.exists() and not args.overwrite:
        raise LlmpruneError(f"{out} exists: give a new file name or --overwrite")
    check_gguf_export(args.model, export.gguf_type)  # the type's package, family and widths: before the load
    model, tokenizer = load_model(args.model, dtype="float32")
    try:
        info = export_gguf(model, tokenizer, out, export.gguf_type, source_gguf(args.model))
    except OSError as exc:  # a full disk, a file-size limit: OUT is left as it was
        why = (f"{exc}" if exc.errno is not None
               else f"{exc} (a short write: the disk is full or a file-size limit hit)")
        print(f"llmprune: error: could not write {out}: {why}", file=sys.stderr)
        return EXIT_OUTPUT_FAILED
    arch = info["architecture"]
    per_block = "" if arch == "llama" else f"; architecture {arch} (per-block widths: llama.cpp reads it, " \
                                           "transformers does not)"
    print(f"wrote {info['path']}: {info['bytes']:,} bytes, {export.gguf_type} "
          f"({', '.join(f'{n} {t}' for t, n in sorted(info['tensor_types'].items()))} tensors), tokenizer "
          f"{info['tokenizer']}{per_block}")
    return 0


def cmd_llamacpp(args) -> int:
    if args.json:
        check_output_file(args.json)
    data_dir = _data_dir(args.data_dir)
    speed_tokens = (args.prompt_tokens, args.gen_tokens) if args.speed else None
    llamacpp.check_run(args.gguf, args.seqlen, speed_tokens, args.threads, args.max_windows)  # before loading
    ppl = llamacpp.evaluate_gguf(args.gguf, args.tokenizer, args.dataset, args.seqlen, args.max_windows,
                                 data_dir, args.threads, progress=not args.no_progress)
    print(f"llama.cpp {ppl.dataset} ppl {ppl.ppl:.4f} ({ppl.windows} windows x {ppl.seqlen} tokens, "
          f"threads {ppl.threads}, {ppl.seconds:.1f} s)")
    speed = None
    if args.speed:
        speed = llamacpp.speed_in_child(args.gguf, args.threads, args.prompt_tokens, args.gen_tokens)
        print(f"llama.cpp speed (threads {speed.threads}, median of {speed.repeats}): prefill "
              f"{speed.prefill_tokens_per_s:.1f} tok/s ({speed.prompt_tokens} tokens), decode "
              f"{speed.decode_tokens_per_s:.1f} tok/s ({speed.gen_tokens} tokens), peak RSS "
              f"{speed.peak_rss_mib:.0f} MiB")
    if not args.json:
        return 0
    record = llamacpp.result_record(args.gguf, args.tokenizer, ppl, speed)
    return _write_outputs([(args.json, _json_writer(args.json, record))])


COMMANDS = {"eval": cmd_eval, "prune": cmd_prune, "recover": cmd_recover, "run": cmd_run,
            "inspect": cmd_inspect, "report": cmd_report, "compress": cmd_compress, "export": cmd_export,
            "llamacpp": cmd_llamacpp}


_MESSAGE_LIMIT = 2000  # characters of an error shown; a message built from a huge value stays readable


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + " …"


def main(argv: list[str] | None = None) -> int:
    try:
        with signals_raise():  # SIGTERM, SIGHUP: cleanup code runs as for Ctrl-C, then 128 + signal
            args = build_parser().parse_args(argv)
            # report and `run --list` read files only: they must not need transformers
            if args.command != "report" and not getattr(args, "list", False):
                _quiet_libraries(not getattr(args, "no_progress", False))
            return COMMANDS[args.command](args)
    except LlmpruneError as exc:
        print(f"llmprune: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # the machine, not the input: a full disk, a file-size limit, a read-only folder
        print(f"llmprune: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_OUTPUT_FAILED
    except KeyboardInterrupt as exc:
        code = exit_code(exc)
        print("llmprune: interrupted" if code == 130 else f"llmprune: stopped by signal {code - 128}",
              file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
