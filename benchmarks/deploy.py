"""What pruning buys on a CPU: checkpoint bytes, perplexity and speed, as ratios to dense.

For the bundled SmolLM2-135M: dense, Wanda 50%, Wanda 50% + INT8, and structured 20/30/50%
(wanda-sp and flap, ``--structure`` below). Each variant is pruned with the smollm2_cpu protocol
(8 x 2048 C4-sample calibration windows, seed 0) and evaluated on the first 16 PTB test windows
(seqlen 2048). Then:

* bytes: the checkpoint written by llmprune's compressed writer with float16 values (a layer whose
  bitmask does not pay is stored dense, so dense and structured checkpoints are plain fp16), the
  whole file and the block Linear weights alone;
* prefill tokens/s: one 2048-token window, keeping only the last position's logits (what a
  runtime needs to start generating);
* decode tokens/s: 64 new tokens at batch 1 with the KV cache (greedy), after a 16-token prompt.

Speed is measured interleaved with the dense model (dense, variant, dense, variant, ...), the
minimum of ``--repeats`` runs of each kept, so load from other processes on a shared machine
hits both alike. Each variant's numbers are written as soon as it is done (re-running skips
the finished ones); then the summary table and the plot.

The GGUF section exports the dense model as f16 and q8_0 (copying the bundled GGUF's tokenizer),
loads both back with transformers (``gguf_file=``) and compares logits (f16) and PTB perplexity
(q8_0) with the in-memory model.

    python benchmarks/deploy.py --out eval/results/deploy_smollm2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as llmprune/__init__.py does
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmprune.config import CalibConfig, PruneConfig  # noqa: E402
from llmprune.data import DATA_DIR_ENV  # noqa: E402
from llmprune.engine import prune  # noqa: E402
from llmprune.evaluation.perplexity import evaluate_perplexity  # noqa: E402
from llmprune.export.compressed import write_compressed  # noqa: E402
from llmprune.io import write_json_atomic, write_text_atomic  # noqa: E402
from llmprune.models import load_model  # noqa: E402
from llmprune.results import machine, versions  # noqa: E402

PREFILL, DECODE, PROMPT = 2048, 64, 16


def variants(structure: str) -> list[dict]:
    out = [{"name": "dense"},
           {"name": "wanda-50", "method": "wanda", "sparsity": 0.5},
           {"name": "wanda-50-int8", "method": "wanda", "sparsity": 0.5, "quantize": "int8"}]
    for sparsity in (0.3, 0.2, 0.5):  # 30% first: the speed target
        for method in ("wanda-sp", "flap"):
            out.append({"name": f"{method}-{int(sparsity * 100)}", "method": method, "sparsity": sparsity,
                        "structure": structure})
    return out


def _clocks() -> tuple[float, float]:
    """(wall, CPU) seconds: CPU time of this process is what the work costs, whatever else runs."""
    return time.perf_counter(), time.process_time()


@torch.inference_mode()
def prefill_seconds(model, ids: torch.Tensor) -> tuple[float, float]:
    wall, cpu = _clocks()
    model(ids, use_cache=False, logits_to_keep=1)
    end = _clocks()
    return end[0] - wall, end[1] - cpu


def _cache_kwarg(model) -> str:
    """transformers 5 renamed past_key_values= to cache= (the old name warns, then goes)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def decode_seconds(model, prompt: torch.Tensor, steps: int) -> tuple[float, float]:
    key = _cache_kwarg(model)
    out = model(prompt, use_cache=True, logits_to_keep=1)
    cache, token = getattr(out, "cache", None) or out.past_key_values, out.logits[:, -1:].argmax(-1)
    wall, cpu = _clocks()
    for _ in range(steps):
        out = model(token, use_cache=True, **{key: cache})
        cache, token = getattr(out, "cache", None) or out.past_key_values, out.logits[:, -1:].argmax(-1)
    end = _clocks()
    return end[0] - wall, end[1] - cpu


def speed(dense, model, ids: torch.Tensor, repeats: int, speed_threads: int) -> dict:
    """Minimum wall and CPU seconds of each, dense and variant measured alternately, on
    ``speed_threads`` threads; tokens/s and ratios to dense from both clocks."""
    prompt = ids[:, :PROMPT]
    threads = torch.get_num_threads()
    torch.set_num_threads(speed_threads)  # one thread: CPU time is then the work itself
    inf = (float("inf"), float("inf"))
    best = {"dense_prefill": inf, "prefill": inf, "dense_decode": inf, "decode": inf}
    decode_seconds(model, prompt, 2)  # warm-up (allocations, the first kernels)
    for _ in range(repeats):
        for key, m in (("dense_prefill", dense), ("prefill", model)):
            best[key] = tuple(map(min, best[key], prefill_seconds(m, ids)))
        for key, m in (("dense_decode", dense), ("decode", model)):
            best[key] = tuple(map(min, best[key], decode_seconds(m, prompt, DECODE)))
    torch.set_num_threads(threads)
    out = {"threads": speed_threads, "repeats": repeats}
    for clock, i in (("wall", 0), ("cpu", 1)):
        out[clock] = {"prefill_tokens_per_s": PREFILL / best["prefill"][i],
                      "decode_tokens_per_s": DECODE / best["decode"][i],
                      "dense_prefill_tokens_per_s": PREFILL / best["dense_prefill"][i],
                      "dense_decode_tokens_per_s": DECODE / best["dense_decode"][i],
                      "prefill_speedup": best["dense_prefill"][i] / best["prefill"][i],
                      "decode_speedup": best["dense_decode"][i] / best["decode"][i]}
    return out


