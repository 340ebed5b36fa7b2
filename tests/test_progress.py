"""Progress output: tqdm bars on a terminal, plain periodic lines (no \\r, no escapes) in a file."""

from __future__ import annotations

import io

import pytest

from llmprune import progress as progress_module
from llmprune.errors import LlmpruneError
from llmprune.progress import PROGRESS_SECONDS_ENV, LineProgress, progress


class FakeClock:
    """time.monotonic under the test's control."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress_module.time, "monotonic", fake)
    return fake


def test_plain_lines_in_a_file(clock, monkeypatch):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "10")
    out = io.StringIO()
    with progress(30, "wanda unstructured 50%", "blocks", file=out) as bar:
        assert isinstance(bar, LineProgress)
        for _ in range(30):
            clock.now += 1.23  # 36.9 s in all: a line after blocks 9, 18, 27 (every 10 s at most)
            bar.update()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 4 and all(line.startswith("wanda unstructured 50%: ") for line in lines)
    assert lines[0] == "wanda unstructured 50%: 9/30 blocks (30%), 11.1 s elapsed, ~25.8 s left"
    assert lines[-1] == "wanda unstructured 50%: done, 30/30 blocks in 36.9 s"


def test_every_update_with_zero_seconds_and_close_once(clock, monkeypatch):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0")
    out = io.StringIO()
    bar = progress(3, "ppl ptb", "win", file=out)
    for _ in range(3):
        bar.update()
    bar.set_postfix_str("loading")
    bar.close()
    bar.close()  # a second close writes nothing
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("ppl ptb: 1/3 win (33%)")
    assert lines[-1] == "ppl ptb: done, 3/3 win in 0.0 s [loading]"


def test_stopped_early_and_resumed(clock, monkeypatch):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "5")
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with progress(10, "recover", "step", initial=4, file=out) as bar:
            clock.now += 6
            bar.update(2)  # 2 steps in 6 s in this run: 4 left take ~12 s
            raise RuntimeError("interrupted")
    first, last = out.getvalue().splitlines()
    assert first == "recover: 6/10 step (60%), 6.0 s elapsed, ~12.0 s left"
    assert last == "recover: stopped at 6/10 step after 6.0 s"


def test_iterable_and_unknown_total(clock, monkeypatch):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "10")
    out = io.StringIO()
    assert list(progress(None, "docs", file=out, iterable=[1, 2, 3])) == [1, 2, 3]
    assert out.getvalue() == "docs: done, 3/3 it in 0.0 s\n"  # the total comes from the list's length
    out = io.StringIO()
    with progress(None, "", "tok", file=out) as bar:
        bar.update(5)
    assert out.getvalue() == "done, 5 tok in 0.0 s\n"


def test_disabled_is_silent():
    out = io.StringIO()
    with progress(3, "quiet", file=out, disable=True) as bar:
        bar.update(3)
    assert out.getvalue() == ""


def test_default_stream_is_stderr(capsys):
    with progress(2, "toy", "win") as bar:  # pytest's captured stderr is not a terminal
        bar.update(2)
    err = capsys.readouterr().err
    assert err.startswith("toy: done, 2/2 win in ") and err.endswith(" s\n") and err.count("\n") == 1


def test_terminal_gets_tqdm_bars(monkeypatch):
    from tqdm import tqdm

    monkeypatch.setattr(progress_module.sys, "stderr", Tty())
    outer = progress(2, "outer", "block")
    inner = progress(3, "inner", "layer", leave=False)
    assert isinstance(outer, tqdm) and isinstance(inner, tqdm)
    assert inner.leave is False and outer.pos != inner.pos  # tqdm stacks nested bars
    for _ in range(3):
        inner.update()
    inner.close()
    outer.update(2)
    outer.close()
    assert "outer" in progress_module.sys.stderr.getvalue()


def test_bad_interval_names_the_variable(monkeypatch):
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(PROGRESS_SECONDS_ENV, bad)
        with pytest.raises(LlmpruneError, match=PROGRESS_SECONDS_ENV):
            progress(3, "x", file=io.StringIO())


def test_lm_eval_bars_become_lines_in_a_file(capsys):
    """Zero-shot: lm-eval's own tqdm bars turn into plain lines too, and come back afterwards."""
    import lm_eval.api.model as model_module
    import lm_eval.api.task as task_module
    import lm_eval.models.huggingface as hf_module
    from tqdm import tqdm

    from llmprune.evaluation import zeroshot

    modules = (task_module, model_module, hf_module)
    with zeroshot._progress(True):
        assert list(task_module.tqdm(range(3), total=3)) == [0, 1, 2]  # "building contexts"
        bar = hf_module.tqdm(total=2, disable=False, desc="Running loglikelihood requests")
        bar.update(1)
        bar.update(1)
        bar.close()
        assert list(model_module.tqdm([1], desc="Tokenizing inputs", disable=True)) == [1]
    assert all(module.tqdm is tqdm for module in modules)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    assert err.splitlines()[0].startswith("lm-eval: done, 3/3 it in ")
    assert err.splitlines()[1].startswith("Running loglikelihood requests: done, 2/2 it in ")
    assert len(err.splitlines()) == 2  # the disabled bar says nothing
    with zeroshot._progress(False):  # as before: only the bar no flag reaches is switched off
        assert list(task_module.tqdm(range(2))) == [0, 1] and hf_module.tqdm is tqdm
    assert capsys.readouterr().err == "" and task_module.tqdm is tqdm


def test_zeroshot_in_a_log_file_same_scores(data_dir, capsys):
    """End to end: a zero-shot run whose stderr is a file writes plain lines, and scores as without them."""
    from conftest import make_model, make_tokenizer
    from llmprune.evaluation.zeroshot import zeroshot

    model, tokenizer = make_model(vocab_size=512), make_tokenizer()
    quiet = zeroshot(model, tokenizer, ["arc_easy", "boolq"], limit=4, batch_size=2, data_dir=data_dir,
                     progress=False)
    assert capsys.readouterr().err == ""
    shown = zeroshot(model, tokenizer, ["arc_easy", "boolq"], limit=4, batch_size=2, data_dir=data_dir,
                     progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    assert err.count("Running loglikelihood requests: done, ") == 2  # one per task
    assert {n: (t.acc, t.acc_norm) for n, t in shown.tasks.items()} == {
        n: (t.acc, t.acc_norm) for n, t in quiet.tasks.items()}


def test_loading_a_gguf_into_a_log_file_writes_no_library_bars(tmp_path, capfd):
    """transformers de-quantizes a GGUF under a tqdm bar of its own: in a log file it must not draw."""
    from transformers.utils import logging as hf_logging

    from conftest import make_model, make_tokenizer
    from llmprune.export.gguf import export_gguf
    from llmprune.models import load_model

    gguf = tmp_path / "tiny.gguf"
    export_gguf(make_model("llama", vocab_size=400), make_tokenizer(), gguf)
    capfd.readouterr()
    enabled = hf_logging.is_progress_bar_enabled()
    load_model(gguf, dtype="float32")
    err = capfd.readouterr().err
    assert "\r" not in err and "de-quantizing" not in err, err[:300]
    assert hf_logging.is_progress_bar_enabled() == enabled  # the switch is put back


def test_library_bars_draw_on_a_terminal(capfd):
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from llmprune.progress import library_bars

    with library_bars(show=False):
        list(gguf_utils.tqdm(range(3), desc="quiet-bar"))
    with library_bars(show=True):
        list(gguf_utils.tqdm(range(3), desc="shown-bar"))
    err = capfd.readouterr().err
    assert "quiet-bar" not in err and "shown-bar" in err
