"""The result record: one schema written and read in one place; effective group/metric; no torch to read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llmprune.config import EvalConfig, PruneConfig
from llmprune.engine.mask import prune_weight
from llmprune.io import write_json_atomic, write_text_atomic
from llmprune.methods import METHODS
from llmprune.results import (
    AVAILABLE_TASKS,
    DENSE,
    RESULT_SCHEMA,
    effective_group_metric,
    embedded_dense,
    is_result,
    parse_result,
    result_record,
    task_order,
)
from llmprune.stats import LayerStats

# what the papers prescribe (Wanda: per output row, |W|*||X||; magnitude and SparseGPT: per layer)
PAPER_DEFAULTS = {"magnitude": ("layer", "weight"), "wanda": ("row", "wanda"), "sparsegpt": ("layer", None)}


def test_schema_id_is_stable():
    # files written by earlier versions must keep being read: changing this is a new schema
    assert RESULT_SCHEMA == "llmprune.result/1" and DENSE == "dense"
    assert AVAILABLE_TASKS[:7] == ("boolq", "rte", "hellaswag", "winogrande", "arc_easy",
                                   "arc_challenge", "openbookqa")


@pytest.mark.parametrize("method", sorted(PAPER_DEFAULTS))
def test_effective_group_metric_fills_defaults_and_honours_choices(method):
    assert set(PAPER_DEFAULTS) <= set(METHODS.names())
    group, metric = PAPER_DEFAULTS[method]
    assert effective_group_metric(PruneConfig(method=method)) == (group, metric)
    for pattern in ("2:4", "1:4", "4:8"):  # N:M fixes the groups; the metric still applies
        assert effective_group_metric(PruneConfig(method=method, pattern=pattern)) == (None, metric)
    if method != "sparsegpt":  # sparsegpt refuses group/metric options
        assert effective_group_metric(PruneConfig(method=method, group="column", metric="activation")) == \
            ("column", "activation")
        assert effective_group_metric(PruneConfig(method=method, pattern="2:4", group="column")) == \
            (None, metric)
        # the variant's threshold is per output row, whatever the group says
        assert effective_group_metric(PruneConfig(method=method, use_variant=True, group="layer")) == \
            ("row", metric)


@pytest.mark.parametrize("options", [{}, {"group": "column"}, {"group": "layer", "metric": "activation"},
                                     {"metric": "weight"}, {"pattern": "2:4"},
                                     {"pattern": "1:4", "group": "row"}, {"use_variant": True},
                                     {"use_variant": True, "group": "layer"}])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_effective_group_metric_is_what_the_method_prunes_with(method, options):
    config = PruneConfig(method=method, **options)
    weight = torch.randn(8, 16)
    stats = LayerStats(tokens=4, sq_norm=torch.rand(16) + 0.1)
    _, info = prune_weight(METHODS.get(method), weight, stats, config)
    assert (info["group"], info["metric"]) == effective_group_metric(config)


def _wanda_record(**extra):
    config = PruneConfig(method="wanda", pattern="2:4",
                         calib={"dataset": "wikitext2", "nsamples": 16, "seed": 3})
    return result_record(
        name="wanda-2:4", model="org/tiny", config=config,
        eval_config=EvalConfig(datasets=("ptb",), seqlen=64, zeroshot=("rte", "boolq"), limit=10),
        perplexity={"ptb": {"dataset": "ptb", "ppl": 12.5, "windows": 3}},
        zeroshot={"tasks": {"rte": {"acc": 0.5}, "boolq": {"acc": 0.75}}, "mean_acc": 0.625},
        prune_report={"seconds": 2.5, "overall_sparsity": 0.4999}, recipe="r", **extra)


def test_record_round_trip_through_a_file(tmp_path):
    path = write_json_atomic(tmp_path / "wanda.json", _wanda_record())
    record = json.loads(path.read_text())
    assert is_result(record) and not is_result({"schema": "llmprune.recipe/1"}) and not is_result([record])
    r = parse_result(record, path.name)
    assert (r.file, r.name, r.model, r.method, r.recipe) == \
        ("wanda.json", "wanda-2:4", "org/tiny", "wanda", "r")
    assert (r.sparsity, r.pattern, r.nm, r.structured, r.setting_label) == (0.5, "2:4", (2, 4), True, "2:4")
    assert (r.group, r.metric, r.nsamples, r.seed, r.calib) == (None, "wanda", 16, 3, "wikitext2")
    assert (r.eval_seqlen, r.max_windows, r.zs_limit) == (64, None, 10)
    assert r.ppl == {"ptb": 12.5} and r.acc == {"rte": 0.5, "boolq": 0.75} and r.mean_acc == 0.625
    assert (r.prune_seconds, r.actual_sparsity, r.dense) == (2.5, 0.4999, False)
    assert r.zs_key == (("boolq", "rte"), 10)  # tasks in the paper's order, not the run's
    assert "torch" in r.versions and r.machine


def test_dense_and_data_free_records(tmp_path):
    dense = parse_result(result_record(name=DENSE, model="m", eval_config=EvalConfig()), "d.json")
    assert dense.dense
    assert (dense.sparsity, dense.group, dense.metric, dense.nsamples) == (0.0, None, None, None)
    magnitude = result_record(name="mag", model="m", config=PruneConfig(method="magnitude", sparsity=0.7))
    assert (magnitude["group"], magnitude["metric"], magnitude["nsamples"], magnitude["seed"]) == \
        ("layer", "weight", None, None)  # no calibration data used: none recorded
    assert parse_result(magnitude, "m.json").setting_label == "70%"


def test_structured_records_are_not_named_unstructured():
    # wanda-sp/flap keep the config's default pattern; the record and table say what they did
    sp = result_record(name="sp", model="m", config=PruneConfig(method="wanda-sp", sparsity=0.3))
    wanda = result_record(name="w", model="m", config=PruneConfig(method="wanda", sparsity=0.3))
    assert (sp["pattern"], wanda["pattern"]) == ("structured", "unstructured")
    a, b = parse_result(sp, "sp.json"), parse_result(wanda, "w.json")
    assert (a.setting_label, b.setting_label) == ("30% structured", "30%")
    assert a.nm is None and b.setting < a.setting  # its own column, after unstructured and N:M


def test_embedded_dense_baseline():
    base = {"perplexity": {"ptb": {"ppl": 10.0}}, "zeroshot": None}
    record = _wanda_record(dense=base)
    dense = embedded_dense(record, "w.json")
    assert dense.dense and dense.file == "w.json#dense" and dense.ppl == {"ptb": 10.0}
    assert (dense.model, dense.eval_seqlen) == ("org/tiny", 64)  # compared under the same evaluation
    assert embedded_dense(_wanda_record(), "w.json") is None


def test_incomplete_record_names_what_is_missing():
    from llmprune.errors import LlmpruneError

    with pytest.raises(LlmpruneError, match="x.json has no 'model'"):
        parse_result({"schema": RESULT_SCHEMA, "name": "a", "method": "wanda"}, "x.json")


def test_task_order_paper_first_then_by_name():
    assert task_order(["zzz", "piqa", "rte", "aaa", "boolq"]) == ("boolq", "rte", "piqa", "aaa", "zzz")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = write_text_atomic(tmp_path / "t.md", "a\r\nb\n")
    assert path.read_bytes() == b"a\r\nb\n"  # newlines as given
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})
    assert path.read_bytes() == b"a\r\nb\n" and [p.name for p in tmp_path.iterdir()] == ["t.md"]


def test_reading_and_writing_json_needs_no_torch(tmp_path):
    code = ("import sys\n"
            "for name in ('torch', 'transformers', 'lm_eval'):\n"
            "    sys.modules[name] = None\n"
            "import json, llmprune.io, llmprune.report, llmprune.results as results\n"
            "path = llmprune.io.write_json_atomic(sys.argv[1], {'schema': results.RESULT_SCHEMA, "
            "'name': 'n', 'model': 'm', 'method': 'dense'})\n"
            "assert results.parse_result(json.loads(path.read_text()), path.name).dense\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.json")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
