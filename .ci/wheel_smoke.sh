#!/usr/bin/env bash
# Wheel smoke test: what a user gets from `pip install llmprune-*.whl`, not from the checkout.
# Builds the wheel, installs it into a fresh virtual environment (no system site-packages, no
# editable install) and runs the CLI from a folder outside the repo, so a module or data file
# missing from the wheel (the task YAMLs, say) fails here instead of on a user's machine.
# Needs LLMPRUNE_DATA_DIR (the Makefile exports it); everything else is offline.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
DATA_DIR="${LLMPRUNE_DATA_DIR:-}"
if [[ -z "$DATA_DIR" || ! -d "$DATA_DIR" ]]; then
    echo "wheel smoke test: LLMPRUNE_DATA_DIR must name the shared data folder (got '${DATA_DIR}')" >&2
    exit 2
fi
DATA_DIR="$(cd "$DATA_DIR" && pwd)"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/llmprune-wheel-smoke.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
START=$SECONDS
STEP="start"
step() {
    STEP="$1"
    printf '[wheel smoke %4ss] %s\n' "$((SECONDS - START))" "$STEP"
}
trap 'echo "wheel smoke test FAILED during: ${STEP} (after $((SECONDS - START)) s)" >&2' ERR
# pip's output (this machine's config adds pages of index warnings) is shown only when it fails
quietly() {
    "$@" >"$TMP/quiet.log" 2>&1 || { cat "$TMP/quiet.log" >&2; return 1; }
}

# the hub is never needed; the repo must not leak in through the environment
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV

step "build the wheel"
# From a copy of the sources: setuptools reuses build/ in the source tree, where a module deleted
# from the checkout can linger and slip into the wheel.
mkdir "$TMP/src" "$TMP/dist" "$TMP/work"
tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' -cf - pyproject.toml README.md llmprune | tar -C "$TMP/src" -xf -
quietly "$PYTHON" -m pip wheel --no-deps -w "$TMP/dist" "$TMP/src"
WHEEL="$(ls "$TMP"/dist/llmprune-*.whl)"
echo "built $(basename "$WHEEL")"

step "fresh venv with torch==2.13.0"
"$PYTHON" -m venv "$TMP/venv"
VPY="$TMP/venv/bin/python"
export PATH="$TMP/venv/bin:$PATH"
# torch first, pinned: the pin takes the CPU wheel; unpinned, the wheel's deps pull a CUDA build
quietly "$VPY" -m pip install "torch==2.13.0"

step "install the wheel and its dependencies"
quietly "$VPY" -m pip install "$WHEEL"

cd "$TMP/work"  # outside the repo: nothing there can be imported by accident

step "the installed package is the wheel's"
"$VPY" - "$TMP/venv" <<'EOF'
import sys
from pathlib import Path

import llmprune
from llmprune.evaluation.zeroshot import AVAILABLE_TASKS, tasks_dir

venv = Path(sys.argv[1]).resolve()
where = Path(llmprune.__file__).resolve()
assert venv in where.parents, f"llmprune imported from {where}, not from the venv {venv}"
shipped = {p.stem for p in tasks_dir().glob("*.yaml")}
assert shipped == set(AVAILABLE_TASKS), f"task YAMLs in the wheel: {sorted(shipped)}"
assert (tasks_dir() / "utils.py").is_file(), "utils.py missing from the wheel's tasks/"
print(f"llmprune {llmprune.__version__} from {where.parent}; {len(shipped)} task files")
EOF

step "llmprune --help / python -m llmprune --help"
llmprune --help >/dev/null
"$VPY" -m llmprune --help >/dev/null

step "a tiny random LLaMA model"
"$VPY" - "$TMP/model" <<'EOF'
import sys

import torch
import transformers
from tokenizers import ByteLevelBPETokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

transformers.utils.logging.disable_progress_bar()

corpus = ["the quick brown fox jumps over the lazy dog",
          "pruning removes weights from a network without retraining it"] * 20
bpe = ByteLevelBPETokenizer()
bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1, show_progress=False,
                        special_tokens=["<|endoftext|>"])
tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                              pad_token="<|endoftext|>")
torch.manual_seed(0)
config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                     num_hidden_layers=2, vocab_size=len(tok), max_position_embeddings=256)
LlamaForCausalLM(config).save_pretrained(sys.argv[1])
tok.save_pretrained(sys.argv[1])
EOF

step "llmprune eval: PTB perplexity"
llmprune eval --model "$TMP/model" --data-dir "$DATA_DIR" --dataset ptb --seqlen 64 --max-windows 2 \
    --no-progress | tee "$TMP/ppl.txt"
# the table's row: model dataset seqlen windows tokens ppl seconds tok/s
if ! awk '$2 == "ptb" && $3 == 64 && $4 == 2 && $6 + 0 > 1 && $6 ~ /^[0-9]+\.[0-9]+$/ { ok = 1 } END { exit !ok }' "$TMP/ppl.txt"; then
    echo "no finite PTB perplexity over 2 windows of 64 tokens in the output above" >&2
    false
fi

step "llmprune eval: zero-shot arc_easy on the shipped task files"
llmprune eval --model "$TMP/model" --data-dir "$DATA_DIR" --zeroshot arc_easy --limit 2 --no-progress \
    | tee "$TMP/zs.txt"
if ! grep -Eq '^\| arc_easy \| [^|]+ \| 2 \| [0-9]' "$TMP/zs.txt" || ! grep -q 'mean acc' "$TMP/zs.txt"; then
    echo "no arc_easy accuracy over 2 documents in the output above" >&2
    false
fi

trap - ERR
echo "wheel smoke test passed: $(basename "$WHEEL") in a fresh venv runs llmprune --help, python -m llmprune," \
     "PTB perplexity and zero-shot arc_easy ($((SECONDS - START)) s)"
