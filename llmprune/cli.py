"""Command line: parse flags into configs, call the library, print. Nothing else lives here.

User errors (``LlmpruneError``, bad flags) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llmprune.errors import LlmpruneError
from llmprune.evaluation import evaluate

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        raise LlmpruneError(f"{message} (see `{self.prog} --help`)")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="hub id, local HF directory, .gguf file, or 'smollm2-135m' (default: the bundled model)")
    p.add_argument("--dtype", default="float32", help="float32 (default on CPU), bfloat16, float16 or auto")
    p.add_argument("--device", default=None, help="compute device, e.g. cuda or cpu (default: cuda if available)")
    p.add_argument("--device-map", default=None,
                   help="accelerate device map for models that do not fit one device, e.g. 'auto' "
                        "(multi-GPU / CPU offload); pruning then runs each block where it lives")


def _add_eval(p: argparse.ArgumentParser, dataset_flag: str) -> None:
    p.add_argument(dataset_flag, type=_csv, default=None, metavar="NAMES",
                   help="perplexity datasets, comma separated: wikitext2, ptb, c4, or a local .txt/.jsonl path")
    p.add_argument("--seqlen", type=int, default=None,
                   help="window length for calibration and evaluation (default: model context, at most 4096)")
    p.add_argument("--data-dir", default=None,
                   help="folder with local copies of the datasets (default: $LLMPRUNE_DATA_DIR, else the hub)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first K windows")
    p.add_argument("--batch-size", type=int, default=1, help="evaluation windows per forward pass")
    p.add_argument("--zeroshot", type=_csv, default=(), metavar="TASKS",
                   help="zero-shot tasks through lm-eval, e.g. boolq,rte,winogrande,arc_easy,arc_challenge,openbookqa,piqa")
    p.add_argument("--limit", type=int, default=None, help="zero-shot documents per task (default: all)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmprune", description="One-shot pruning of open LLMs (Wanda, magnitude, SparseGPT).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ev = sub.add_parser("eval", help="perplexity / zero-shot accuracy of a model")
    _add_model(ev)
    _add_eval(ev, "--dataset")

    pr = sub.add_parser("prune", help="prune a model, then evaluate dense and pruned")
    _add_model(pr)
    pr.add_argument("--method", default="wanda", help="wanda (default), magnitude or sparsegpt")
    pr.add_argument("--sparsity", type=float, default=None,
                    help="fraction of weights removed, in [0, 1) (default 0.5; implied by an N:M pattern)")
    pr.add_argument("--pattern", default="unstructured",
                    help="'unstructured' or N:M = keep N of every M consecutive input weights, e.g. 2:4")
    pr.add_argument("--group", default=None, help="comparison group: row, column or layer (default: the method's)")
    pr.add_argument("--metric", default=None, help="score: weight, activation or wanda (default: the method's)")
    pr.add_argument("--use-variant", action="store_true", help="Wanda's alpha variant (per-row cumulative threshold)")
    pr.add_argument("--true-sequential", action="store_true", help="prune q/k/v, o, gate/up, down in turn")
    pr.add_argument("--include", type=_csv, default=(), metavar="GLOBS", help="only layers matching, e.g. 'layers.*.mlp.*'")
    pr.add_argument("--exclude", type=_csv, default=(), metavar="GLOBS", help="skip layers matching")
    pr.add_argument("--calib", default="c4", help="calibration data: c4 (default), wikitext2, ptb or a local file")
    pr.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    pr.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    pr.add_argument("--calib-batch-size", type=int, default=8, help="calibration windows per block forward")
    pr.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT damping, fraction of mean diag(H)")
    pr.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block size")
    pr.add_argument("--skip-dense", action="store_true", help="do not evaluate the dense model first")
    pr.add_argument("--save", default=None, metavar="DIR", help="save the pruned model as an HF checkpoint")
    pr.add_argument("--overwrite", action="store_true", help="allow --save into an existing non-empty directory")
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


def _device(arg: str | None) -> str:
    import torch

    if arg:
        if arg.startswith("cuda") and not torch.cuda.is_available():
            raise LlmpruneError(f"--device {arg} asked for, but no CUDA device is available: use --device cpu")
        return arg
    return "cuda" if torch.cuda.is_available() else "cpu"


def _data_dir(arg: str | None):
    from llmprune.data import resolve_data_dir

    path = resolve_data_dir(arg)
    if path is not None and not path.is_dir():
        raise LlmpruneError(f"data dir {path} does not exist: pass --data-dir with the folder holding the datasets")
    return path


def _eval_config(args, datasets):
    from llmprune.config import EvalConfig

    return EvalConfig(datasets=datasets or (), seqlen=args.seqlen, batch_size=args.batch_size,
                      max_windows=args.max_windows, zeroshot=args.zeroshot, limit=args.limit)


def _check_tasks(eval_config, data_dir) -> None:
    if eval_config.zeroshot:
        from llmprune.evaluation.zeroshot import build_tasks

        build_tasks(eval_config.zeroshot, data_dir)  # names, files and rows, before the model loads


def _check_datasets(eval_config, data_dir, calib: str | None = None) -> None:
    """Find every data file before the (slow) model load, so a missing one fails at once."""
    from llmprune.data import describe_source

    for name in eval_config.datasets:
        describe_source(name, data_dir, split="eval")
    if calib is not None:
        describe_source(calib, data_dir, split="calibration")


def _ppl_table(rows: list[tuple[str, str, object]]) -> str:
    """rows: (model label, dataset, PerplexityResult)."""
    head = f"{'model':<16} {'dataset':<10} {'seqlen':>6} {'windows':>7} {'tokens':>9} {'ppl':>10} {'seconds':>8} {'tok/s':>8}"
    lines = [head, "-" * len(head)]
    for label, name, r in rows:
        lines.append(f"{label:<16} {name:<10} {r.seqlen:>6} {r.windows:>7} {r.tokens:>9} {r.ppl:>10.3f} "
                     f"{r.seconds:>8.1f} {r.tokens_per_s:>8.0f}")
    return "\n".join(lines)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


# ---------------------------------------------------------------- commands


def cmd_eval(args) -> int:
    from llmprune.io import result_record, write_json_atomic
    from llmprune.models import load_model

    data_dir = _data_dir(args.data_dir)
    datasets = args.dataset if args.dataset is not None else (() if args.zeroshot else ("ptb",))
    eval_config = _eval_config(args, datasets)
    _check_datasets(eval_config, data_dir)
    _check_tasks(eval_config, data_dir)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=_device(args.device), seqlen=args.seqlen,
                                  device_map=args.device_map)
    eval_config, ppl, zs = evaluate(model, tokenizer, eval_config, data_dir, not args.no_progress)
    if ppl:
        print(_ppl_table([(args.model, name, r) for name, r in ppl.items()]))
    if zs is not None:
        print(zs.markdown_table())
    if args.json:
        record = result_record(name="dense", model=args.model, eval_config=eval_config, perplexity=ppl, zeroshot=zs)
        write_json_atomic(args.json, record)
        print(f"wrote {args.json}")
    return 0


def cmd_prune(args) -> int:
    from llmprune.config import CalibConfig, PruneConfig
    from llmprune.io import check_save_dir, result_record, save_pruned, write_json_atomic
    from llmprune.methods import needs_for
    from llmprune.models import load_model
    from llmprune.pipeline import prune

    data_dir = _data_dir(args.data_dir)
    calib = CalibConfig(dataset=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                        batch_size=args.calib_batch_size)
    config = PruneConfig(method=args.method, sparsity=args.sparsity, pattern=args.pattern, group=args.group,
                         metric=args.metric, use_variant=args.use_variant, true_sequential=args.true_sequential,
                         include=args.include, exclude=args.exclude, percdamp=args.percdamp,
                         blocksize=args.blocksize, calib=calib)
    eval_config = _eval_config(args, args.eval if args.eval is not None else ("ptb",))
    _check_datasets(eval_config, data_dir, calib=config.calib.dataset if needs_for(config) else None)
    _check_tasks(eval_config, data_dir)
    if args.save:
        check_save_dir(args.save, args.overwrite)
    progress = not args.no_progress
    device = _device(args.device)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device, seqlen=args.seqlen,
                                  device_map=args.device_map)
    if args.device_map:
        device = None  # each block computes on the device accelerate placed it on

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
    if args.save:
        save_pruned(model, tokenizer, args.save, record, overwrite=args.overwrite)
        print(f"saved the pruned model to {args.save}")
    if args.json:
        write_json_atomic(args.json, record)
        print(f"wrote {args.json}")
    return 0


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
        _quiet_libraries()
        return COMMANDS[args.command](args)
    except LlmpruneError as exc:
        print(f"llmprune: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("llmprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