def checkpoint_bytes(model, quantize: str | None) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        counts = write_compressed(model, folder, quantize=quantize, dtype="float16")
    return counts


def run_variant(spec: dict, dense, tokenizer, args, ids) -> dict:
    model = copy.deepcopy(dense)
    record: dict = {"name": spec["name"], "spec": spec}
    if "method" in spec:
        config = PruneConfig(method=spec["method"], sparsity=spec["sparsity"], quantize=spec.get("quantize"),
                             structure=spec.get("structure", "mlp"),
                             calib=CalibConfig(dataset="c4", nsamples=args.nsamples,
                                               seqlen=2048, seed=0, batch_size=4))
        report = prune(model, tokenizer, config, data_dir=args.data_dir,
                       progress=False, model_name="smollm2-135m")
        record["prune_seconds"] = report.seconds
        record["structured"] = report.structured
        record["quantization"] = report.quantization
        record["config"] = {k: getattr(model.config, k) for k in ("intermediate_size", "num_attention_heads",
                                                                   "num_key_value_heads", "head_dim")}
    record["parameters"] = sum(p.numel() for p in model.parameters())
    record["bytes"] = checkpoint_bytes(model, spec.get("quantize"))
    ppl = evaluate_perplexity(model, tokenizer, "ptb", 2048, data_dir=args.data_dir, batch_size=4,
                              max_windows=args.windows, progress=False)
    record["ptb_ppl"] = ppl.ppl
    record["speed"] = speed(dense, model, ids, args.repeats, args.speed_threads)
    return record


