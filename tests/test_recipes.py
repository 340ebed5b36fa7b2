"""Recipe format: merging, grids, and one clear error naming the key's path for each bad input."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from llmprune.config import (
    CalibConfig,
    EvalConfig,
    Pattern,
    PruneConfig,
    RecoverConfig,
    SlurmConfig,
    field_default,
)
from llmprune.errors import LlmpruneError
from llmprune.recipes import (
    TOP_KEYS,
    deep_merge,
    describe_type,
    load_recipe,
    parse_recipe,
    run_schema,
    slugify,
)
from llmprune.registry import METHODS, OPTION_REGISTRIES
from llmprune.registry import field_default as registry_default
from llmprune.runner import plan

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


def _recipe(runs=None, defaults=None, **top):
    data = {"name": "t", "defaults": defaults if defaults is not None else {"model": "m"}}
    if runs is not None:
        data["runs"] = runs
    data.update(top)
    return data


def _error(data) -> str:
    with pytest.raises(LlmpruneError) as info:
        parse_recipe(data)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_deep_merge_with_run_overrides():
    recipe = parse_recipe(_recipe(
        defaults={"model": "m", "prune": {"method": "wanda", "sparsity": 0.5,
                                          "calib": {"dataset": "c4", "nsamples": 32, "seqlen": 64}},
                  "eval": {"datasets": ["ptb"], "seqlen": 64}},
        runs=[{"name": "a", "prune": {"method": "magnitude"}},
              {"name": "b", "prune": {"pattern": "2:4", "calib": {"nsamples": 8}},
               "eval": {"datasets": ["c4", "ptb"]}}],
    ))
    a, b = recipe.runs
    assert (a.prune.method, a.prune.sparsity, a.prune.calib.nsamples, a.prune.calib.seqlen) == \
        ("magnitude", 0.5, 32, 64)
    assert (b.prune.method, b.prune.pattern, b.prune.calib.nsamples, b.prune.calib.dataset) == \
        ("wanda", Pattern(2, 4), 8, "c4")
    assert b.eval.datasets == ("c4", "ptb") and b.eval.seqlen == 64
    assert a.eval.datasets == ("ptb",)


def test_deep_merge_replaces_lists_and_scalars_and_keeps_inputs():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    merged = deep_merge(base, {"a": {"y": [3]}, "b": None})
    assert merged == {"a": {"x": 1, "y": [3]}, "b": None}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1}


def test_grid_expands_a_product_with_generated_names():
    recipe = parse_recipe(_recipe(grid=[
        {"name": "{method}-{sparsity:.0%}",
         "axes": {"prune.method": ["magnitude", "wanda"], "prune.sparsity": [0.1, 0.5]}},
        {"axes": {"prune.calib.nsamples": [1, 2]}, "prune": {"method": "sparsegpt"}},
    ]))
    assert recipe.names == ["magnitude-10%", "magnitude-50%", "wanda-10%", "wanda-50%", "1", "2"]
    assert recipe.run("wanda-10%").prune.sparsity == 0.1
    assert recipe.run("2").prune.method == "sparsegpt" and recipe.run("2").prune.calib.nsamples == 2


def test_unquoted_nm_pattern_is_read_as_text_not_base_60(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ndefaults: {model: m}\nruns:\n  - name: a\n    prune: {pattern: 2:4}\n")
    assert load_recipe(path).runs[0].prune.pattern == Pattern(2, 4)


def test_yaml_anchors_and_merge_keys_work(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("x-nm: &nm {method: sparsegpt, pattern: 2:4}\ndefaults: {model: m}\n"
                    "runs:\n  - {name: a, prune: {<<: *nm, pattern: 4:8}}\n  - {name: b, prune: *nm}\n")
    a, b = load_recipe(path).runs
    assert (a.prune.method, a.prune.pattern, b.prune.pattern) == ("sparsegpt", Pattern(4, 8), Pattern(2, 4))


@pytest.mark.parametrize("data, needle", [
    (_recipe([{"name": "a"}, {"name": "b"}, {"name": "c"},
              {"name": "d", "prune": {"calib": {"nsampels": 3}}}]),
     "unknown key runs[3].prune.calib.nsampels"),
    (_recipe([{"name": "a", "evl": {}}]), "unknown key runs[0].evl"),
    (_recipe([{"name": "a"}], defaults={"model": "m", "prune": {"sparsty": 0.5}}),
     "unknown key defaults.prune.sparsty"),
    (_recipe([{"name": "a"}], extra=1), "unknown key extra"),
    (_recipe(grid={"axes": {"prune.calib.nsampels": [1]}}), "unknown key grid[0].axes.prune.calib.nsampels"),
])
def test_unknown_key_is_named_with_its_path(data, needle):
    assert needle in _error(data)


@pytest.mark.parametrize("data, needle", [
    (_recipe([{"name": "a", "prune": {"sparsity": "half"}}]), "runs[0].prune.sparsity must be a number"),
    (_recipe([{"name": "a", "prune": {"calib": {"nsamples": "32"}}}]),
     "runs[0].prune.calib.nsamples must be an integer"),
    (_recipe([{"name": "a", "eval": {"datasets": 5}}]), "runs[0].eval.datasets must be a list of strings"),
    (_recipe([{"name": "a", "prune": {"pattern": 124}}]), 'quote N:M patterns'),
    (_recipe([{"name": "a", "prune": None}]), "runs[0].prune must be a mapping"),
    (_recipe([{"name": 3}]), "runs[0].name must be a string"),
    (_recipe({"name": "a"}), "runs must be a list"),
    (_recipe(grid={"axes": {"prune.calib.nsamples": [1, "x"]}}),
     "grid[0].axes.prune.calib.nsamples must be an integer"),
])
def test_wrong_type_is_named_with_its_path(data, needle):
    assert needle in _error(data)


@pytest.mark.parametrize("data, needle", [
    (_recipe([{"name": "a", "prune": {"sparsity": 0.6, "pattern": "2:4"}}]),
     "runs[0].prune: sparsity 0.6 disagrees"),
    (_recipe([{"name": "a", "prune": {"method": "wnada"}}]), "runs[0].prune: unknown pruning method 'wnada'"),
    (_recipe([{"name": "a", "prune": {"method": "dense"}}]), "dense baselines are evaluated automatically"),
    (_recipe([{"name": "a", "dtype": "float8"}]), "runs[0].dtype 'float8' is unknown"),
    (_recipe([{"name": "a"}], defaults={}), "runs[0].model is missing"),
    (_recipe([]), "no runs"),
    (_recipe(grid={"name": "{method}-{foo}", "axes": {"prune.method": ["wanda"]}}),
     "uses {foo}, which is not an axis"),
])
def test_bad_values_are_named_with_their_path(data, needle):
    assert needle in _error(data)


def test_duplicate_run_name_is_an_error():
    message = _error(_recipe([{"name": "a"}, {"name": "b"}, {"name": "a", "prune": {"method": "magnitude"}}]))
    assert "runs[2].name 'a' is used twice (first at runs[0])" in message


def test_duplicate_name_between_runs_and_grid_is_an_error():
    message = _error(_recipe([{"name": "wanda"}], grid={"axes": {"prune.method": ["magnitude", "wanda"]}}))
    assert "'wanda' is used twice" in message


def test_names_that_collide_as_file_names_are_an_error():
    assert slugify("wanda-2:4") == "wanda-2_4" and slugify("magnitude-50%") == "magnitude-50pct"
    assert "same result file name" in _error(_recipe([{"name": "a:b"}, {"name": "a_b"}]))


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ndefaults: {model: m}\nruns:\n  - name: a\n    name: b\n")
    with pytest.raises(LlmpruneError, match="line 5: key 'name' appears twice"):
        load_recipe(path)


def test_bad_yaml_and_missing_file_are_one_line_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nruns: [\n")
    with pytest.raises(LlmpruneError, match=r"r.yaml: invalid YAML at line \d+"):
        load_recipe(path)
    with pytest.raises(LlmpruneError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ndefaults: {model: m}\nruns:\n  - {name: a, prune: {calib: {nsampels: 3}}}\n")
    with pytest.raises(LlmpruneError, match=r"r.yaml line 4: unknown key runs\[0\].prune.calib.nsampels"):
        load_recipe(path)


LINES = """\
name: lines
x-zeroshot: &zeroshot
  zeroshot: [rte]
  limit: 2
