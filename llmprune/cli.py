"""Command line: parse flags into configs, call the library, print. Nothing else lives here.

Flag defaults and help texts come from the config dataclasses (``llmprune.config``), so
``llmprune prune --help`` and ``PruneConfig()`` cannot disagree. User errors
(``LlmpruneError``, bad flags) print one line on stderr and exit with code 2, found before the
model loads where the inputs alone tell, right after it where the model's shapes are needed.
A failure to write an output after the work is done prints one line and exits with code 1,
once every other output has been written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmprune import __version__
from llmprune.config import CalibConfig, EvalConfig, Pattern, PruneConfig, field_default, field_help
from llmprune.errors import LlmpruneError

EXIT_USER_ERROR = 2
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


def _field(p: argparse.ArgumentParser, cls: type, name: str, *flags: str, default_label: str | None = None, **kw):
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


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="hub id, local HF directory, .gguf file, or 'smollm2-135m' (default: the bundled model)")
    p.add_argument("--dtype", default="float32", help="float32 (default on CPU), bfloat16, float16 or auto")
    p.add_argument("--device", default=None, help="compute device, e.g. cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--device-map", default=None,
                   help="accelerate device map for models that do not fit one device, e.g. 'auto' "
                        "(multi-GPU / CPU offload); pruning then runs each block where it lives")


def _add_eval(p: argparse.ArgumentParser, dataset_flag: str) -> None:
    _field(p, EvalConfig, "datasets", dataset_flag, metavar="NAMES", default=None,
           default_label="ptb, or none when --zeroshot is given")
    _field(p, CalibConfig, "seqlen", "--seqlen", type=int)
    p.add_argument("--data-dir", default=None,
                   help="folder with local copies of the datasets (default: $LLMPRUNE_DATA_DIR, else the hub)")
    _field(p, EvalConfig, "max_windows", "--max-windows", type=int)
    _field(p, EvalConfig, "batch_size", "--batch-size")
    _field(p, EvalConfig, "zeroshot", "--zeroshot", metavar="TASKS")
    _field(p, EvalConfig, "limit", "--limit", type=int)
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmprune", description="One-shot pruning of open LLMs (Wanda, magnitude, SparseGPT).")
    parser.add_argument("--version", action="version", version=f"llmprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ev = sub.add_parser("eval", help="perplexity / zero-shot accuracy of a model")
    _add_model(ev)
    _add_eval(ev, "--dataset")

    pr = sub.add_parser("prune", help="prune a model, then evaluate dense and pruned")
    _add_model(pr)
    _field(pr, PruneConfig, "method", "--method")
    _field(pr, PruneConfig, "sparsity", "--sparsity", type=float)
    _field(pr, PruneConfig, "pattern", "--pattern")
    _field(pr, PruneConfig, "group", "--group")
    _field(pr, PruneConfig, "metric", "--metric")
    _field(pr, PruneConfig, "use_variant", "--use-variant")
    _field(pr, PruneConfig, "true_sequential", "--true-sequential")
    _field(pr, PruneConfig, "include", "--include", metavar="GLOBS")
    _field(pr, PruneConfig, "exclude", "--exclude", metavar="GLOBS")
    _field(pr, CalibConfig, "dataset", "--calib")
    _field(pr, CalibConfig, "nsamples", "--nsamples")
    _field(pr, CalibConfig, "seed", "--seed")
    _field(pr, CalibConfig, "batch_size", "--calib-batch-size")
    _field(pr, PruneConfig, "percdamp", "--percdamp")
    _field(pr, PruneConfig, "blocksize", "--blocksize")
    pr.add_argument("--skip-dense", action="store_true", help="do not evaluate the dense model first")
    pr.add_argument("--save", default=None, metavar="DIR", help="save the pruned model as an HF checkpoint")
    pr.add_argument("--overwrite", action="store_true",
                    help="let --save replace an earlier llmprune checkpoint (never a folder with other files)")
    _add_eval(pr, "--eval")

    rn = sub.add_parser("run", help="run every run of a YAML recipe (resumable), then write the report")
    rn.add_argument("recipe", help="recipe YAML file, e.g. recipes/smollm2_cpu.yaml")
    rn.add_argument("--out", default=None, help="results folder (default: results/<recipe name>)")
    rn.add_argument("--data-dir", default=None, help="folder with local copies of the datasets")
    rn.add_argument("--only", type=_csv, default=None, metavar="NAMES", help="run only these runs")
    rn.add_argument("--force", action="store_true", help="reuse an output folder that holds another recipe's results")
    rn.add_argument("--no-progress", action="store_true", help="hide progress bars")

    rp = sub.add_parser("report", help="tables and plots from a results folder")
    rp.add_argument("results", help="folder of result JSON files")
    return parser


# ---------------------------------------------------------------- helpers


def _data_dir(arg: str | None):
    from llmprune.data import resolve_data_dir

    path = resolve_data_dir(arg)
    if path is not None and not path.is_dir():
        raise LlmpruneError(f"data dir {path} does not exist: pass --data-dir with the folder holding the datasets")
    return path


def _eval_config(args, datasets) -> EvalConfig:
    return EvalConfig(datasets=datasets or (), seqlen=args.seqlen, batch_size=args.batch_size,
                      max_windows=args.max_windows, zeroshot=args.zeroshot, limit=args.limit)


def _check_inputs(eval_config: EvalConfig, data_dir, args, calib: str | None = None) -> None:
    """Everything that needs no model: data files (or the hub), zero-shot tasks, output paths,
    the device. Runs before the (slow) model load, so a bad input fails in a second."""
    from llmprune.data import check_available
    from llmprune.io import check_output_file, check_save_dir
    from llmprune.models import check_device, check_model_source, resolve_dtype

    check_model_source(args.model)
    resolve_dtype(args.dtype)
    if not args.device_map:
        check_device(args.device)
    if args.json:
        check_output_file(args.json, "--json")
    if getattr(args, "save", None):
        check_save_dir(args.save, args.overwrite)
    for name in eval_config.datasets:
        check_available(name, data_dir, split="eval")
    if calib is not None:
        check_available(calib, data_dir, split="calibration")
    if eval_config.zeroshot:
        from llmprune.evaluation.zeroshot import build_tasks

        build_tasks(eval_config.zeroshot, data_dir)  # names, files and rows


def _load(args):
    from llmprune.models import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device, seqlen=args.seqlen,
                      device_map=args.device_map)


def _ppl_table(rows: list[tuple[str, str, object]]) -> str:
    """rows: (model label, dataset, PerplexityResult)."""
    head = f"{'model':<16} {'dataset':<10} {'seqlen':>6} {'windows':>7} {'tokens':>9} {'ppl':>10} {'seconds':>8} {'tok/s':>8}"
    lines = [head, "-" * len(head)]
    for label, name, r in rows:
        lines.append(f"{label:<16} {name:<10} {r.seqlen:>6} {r.windows:>7} {r.tokens:>9} {r.ppl:>10.3f} "
                     f"{r.seconds:>8.1f} {r.tokens_per_s:>8.0f}")
    return "\n".join(lines)


def _quiet_libraries(progress: bool) -> None:
    import os

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
    failed = False
    for what, write in writers:
        try:
            print(write())
        except (OSError, LlmpruneError) as exc:
            failed = True
            print(f"llmprune: error: could not write {what}: {exc}", file=sys.stderr)
    return EXIT_OUTPUT_FAILED if failed else 0


def _json_writer(path: str, record: dict):
    from llmprune.io import write_json_atomic

    return lambda: f"wrote {write_json_atomic(path, record)}"


# ---------------------------------------------------------------- commands


def cmd_eval(args) -> int:
    from llmprune.evaluation import check_eval_memory, evaluate
    from llmprune.results import result_record

    data_dir = _data_dir(args.data_dir)
    datasets = args.dataset if args.dataset is not None else (() if args.zeroshot else ("ptb",))
    eval_config = _eval_config(args, datasets)
    _check_inputs(eval_config, data_dir, args)
    model, tokenizer = _load(args)
    check_eval_memory(model, eval_config)
    eval_config, ppl, zs = evaluate(model, tokenizer, eval_config, data_dir, not args.no_progress)
    if ppl:
        print(_ppl_table([(args.model, name, r) for name, r in ppl.items()]))
    if zs is not None:
        print(zs.markdown_table())
    if not args.json:
        return 0
    record = result_record(name="dense", model=args.model, eval_config=eval_config, perplexity=ppl, zeroshot=zs)
    return _write_outputs([(args.json, _json_writer(args.json, record))])


def cmd_prune(args) -> int:
    from llmprune.evaluation import check_eval_memory, evaluate
    from llmprune.io import save_pruned
    from llmprune.methods import needs_for, validate_config
    from llmprune.pipeline import check_calibration_memory, plan_layers, prune
    from llmprune.results import result_record

    data_dir = _data_dir(args.data_dir)
    calib = CalibConfig(dataset=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                        batch_size=args.calib_batch_size)
    config = PruneConfig(method=args.method, sparsity=args.sparsity, pattern=args.pattern, group=args.group,
                         metric=args.metric, use_variant=args.use_variant, true_sequential=args.true_sequential,
                         include=args.include, exclude=args.exclude, percdamp=args.percdamp,
                         blocksize=args.blocksize, calib=calib)
    validate_config(config)
    eval_config = _eval_config(args, args.eval if args.eval is not None else ("ptb",))
    _check_inputs(eval_config, data_dir, args, calib=config.calib.dataset if needs_for(config) else None)
    progress = not args.no_progress
    model, tokenizer = _load(args)
    device = None if args.device_map else args.device  # device map: each block computes where it lives
    # checks that need only the model's shapes, before any evaluation or calibration
    plan_layers(model, config)
    check_calibration_memory(model, config, device)
    check_eval_memory(model, eval_config)

    dense_ppl, dense_zs = {}, None
    if not args.skip_dense:
        _, dense_ppl, dense_zs = evaluate(model, tokenizer, eval_config, data_dir, progress)
    report = prune(model, tokenizer, config, data_dir=data_dir, progress=progress, device=device, model_name=args.model)
    print(report.table())
    eval_config, ppl, zs = evaluate(model, tokenizer, eval_config, data_dir, progress)

    label = f"{config.method} {config.pattern if config.pattern.structured else f'{config.sparsity:.0%}'}"
    rows = [(args.model + " dense", n, r) for n, r in dense_ppl.items()] + [(label, n, r) for n, r in ppl.items()]
    if rows:
        print(_ppl_table(rows))
    for name, r in ppl.items():
        if name in dense_ppl:
            print(f"{name}: dense {dense_ppl[name].ppl:.3f} -> {label} {r.ppl:.3f} "
                  f"(pruning took {report.seconds:.1f} s)")
    if dense_zs is not None:
        print("dense:\n" + dense_zs.markdown_table())
    if zs is not None:
        print(f"{label}:\n" + zs.markdown_table())
    dense = {"perplexity": {k: v.to_dict() for k, v in dense_ppl.items()},
             "zeroshot": dense_zs.to_dict() if dense_zs is not None else None}
    record = result_record(name=f"{config.method}-{config.pattern}-{config.sparsity:g}", model=args.model,
                           config=config, eval_config=eval_config, perplexity=ppl, zeroshot=zs,
                           prune_report=report, dense=dense)
    writers = []
    if args.json:
        writers.append((args.json, _json_writer(args.json, record)))
    if args.save:
        def save():
            return f"saved the pruned model to {save_pruned(model, tokenizer, args.save, record, args.overwrite)}"

        writers.append((f"the checkpoint {args.save}", save))
    return _write_outputs(writers)


def cmd_run(args) -> int:
    from llmprune.runner import run_recipe

    data_dir = _data_dir(args.data_dir)
    out = args.out or Path("results") / Path(args.recipe).stem
    written = run_recipe(args.recipe, out, data_dir=data_dir, only=args.only, force=args.force,
                         progress=not args.no_progress)
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_report(args) -> int:
    from llmprune.report import write_report

    outputs = write_report(args.results)
    for path in outputs.values():
        print(f"wrote {path}")
    return 0


COMMANDS = {"eval": cmd_eval, "prune": cmd_prune, "run": cmd_run, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command != "report":  # report reads JSON only: it must not need transformers
            _quiet_libraries(not getattr(args, "no_progress", False))
        return COMMANDS[args.command](args)
    except LlmpruneError as exc:
        print(f"llmprune: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("llmprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