def gguf_section(dense, tokenizer, args) -> dict:
    """Export f16 and q8_0 GGUF of the dense model; read both back with transformers."""
    from transformers import AutoModelForCausalLM

    from llmprune.export.gguf import export_gguf
    from llmprune.models import bundled_model_path

    out: dict = {}
    ids = torch.randint(0, 49152, (1, 128), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        reference = dense(ids).logits
        for kind in ("f16", "q8_0"):
            info = export_gguf(dense, tokenizer,
                               Path(folder) / f"smollm2-{kind}.gguf", kind, bundled_model_path())
            back = AutoModelForCausalLM.from_pretrained(folder, gguf_file=f"smollm2-{kind}.gguf",
                                                        dtype=torch.float32)
            entry = {"bytes": info["bytes"], "tensor_types": info["tensor_types"],
                     "max_abs_logit_diff": float((back(ids).logits - reference).abs().max()),
                     "max_abs_logit": float(reference.abs().max())}
            if kind == "q8_0":
                entry["ptb_ppl"] = evaluate_perplexity(back, tokenizer, "ptb", 2048, data_dir=args.data_dir,
                                                       batch_size=4, max_windows=args.windows,
                                                       progress=False).ppl
            out[kind] = entry
            del back
    return out


def summary(records: list[dict], gguf: dict | None, args) -> str:
    dense = next(r for r in records if r["name"] == "dense")
    lines = ["| variant | shape | checkpoint MB | x dense | block Linears x dense fp16 | PTB ppl | prefill "
             "tok/s (CPU) | x dense (CPU / wall) | decode tok/s (CPU) | x dense (CPU / wall) |",
             "| :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        b, cpu, wall = r["bytes"], r["speed"]["cpu"], r["speed"]["wall"]
        cfg = r.get("config") or {}
        shape = (f"I={cfg['intermediate_size']}, heads "
                 f"{cfg['num_attention_heads']}/{cfg['num_key_value_heads']}" if cfg else "I=1536, heads 9/3")
        lines.append(f"| {r['name']} | {shape} | {b['file_bytes'] / 1e6:.1f} "
                     f"| {b['file_bytes'] / dense['bytes']['file_bytes']:.3f} "
                     f"| {b['encoded_bytes'] / dense['bytes']['encoded_fp16_bytes']:.3f} "
                     f"| {r['ptb_ppl']:.2f} | {cpu['prefill_tokens_per_s']:.0f} "
                     f"| {cpu['prefill_speedup']:.2f} / {wall['prefill_speedup']:.2f} "
                     f"| {cpu['decode_tokens_per_s']:.1f} "
                     f"| {cpu['decode_speedup']:.2f} / {wall['decode_speedup']:.2f} |")
    text = "\n".join(lines) + (
        "\n\nSpeed on one thread of a 2-core CPU shared with other jobs, interleaved with dense, min of the "
        "repeats; CPU time of this process (the work) and wall time (what the busy machine showed). The "
        "dense row is dense timed against itself: its distance from 1.00 is the noise floor. Bytes: "
        "llmprune's compressed writer with float16 values (int8 + float32 row scales for INT8); a layer "
        "whose bitmask does not pay is stored dense.")
    if gguf:
        text += ("\n\nGGUF (dense, read back by transformers): "
                 + "; ".join(f"{k}: {v['bytes'] / 1e6:.1f} MB, max |logit diff| {v['max_abs_logit_diff']:.4f}"
                             + (f", PTB ppl {v['ptb_ppl']:.3f}" if "ptb_ppl" in v else "")
                             for k, v in gguf.items() if isinstance(v, dict)))
    return text + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for r in records:
        cpu = r["speed"]["cpu"]
        x = (cpu["prefill_speedup"], cpu["decode_speedup"], r["bytes"]["file_bytes"] / 1e6)
        for ax, xv in zip(axes, x):
            ax.scatter(xv, r["ptb_ppl"])
            ax.annotate(r["name"], (xv, r["ptb_ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for ax, label in zip(axes, ("prefill speed, x dense (CPU time, 2048 tokens)",
                                "decode speed, x dense (CPU time, 64 tokens, batch 1)",
                                "checkpoint MB (fp16 values / int8)")):
        ax.set_xlabel(label)
        ax.set_ylabel("PTB perplexity (16 windows, log)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M on a shared 2-core CPU: perplexity against speed and size, one "
                 "point per variant")
    fig.tight_layout()
    from llmprune.io import write_atomic

    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "eval" / "results" / "deploy_smollm2"))
    parser.add_argument("--structure", default="mlp",
                        help="what the structured variants remove: mlp, heads, both")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speed-threads", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--skip-gguf", action="store_true")
    parser.add_argument("--data-dir",
                        default=os.environ.get(DATA_DIR_ENV) or str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dense, tokenizer = load_model("smollm2-135m", dtype="float32")
    ids = torch.randint(0, 49152, (1, PREFILL), generator=torch.Generator().manual_seed(0))
    only = set(args.only.split(",")) if args.only else None
    records = []
    for spec in variants(args.structure):
        path = out / f"{spec['name']}.json"
        if path.exists():
            record = json.loads(path.read_text())
            # written before both clocks were kept
            if spec["name"] == "dense" and "cpu" not in record["speed"]:
                record["speed"] = speed(dense, dense, ids, args.repeats, args.speed_threads)
                write_json_atomic(path, record)
            records.append(record)
            continue
        if only is not None and spec["name"] not in only:
            continue
        t0 = time.perf_counter()
        record = run_variant(spec, dense, tokenizer, args, ids)
        record["wall_seconds"] = time.perf_counter() - t0
        write_json_atomic(path, record)
        records.append(record)
        cpu = record["speed"]["cpu"]
        print(f"{spec['name']}: ppl {record['ptb_ppl']:.2f}, bytes {record['bytes']['file_bytes']:,}, "
              f"prefill x{cpu['prefill_speedup']:.2f}, decode x{cpu['decode_speedup']:.2f} (CPU time)",
              flush=True)
    gguf = None
    gguf_path = out / "gguf.json"
    if gguf_path.exists():
        gguf = json.loads(gguf_path.read_text())
    elif not args.skip_gguf:
        gguf = gguf_section(dense, tokenizer, args)
        gguf["dense_ptb_ppl"] = next((r["ptb_ppl"] for r in records if r["name"] == "dense"), None)
        write_json_atomic(gguf_path, gguf)
    if any(r["name"] == "dense" for r in records):
        text = summary(records, gguf, args)
        meta = {"machine": machine(), "versions": versions(), "threads": torch.get_num_threads(),
                "command": "python benchmarks/deploy.py "
                           + " ".join(argv if argv is not None else sys.argv[1:]),
                "note": "2-core CPU shared with other jobs during the run (load average 8-11): speed is "
                        "measured on one thread, interleaved with dense, min of the repeats; CPU-time ratios "
                        "are the work, wall-time ratios what the contended machine showed"}
        write_json_atomic(out / "summary.json", {**meta, "records": records, "gguf": gguf})
        write_text_atomic(out / "summary.md", text)
        plot(records, out / "ppl_vs_speed_and_bytes.png")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