x-nm: &nm
  method: wanda
  pattern: "2:4"
defaults:
  model: org/m
  prune:
    sparsity: 0.5
    calib: {dataset: c4, nsamples: 8}
  eval: {datasets: [wikitext2], max_windows: 2}
runs:
  - name: a
    prune: {method: magnitude}
  - name: b
    eval: *zeroshot
    prune:
      <<: *nm
      calib:
        seed: 1
grid:
  - name: "{method}-{sparsity}"
    prune: {calib: {seed: 2}}
    axes:
      prune.method: [magnitude, wanda]
      prune.sparsity: [0.5, 0.6]
slurm:
  time: 30
"""


@pytest.mark.parametrize("old, new, where", [
    # an unknown key: its own line, with the close known key
    ("    sparsity: 0.5\n", "    sparsity_: 0.5\n",
     "line 11: unknown key defaults.prune.sparsity_ (did you mean 'sparsity'?)"),
    ("    prune: {method: magnitude}", "    prune: {methd: magnitude}",
     "line 16: unknown key runs[0].prune.methd (did you mean 'method'?)"),
    ("        seed: 1", "        sed: 1",
     "line 22: unknown key runs[1].prune.calib.sed (did you mean 'seed'?)"),
    ("      prune.sparsity: [0.5", "      prune.sparsty: [0.5",
     "line 28: unknown key grid[0].axes.prune.sparsty (did you mean 'sparsity'?)"),
    ("    prune: {calib: {seed: 2}}", "    prune: {calib: {sed: 2}}",
     "line 25: unknown key grid[0].prune.calib.sed"),
    ("slurm:\n  time: 30", "slurm:\n  tme: 30", "line 30: unknown key slurm.tme (did you mean 'time'?)"),
    ("grid:\n", "gird:\n", "line 23: unknown key gird (did you mean 'grid'?)"),
    # inside an anchor: the line where the key is written, whichever run uses it
    ("  limit: 2", "  limt: 2", "line 4: unknown key runs[1].eval.limt (did you mean 'limit'?)"),
    ("  method: wanda\n", "  metod: wanda\n",
     "line 6: unknown key runs[1].prune.metod (did you mean 'method'?)"),
    # a key nothing is close to: the known keys instead
    ("  - name: a\n", "  - name: a\n    colour: red\n",
     "line 16: unknown key runs[0].colour: known keys there are"),
    # a wrong type
    ("    calib: {dataset: c4, nsamples: 8}", "    calib: {dataset: c4, nsamples: eight}",
     "line 12: defaults.prune.calib.nsamples must be an integer, got 'eight'"),
    ("  eval: {datasets: [wikitext2], max_windows: 2}", "  eval: {datasets: [wikitext2], max_windows: two}",
     "line 13: defaults.eval.max_windows must be an integer or null"),
    ("      prune.sparsity: [0.5, 0.6]", "      prune.sparsity: [0.5, half]",
     "line 28: grid[0].axes.prune.sparsity must be a number"),
    ("  time: 30", "  time: half an hour", "line 30: slurm.time must be an integer"),
    ("name: lines\n", "name: lines\ndense: maybe\n", "line 2: dense must be true or false"),
    # a value the config refuses, or a missing key: the nearest place written in the file
    ("    prune: {method: magnitude}", "    prune: {method: magnitude, pattern: \"4:2\"}",
     "line 16: runs[0].prune: pattern '4:2' is invalid"),
    ("    prune: {method: magnitude}", "    prune: {method: wnada}",
     "line 16: runs[0].prune: unknown pruning method"),
    ("  - name: b\n", "  - name: dense-b\n", "line 17: runs[1].name 'dense-b': names starting with 'dense'"),
    ("  - name: b\n", "  - name: a\n", "line 17: runs[1].name 'a' is used twice"),
    ("  model: org/m\n", "", "line 14: runs[0].model is missing"),
    ('  - name: "{method}-{sparsity}"', '  - name: "{method}-{sparsity}-{seed}"',
     "line 24: grid[0].name template"),
    ('      prune.method: [magnitude, wanda]', '      prune.method: [magnitude, dense]',
     "line 24: grid[0] (run 'dense-0.5').name 'dense-0.5': names starting with 'dense' are kept"),
])
def test_recipe_errors_name_the_line(tmp_path, old, new, where):
    assert LINES.count(old) == 1, old
    path = tmp_path / "lines.yaml"
    path.write_text(LINES.replace(old, new))
    with pytest.raises(LlmpruneError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path} {where}") and "\n" not in message, message


def test_the_lines_recipe_itself_is_valid(tmp_path):
    path = tmp_path / "lines.yaml"
    path.write_text(LINES)
    recipe = load_recipe(path)
    assert recipe.names == ["a", "b", "magnitude-0.5", "magnitude-0.6", "wanda-0.5", "wanda-0.6"]
    assert recipe.run("b").prune.pattern == Pattern(2, 4) and recipe.run("b").eval.limit == 2


def test_errors_without_a_place_name_the_file_only(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("name: e\ndefaults: {model: m}\n")
    with pytest.raises(LlmpruneError, match=r"empty.yaml: the recipe has no runs"):
        load_recipe(path)


def test_recipe_name_defaults_to_the_file_stem(tmp_path):
    path = tmp_path / "my_table.yaml"
    path.write_text("defaults: {model: m}\nruns: [{name: a}]\n")
    assert load_recipe(path).name == "my_table"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem and recipe.description
    assert len(recipe.runs) == len(set(recipe.names)) > 0
    assert all(run["prune"]["method"] in METHODS for run in recipe.to_dict()["runs"])


def test_shipped_recipes_are_the_stated_tables():
    assert {p.stem for p in SHIPPED} >= {"paper_llama", "smollm2_cpu", "ablation_group", "ablation_nsamples",
                                         "sweep_sparsity"}
    paper = load_recipe(ROOT / "recipes" / "paper_llama.yaml")
    assert len(paper.runs) == 18
    for run in paper.runs:
        seqlen = 2048 if run.model == "huggyllama/llama-7b" else 4096
        assert run.model in ("huggyllama/llama-7b", "meta-llama/Llama-2-7b-hf")
        assert run.prune.calib.seqlen == run.eval.seqlen == seqlen
        assert (run.prune.calib.dataset, run.prune.calib.nsamples, run.prune.sparsity) == ("c4", 128, 0.5)
        assert run.eval.datasets == ("wikitext2",)
        assert set(run.eval.zeroshot) == {"boolq", "rte", "hellaswag", "winogrande", "arc_easy",
                                          "arc_challenge", "openbookqa"}
    assert {(r.prune.method, str(r.prune.pattern)) for r in paper.runs} == {
        (m, p) for m in ("magnitude", "sparsegpt", "wanda") for p in ("unstructured", "4:8", "2:4")}
    assert [j.name for j in plan(paper) if j.prune is None] == ["dense-llama-7b", "dense-Llama-2-7b-hf"]

    cpu = load_recipe(ROOT / "recipes" / "smollm2_cpu.yaml")
    assert len(cpu.runs) == 9 and {r.model for r in cpu.runs} == {"smollm2-135m"}
    assert {(r.prune.calib.nsamples, r.prune.calib.seqlen, r.eval.seqlen) for r in cpu.runs} == \
        {(8, 2048, 2048)}
    assert {r.eval.datasets for r in cpu.runs} == {("ptb",)}
    assert {r.eval.max_windows for r in cpu.runs} == {16}
    # zero-shot for Wanda 50% only (and so for its dense baseline)
    assert {r.name for r in cpu.runs if r.eval.zeroshot} == {"wanda-unstructured"}

    nsamples = load_recipe(ROOT / "recipes" / "ablation_nsamples.yaml")
    assert sorted({r.prune.calib.nsamples for r in nsamples.runs}) == [1, 2, 4, 8, 16, 32, 64, 128]
    group = load_recipe(ROOT / "recipes" / "ablation_group.yaml")
    assert {(r.prune.group, r.prune.metric) for r in group.runs} == {
        (g, m) for g in ("row", "column", "layer") for m in ("weight", "activation", "wanda")}
    sweep = load_recipe(ROOT / "recipes" / "sweep_sparsity.yaml")
    assert sorted({r.prune.sparsity for r in sweep.runs}) == \
        pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    assert {r.prune.method for r in sweep.runs} == {"magnitude", "sparsegpt", "wanda"}


# ---------------------------------------------------------------------------------------------
# docs/recipes.md documents every key, with the defaults the dataclasses have


DOC = ROOT / "docs" / "recipes.md"


def _doc_tables() -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [cells after the key]}}`` of the tables that follow ``<!-- keys: SECTION -->``."""
    tables: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        marker = re.fullmatch(r"<!-- keys: (\w+) -->", line.strip())
        if marker:
            section = marker.group(1)
            tables[section] = {}
        elif section and line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            tables[section][cells[0].strip("`")] = cells[1:]
        elif section and tables[section] and not line.startswith("|"):
            section = None
    return tables


