"""The edge benchmark: prune -> recover -> GGUF -> llama.cpp, for the bundled SmolLM2-135M.

What ``recipes/edge_smollm2.yaml`` lists (dense; width 20/30% with FLAP; depth 4/8 blocks with
ShortGPT; Wanda 50% unstructured; each pruned model with and without KD recovery on a fixed
budget of CPU minutes) is pruned and recovered here with llmprune's Python API, then:

* WikiText-2 perplexity in transformers (float32) on the recipe's windows: the reference the
  GGUF is checked against;
* exported to GGUF at f16, q8_0 and q4_0 (``llmprune.export.gguf``, the bundled GGUF's tokenizer);
* per GGUF, in llama.cpp (``llmprune.evaluation.llamacpp``): the perplexity of the same token
  ids, prefill and decode tokens/s on 1 and 2 threads, and the peak RSS of the process that ran it
  (a fresh child per measurement). Speed is interleaved with dense-q4_0, the baseline to beat
  (variant, dense-q4_0, variant, dense-q4_0 ... in one run), and reported as ratios to it;
* the GGUF's size in bytes.

Each model's numbers are written as soon as they are done (``OUT/NAME.json``; a re-run skips the
finished ones), then ``summary.md``/``summary.json`` and the Pareto plot (perplexity against decode
speed and against size). The pruned and recovered checkpoints and the GGUFs go to ``--work``
(deleted by nothing here: they are the caller's).

    python benchmarks/edge.py --out eval/results/edge_smollm2 --work /tmp/edge_smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as llmprune/__init__.py does

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TYPES = ("f16", "q8_0", "q4_0")
THREADS = (1, 2)
BASELINE = ("dense", "q4_0")  # every speed is timed against it (llmprune.report.edge.BASELINE)


def _prune_key(run) -> str:
    return json.dumps(run.prune.to_dict(), sort_keys=True)


def _build(run, recipe, work: Path, data_dir, pruned_dirs: dict):
    """The run's model in memory (pruned, recovered), its tokenizer and what was done."""
    import llmprune
    from llmprune.io import save_pruned
    from llmprune.recover import recover

    done: dict = {}
    key = _prune_key(run)
    if run.name == "dense":
        model, tok = llmprune.load_model(run.model, dtype=run.dtype)
        return model, tok, done
    for folder in work.glob("*-pruned"):  # a checkpoint an earlier process left with the same pruning
        record = folder / "llmprune.json"
        if record.is_file() and _prune_key(run) == json.dumps(json.loads(record.read_text())["config"],
                                                              sort_keys=True):
            pruned_dirs.setdefault(key, folder)
    if key in pruned_dirs:  # the same pruning as an earlier run: start from its checkpoint
        model, tok = llmprune.load_model(str(pruned_dirs[key]), dtype=run.dtype)
        done["pruned_from"] = str(pruned_dirs[key])
    else:
        model, tok = llmprune.load_model(run.model, dtype=run.dtype)
        report = llmprune.prune(model, tok, run.prune, data_dir=data_dir, progress=False)
        done["prune"] = {"seconds": report.seconds, "overall_sparsity": report.overall_sparsity,
                         "structured": report.structured, "depth": report.depth}
        folder = work / f"{run.name}-pruned"
        save_pruned(model, tok, folder, {"model": run.model, "config": run.prune.to_dict()}, overwrite=True)
        pruned_dirs[key] = folder
    if run.recover is not None:
        teacher, _ = llmprune.load_model(run.model, dtype=run.dtype)
        start = time.perf_counter()
        rec = recover(model, teacher, tok, run.recover, data_dir=data_dir, progress=False)
        done["recover"] = {**rec.to_dict(), "wall_seconds": time.perf_counter() - start}
        del teacher
    return model, tok, done


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _ggufs(model, tok, name: str, work: Path) -> dict[str, Path]:
    from llmprune.export.gguf import export_gguf
    from llmprune.models import bundled_model_path

    out = {}
    for kind in TYPES:
        path = work / f"{name}-{kind}.gguf"
        if not path.exists():
            export_gguf(model, tok, path, kind, source_gguf=bundled_model_path())
        out[kind] = path
    return out


