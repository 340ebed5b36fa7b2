"""Peak RSS and wall time of pruning in memory against ``--offload disk``, each in its own process.

Both runs prune the same safetensors checkpoint with the same calibration windows, on the CPU:

* ``memory``: ``load_model`` + ``prune`` (the whole model in RAM, as ``llmprune prune`` does);
* ``disk``: ``load_for_offload`` + ``prune`` with the blocks in an offload folder: only the parts
  outside the blocks are read at load, each block is read, pruned and written back in its turn.

Each is a fresh ``python benchmarks/offload_memory.py --child MODE`` process reporting its own
``ru_maxrss`` (the peak resident set of the whole process: interpreter, torch, the model, the
calibration activations), so the two never share a peak; a third child that only imports the
libraries, builds the model without weights (meta tensors) and loads the tokenizer gives the
floor that neither can go below. Time is load +
prune (+ save with ``--save``), wall clock. Printed: both peaks, the ratios disk / memory of the
peak and of the peak above the floor, and the time ratio, all measured in this one run.

The bundled SmolLM2 is a GGUF file, which transformers can only load whole; it is first written
once as a safetensors folder (a setup process, not measured) and both runs prune that folder. A
local HF directory (``--model DIR``, e.g. a tiny test model) is used as it is.

    python benchmarks/offload_memory.py --model smollm2-135m --data-dir ../shared/data --nsamples 8 \\
        --seqlen 2048
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as llmprune/__init__.py does

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("floor", "memory", "disk")


def _peak_rss() -> int:
    """This process's peak resident set in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def child(args) -> dict:
    """One measured run in this (fresh) process; returns what it measured."""
    import torch

    from llmprune.config import CalibConfig, PruneConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = {"mode": args.child, "threads": torch.get_num_threads()}
    # the libraries, the model's code (no weights) and the tokenizer: held by every run
    if args.child == "floor":
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        import llmprune.engine  # noqa: F401
        import llmprune.offload  # noqa: F401

        with init_empty_weights():
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model))
        AutoTokenizer.from_pretrained(args.model)
    else:
        from llmprune.engine import prune

        offload = {"offload": "disk", "offload_dir": args.offload_dir} if args.child == "disk" else {}
        config = PruneConfig(method=args.method, pattern=args.pattern,
                             calib=CalibConfig(dataset=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                                               batch_size=args.calib_batch_size), **offload)
        store = None
        if args.child == "disk":
            from llmprune.offload import load_for_offload

            model, tokenizer, store = load_for_offload(args.model, "disk", dtype=args.dtype, device="cpu",
                                                       folder=args.offload_dir, seqlen=args.seqlen)
        else:
            from llmprune.models import load_model

            model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu", seqlen=args.seqlen)
        out["load_seconds"] = time.perf_counter() - start
        report = prune(model, tokenizer, config, data_dir=args.data_dir,
                       progress=False, device="cpu", store=store)
        out["prune_seconds"] = report.seconds
        out["sparsity"] = report.overall_sparsity
        out["offload"] = report.offload
        if args.save_to:
            if store is not None:
                from llmprune.offload import save_offloaded

                save_offloaded(model, store, tokenizer, args.save_to,
                               {"benchmark": "offload_memory"}, overwrite=True)
            else:
                from llmprune.io import save_pruned

                save_pruned(model, tokenizer, args.save_to, {"benchmark": "offload_memory"}, overwrite=True)
        if store is not None:
            store.close()
    out["seconds"] = time.perf_counter() - start
    out["peak_rss"] = _peak_rss()
    return out


