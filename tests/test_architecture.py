"""House rules, read from the source with ``ast``: no import cycle in llmprune/, no import of another
module's private name, imports inside functions only for heavy or optional dependencies, short
functions, and specs that load without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llmprune"
# heavy or optional third-party packages a function may import when it runs (not at import time)
LAZY_OK = {"torch", "transformers", "accelerate", "datasets", "lm_eval", "peft", "submitit",
           "compressed_tensors", "matplotlib", "gguf", "safetensors", "tqdm", "pyarrow", "packaging", "numpy",
           "llama_cpp"}
# functions longer than 60 lines whose math or flow reads better whole
LONG_OK: set[str] = {
    "llmprune.math.solvers.sparsegpt.sparsegpt_prune",  # the paper's Algorithm 1: one column-block OBS sweep
    "llmprune.math.dsnot.dsnot",  # DSnoT's prune-and-grow cycles, one loop as in the official code
}
MAX_LINES = 60


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    is_package = (PACKAGE.parent / Path(*base) / "__init__.py").exists()
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_imports(name: str, tree: ast.Module) -> list[tuple[str, ast.AST]]:
    """(imported module, node) of the module-level imports, TYPE_CHECKING blocks left out."""
    out = []

    def visit(body):
        for node in body:
            if isinstance(node, ast.If) and _type_checking(node):
                continue
            if isinstance(node, ast.Import):
                out.extend((alias.name, node) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, node)
                for alias in node.names:  # `from pkg import module` imports the module
                    sub = f"{target}.{alias.name}"
                    out.append((sub if sub in MODULES else target, node))
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body + getattr(node, "orelse", []) + [h for x in getattr(node, "handlers", [])
                                                                  for h in x.body])

    visit(tree.body)
    return out


def _graph() -> dict[str, set[str]]:
    return {name: {mod for mod, _ in _top_imports(name, tree) if mod in MODULES and mod != name}
            for name, tree in MODULES.items()}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_name():
    found = []
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(name, node)
                if target.startswith("llmprune") and target != name:
                    found += [f"{name}: from {target} import {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found


def _torch_free() -> set[str]:
    """Modules whose module-level imports reach neither torch nor transformers."""
    graph = {name: {mod for mod, _ in _top_imports(name, tree)} for name, tree in MODULES.items()}
    heavy: dict[str, bool] = {}

    def is_heavy(name: str, seen: frozenset = frozenset()) -> bool:
        if name in heavy:
            return heavy[name]
        result = False
        for mod in graph[name]:
            if mod.split(".")[0] in ("torch", "transformers") or (
                    mod in MODULES and mod not in seen and is_heavy(mod, seen | {name})):
                result = True
                break
        heavy[name] = result
        return result

    return {name for name in MODULES if not is_heavy(name)}


def _function_imports():
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Import):
                        for alias in sub.names:
                            yield name, node.name, alias.name, sub.lineno
                    elif isinstance(sub, ast.ImportFrom):
                        target = _resolve(name, sub)
                        for alias in sub.names:  # `from pkg import module` imports the module
                            module = f"{target}.{alias.name}"
                            yield name, node.name, module if module in MODULES else target, sub.lineno


def test_imports_inside_functions_only_for_heavy_or_optional_dependencies():
    """A function may import a heavy or optional package, or an llmprune module that imports one
    when its own module must stay light (the report, the parser, the specs read without torch)."""
    light = _torch_free()
    wrong = []
    for module, function, target, line in _function_imports():
        root = target.split(".")[0]
        if root in LAZY_OK:
            continue
        if root == "llmprune" and module in light and target not in light:
            continue
        wrong.append(f"{module}.{function} (line {line}) imports {target}")
    assert not wrong, "imports that belong at the top of their module:\n" + "\n".join(wrong)


def test_functions_are_short():
    long = []
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES and f"{name}.{node.name}" not in LONG_OK:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def test_specs_configs_and_the_report_load_without_torch():
    """The registry, every spec (built-in and plugins), a PruneConfig and the report: no torch."""
    code = ("import sys\n"
            "for name in ('torch', 'transformers', 'lm_eval'):\n"
            "    sys.modules[name] = None\n"
            "import llmprune.methods, llmprune.report, llmprune.recipes\n"
            "from llmprune.config import PruneConfig\n"
            "c = PruneConfig(method='ria', pattern='2:4', permute=True, ria_a=0.7)\n"
            "assert c.ria_a == 0.7 and c.to_dict()['ria_a'] == 0.7\n"
            "assert len(llmprune.methods.METHODS) >= 7\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