def _speed_pair(path: Path, baseline: Path, threads: int, args) -> dict:
    """The GGUF and dense-q4_0 timed in turn (``args.repeats`` pairs), each in a fresh child."""
    from llmprune.evaluation.llamacpp import speed_in_child

    mine, base = [], []
    for _ in range(args.repeats):
        mine.append(speed_in_child(path, threads, args.prompt_tokens, args.gen_tokens, repeats=1))
        base.append(speed_in_child(baseline, threads, args.prompt_tokens, args.gen_tokens, repeats=1))

    def best(runs, key):
        return max(getattr(r, key) for r in runs)

    out = {"threads": threads}
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        out[key] = best(mine, key)
        out[f"baseline_{key}"] = best(base, key)
        out[f"{key}_vs_dense_q4_0"] = out[key] / out[f"baseline_{key}"]
    out["peak_rss_mib"] = max(r.peak_rss_mib for r in mine)
    return out


def _measure_gguf(path: Path, windows, baseline: Path, args) -> dict:
    from llmprune.evaluation.llamacpp import perplexity

    ppl = perplexity(path, windows, threads=2, dataset="wikitext2", progress=False)
    return {"path": path.name, "bytes": path.stat().st_size, "ppl": ppl.ppl,
            "ppl_seconds": ppl.seconds, "window_nll": ppl.window_nll,
            "speed": [_speed_pair(path, baseline, t, args) for t in THREADS]}


def run_one(run, recipe, args, work: Path, out: Path, pruned_dirs: dict) -> dict:
    from llmprune.data import eval_tokens
    from llmprune.evaluation.llamacpp import token_windows
    from llmprune.evaluation.perplexity import perplexity
    from llmprune.models import get_blocks

    start = time.perf_counter()
    model, tok, done = _build(run, recipe, work, args.data_dir, pruned_dirs)
    seqlen, max_windows = run.eval.seqlen, run.eval.max_windows
    ids = eval_tokens("wikitext2", tok, seqlen, data_dir=args.data_dir)
    torch_ppl = perplexity(model, ids, seqlen, max_windows=max_windows, progress=False, dataset="wikitext2")
    windows = token_windows(ids, seqlen, max_windows)
    config = model.config
    blocks = get_blocks(model)
    shape = {"blocks": int(config.num_hidden_layers), "params": _params(model),
             "intermediate": sorted({int(b.mlp.gate_proj.out_features) for b in blocks}),
             "heads": sorted({int(b.self_attn.q_proj.out_features // b.self_attn.head_dim) for b in blocks})}
    paths = _ggufs(model, tok, run.name, work)
    del model
    baseline = work / f"{BASELINE[0]}-{BASELINE[1]}.gguf"
    record = {"name": run.name, "run": run.to_dict(), "shape": shape, **done,
              "torch_ppl": torch_ppl.ppl, "windows": int(windows.shape[0]), "seqlen": seqlen,
              "gguf": {kind: _measure_gguf(path, windows, baseline, args) for kind, path in paths.items()}}
    f16 = record["gguf"]["f16"]["ppl"]
    record["f16_parity"] = f16 / torch_ppl.ppl - 1
    record["seconds"] = time.perf_counter() - start
    record["finished"] = time.time()
    from llmprune.io import write_json_atomic

    write_json_atomic(out / f"{run.name}.json", record)
    return record


def _runs(recipe):
    """Dense first (every speed is timed against its q4_0), then the recipe's runs."""
    import dataclasses

    first = recipe.runs[0]
    dense = dataclasses.replace(first, name="dense", recover=None)
    return [dense, *recipe.runs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "edge_smollm2.yaml"))
    parser.add_argument("--out", default=str(ROOT / "eval" / "results" / "edge_smollm2"))
    parser.add_argument("--work", default="/tmp/edge_smollm2")
    parser.add_argument("--data-dir", default=os.environ.get("LLMPRUNE_DATA_DIR"))
    parser.add_argument("--only", nargs="*", help="run names (default: all)")
    parser.add_argument("--repeats", type=int, default=2, help="speed pairs per thread count")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args()
    from llmprune.evaluation.llamacpp import check_available
    from llmprune.recipes import load_recipe

    out, work = Path(args.out), Path(args.work)
    if not args.summary_only:
        check_available()
        recipe = load_recipe(args.recipe)
        out.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        pruned_dirs: dict = {}
        for run in _runs(recipe):
            if args.only and run.name not in args.only and run.name != "dense":
                continue
            if (out / f"{run.name}.json").exists():
                print(f"{run.name}: done before, skipped", flush=True)
                continue
            record = run_one(run, recipe, args, work, out, pruned_dirs)
            print(f"{run.name}: torch ppl {record['torch_ppl']:.3f}, f16 {record['gguf']['f16']['ppl']:.3f} "
                  f"({record['f16_parity']:+.3%}), q4_0 {record['gguf']['q4_0']['ppl']:.3f}, "
                  f"{record['seconds']:.0f} s", flush=True)
    from llmprune.report.edge import write_report

    print(write_report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