def _run_child(mode: str, args, source: str, work: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--model", source,
           "--method", args.method, "--pattern", args.pattern, "--calib", args.calib,
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
           "--calib-batch-size", str(args.calib_batch_size), "--dtype", args.dtype,
           "--offload-dir", str(work / "offload")]
    if args.data_dir:
        cmd += ["--data-dir", str(args.data_dir)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.save and mode != "floor":
        cmd += ["--save-to", str(work / f"saved-{mode}")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the {mode} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _safetensors_source(model: str, dtype: str, work: Path) -> str:
    """``model`` as a local safetensors folder: itself when it is one, else written once (setup)."""
    path = Path(model)
    if path.is_dir() and (any(path.glob("*.safetensors"))
                          or (path / "model.safetensors.index.json").is_file()):
        return str(path)
    target = work / "source"
    # save_pruned, not save_pretrained: it drops the GGUF quantization tag of a dequantized model
    code = ("import sys; from llmprune.io import save_pruned; from llmprune.models import load_model; "
            "m, t = load_model(sys.argv[1], dtype=sys.argv[2]); "
            "save_pruned(m, t, sys.argv[3], {'converted_from': sys.argv[1]})")
    subprocess.run([sys.executable, "-c", code, model, dtype, str(target)], check=True, cwd=ROOT,
                   env={**os.environ,
                        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    return str(target)


def _same_checkpoints(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict:
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            out.update(load_file(file))
        return out

    x, y = tensors(a), tensors(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m",
                        help="the bundled alias, a hub id or .gguf (written once as safetensors first), or a "
                             "local HF safetensors folder (used as it is)")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--calib", default="c4")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--calib-batch-size", type=int, default=1,
                        help="windows per block forward (1 keeps the intermediate activations small)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads in each run (default: torch's)")
    parser.add_argument("--data-dir", default=os.environ.get("LLMPRUNE_DATA_DIR") or None)
    parser.add_argument("--save", action="store_true",
                        help="also save the pruned model (in memory: save_pretrained; disk: block by block) "
                             "and check that the two checkpoints are bit-identical")
    parser.add_argument("--work", default=None,
                        help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="write the measurements and ratios as JSON")
    parser.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--offload-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save-to", dest="save_to", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:  # a measured run: one JSON line on stdout
        print(json.dumps(child(args)))
        return 0

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="offload-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        source = _safetensors_source(args.model, args.dtype, work)
        runs = {mode: _run_child(mode, args, source, work) for mode in MODES}
        same = _same_checkpoints(work / "saved-memory", work / "saved-disk") if args.save else None
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    floor, memory, disk = runs["floor"]["peak_rss"], runs["memory"]["peak_rss"], runs["disk"]["peak_rss"]
    mib = 2 ** 20
    ratios = {"peak_rss": disk / memory,
              "peak_rss_above_floor": (disk - floor) / (memory - floor) if memory > floor else None,
              "seconds": runs["disk"]["seconds"] / runs["memory"]["seconds"],
              "prune_seconds": runs["disk"]["prune_seconds"] / runs["memory"]["prune_seconds"]}
    print(f"{args.model} ({source}), {args.method} {args.pattern}, {args.nsamples} x {args.seqlen} "
          f"{args.calib} windows, calibration batch {args.calib_batch_size}, {args.dtype}, "
          f"{runs['memory']['threads']} threads")
    print(f"{'run':<8} {'peak RSS':>10} {'above floor':>12} {'load s':>8} {'prune s':>8} {'total s':>8}")
    for mode in MODES:
        r = runs[mode]
        print(f"{mode:<8} {r['peak_rss'] / mib:>8.0f} MiB {(r['peak_rss'] - floor) / mib:>8.0f} MiB "
              f"{r.get('load_seconds', 0.0):>8.1f} {r.get('prune_seconds', 0.0):>8.1f} {r['seconds']:>8.1f}")
    above = ratios["peak_rss_above_floor"]
    print(f"disk / memory: peak RSS {ratios['peak_rss']:.3f}x"
          + (f" ({above:.3f}x above the floor)" if above is not None else "")
          + f", time {ratios['seconds']:.3f}x (prune alone {ratios['prune_seconds']:.3f}x)")
    offload = runs["disk"].get("offload") or {}
    print(f"disk run: blocks from the {offload.get('source')}, {offload.get('loads')} block loads, at most "
          f"{offload.get('peak_blocks')} block materialised, "
          f"{(offload.get('bytes_read') or 0) / mib:.1f} MiB read, "
          f"{(offload.get('bytes_written') or 0) / mib:.1f} MiB written")
    if same is not None:
        print(f"checkpoints (in memory vs block by block) bit-identical: {same}")
    if args.json:
        from llmprune.io import write_json_atomic

        write_json_atomic(args.json, {"benchmark": "offload_memory", "model": args.model, "runs": runs,
                                      "ratios": ratios, "checkpoints_identical": same,
                                      "settings": {k: v for k, v in vars(args).items()
                                                   if k not in ("child", "offload_dir", "save_to", "json")}})
        print(f"wrote {args.json}")
    return 0 if same in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