def _doc_default(value) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return f"`[{', '.join(value)}]`"
    return f"`{value}`"


def _builtin_options() -> dict[str, tuple[list[str], type, dataclasses.Field]]:
    """Each option of the components llmprune ships: (the specs using it, its options class, field)."""
    out: dict[str, tuple[list[str], type, dataclasses.Field]] = {}
    for registry in OPTION_REGISTRIES:
        for spec in registry:
            if spec.options.__module__.startswith("llmprune."):  # not a plugin installed here
                for f in dataclasses.fields(spec.options):
                    out.setdefault(f.name, ([], spec.options, f))[0].append(spec.name)
    return out


@pytest.mark.parametrize("section, cls", [("prune", PruneConfig), ("calib", CalibConfig),
                                          ("eval", EvalConfig), ("recover", RecoverConfig),
                                          ("slurm", SlurmConfig)])
def test_docs_list_every_key_with_its_type_and_default(section, cls):
    rows = _doc_tables()[section]
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.name != "options"]
    assert list(rows) == fields, f"docs/recipes.md's {section} table must list exactly {fields}"
    for name in fields:
        if name == "calib":
            continue
        takes, default = rows[name][0], rows[name][1]
        assert takes == describe_type(hints[name]).replace("|", "\\|"), name
        value = field_default(cls, name)
        assert default == _doc_default(str(value) if isinstance(value, Pattern) else value), name


def test_docs_list_every_option_of_the_builtin_components():
    rows = _doc_tables()["options"]
    options = _builtin_options()
    assert sorted(rows) == sorted(options), "docs/recipes.md's options table must list every built-in option"
    for name, (users, owner, f) in options.items():
        assert rows[name][0] == ", ".join(users), name
        assert rows[name][1] == describe_type(typing.get_type_hints(owner)[name]).replace("|", "\\|"), name
        assert rows[name][2] == _doc_default(registry_default(f)), name


def test_docs_list_the_top_level_run_and_grid_keys():
    tables = _doc_tables()
    assert set(tables["top"]) == set(TOP_KEYS) | {"x-…"}
    assert set(tables["run"]) == set(run_schema())
    assert {"axes", "name"} <= set(tables["grid"])
