"""Recovery that keeps the zeros: masked distillation and LoRA on tiny models, resume, bad input."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import CORPUS, make_model, make_tokenizer
from llmprune.cli import main
from llmprune.config import EvalConfig, PruneConfig, RecoverConfig
from llmprune.engine import prune
from llmprune.errors import LlmpruneError
from llmprune.io import save_pruned
from llmprune.models import get_blocks, prunable_linears
from llmprune.recover import (
    RecoverWarning,
    check_inputs,
    check_resume,
    distill_loss,
    gap_closed,
    lr_factor,
    recover,
)

pytest.importorskip("peft", reason="the lora tests need peft: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """A training text and a different evaluation text (local files: no data dir needed)."""
    folder = tmp_path_factory.mktemp("texts")
    train, held_out = folder / "train.txt", folder / "eval.txt"
    train.write_text("\n".join(CORPUS * 4), encoding="utf-8")
    held_out.write_text("\n".join(reversed(CORPUS)), encoding="utf-8")
    return str(train), str(held_out)


def _teacher(seed=0, **kw):
    # a larger init than the default 0.02 gives peaked logits, so pruning moves them measurably
    return make_model("llama", seed=seed, initializer_range=0.2, **kw)


def _pruned(teacher, tokenizer, pattern="unstructured"):
    student = copy.deepcopy(teacher)
    prune(student, tokenizer, PruneConfig(method="magnitude", pattern=pattern), progress=False)
    return student


def _config(texts, **kw):
    kw = {"steps": 4, "seqlen": 16, "batch_size": 2, "data": texts[0], "warmup_steps": 0, **kw}
    return RecoverConfig(**kw)


def _zeros(model):
    return {f"{i}.{n}": (m.weight == 0).clone() for i in range(len(get_blocks(model)))
            for n, m in prunable_linears(model, i).items()}


def _weights(model):
    return {f"{i}.{n}": m.weight.detach().clone() for i in range(len(get_blocks(model)))
            for n, m in prunable_linears(model, i).items()}


# ---------------------------------------------------------------------------------------------
# the pure parts


def test_distill_loss_is_kl_teacher_to_student_times_t_squared():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    assert distill_loss(t, t, ids).item() == pytest.approx(0.0, abs=1e-6)
    p = F.softmax(t / 2, -1)
    by_hand = (p * (p.log() - F.log_softmax(s / 2, -1))).sum(-1).mean() * 4  # KL(teacher || student) * T^2
    assert distill_loss(s, t, ids, temperature=2.0).item() == pytest.approx(by_hand.item(), rel=1e-5)
    reverse = (F.softmax(s / 2, -1) * (F.log_softmax(s / 2, -1) - p.log())).sum(-1).mean() * 4
    assert not math.isclose(by_hand.item(), reverse.item(), rel_tol=1e-3)  # the direction is tested
    ce = F.cross_entropy(s[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1))
    assert distill_loss(s, t, ids, alpha=1.0).item() == pytest.approx(ce.item(), rel=1e-6)
    mixed = 0.7 * distill_loss(s, t, ids) + 0.3 * ce
    assert distill_loss(s, t, ids, alpha=0.3).item() == pytest.approx(mixed.item(), rel=1e-6)


def test_lr_schedule_warmup_then_constant_or_linear():
    constant = RecoverConfig(steps=10, warmup_steps=3)
    assert [lr_factor(constant, k) for k in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    linear = RecoverConfig(steps=10, warmup_steps=0, lr_schedule="linear")
    assert [lr_factor(linear, k) for k in (0, 5, 9)] == [1.0, 0.5, pytest.approx(0.1)]
    assert gap_closed(40.0, 100.0, 80.0) == pytest.approx(1 / 3)
    assert gap_closed(None, 100.0, 80.0) is None


# ---------------------------------------------------------------------------------------------
# zeros stay zero; the loss goes down; the checkpoint is plain


@pytest.mark.parametrize("method", ["kd", "lora"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_zero_stays_exactly_zero(tokenizer, texts, method, pattern):
    teacher = _teacher()
    student = _pruned(teacher, tokenizer, pattern)
    zeros, before = _zeros(student), _weights(student)
    report = recover(student, teacher, tokenizer, _config(texts, method=method, lr=1e-2), progress=False)
    changed = 0
    for name, weight in _weights(student).items():
        assert (weight[zeros[name]] == 0).all(), f"{name}: a pruned weight came back"
        changed += int((weight != before[name]).sum())
        if pattern == "2:4":
            kept = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
            assert (kept <= 2).all(), f"{name} is no longer 2:4"
    assert changed > 0, "recovery must train the kept weights"
    assert report.zeros_after == report.zeros_before == sum(int(z.sum()) for z in zeros.values())
    assert report.steps_done == 4 and report.tokens == 4 * 2 * 16
    assert not any("lora" in n for n, _ in student.named_parameters())  # merged: plain Linears again
    assert all(p.requires_grad for p in student.parameters())  # flags restored


def test_kd_loss_decreases(tokenizer, texts):
    teacher = _teacher()
    student = _pruned(teacher, tokenizer)
    text = open(texts[1], encoding="utf-8").read()
    ids = tokenizer(text, return_tensors="pt").input_ids[0, :64].reshape(4, 16)  # a fixed held-out batch

    def held_out_loss():
        with torch.no_grad():
            return distill_loss(student(ids).logits, teacher(ids).logits, ids).item()

    first = held_out_loss()
    report = recover(student, teacher, tokenizer, _config(texts, steps=8, lr=3e-3), progress=False)
    assert held_out_loss() < 0.8 * first
    assert report.losses[-1] < report.losses[0]


def test_lora_checkpoint_loads_with_from_pretrained_and_same_zeros(tokenizer, texts, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher = _teacher()
    student = _pruned(teacher, tokenizer, "2:4")
    zeros = _zeros(student)
    ckpt = tmp_path / "ckpt"
    recover(student, teacher, tokenizer, _config(texts, method="lora", lr=1e-2, checkpoint_every=2),
            progress=False, checkpoint_dir=ckpt)
    # the checkpoint written while training is a plain sparse model too (with the resume state)
    mid = AutoModelForCausalLM.from_pretrained(ckpt)
    assert (ckpt / "recover_state.pt").is_file() and not (ckpt / "adapter_config.json").exists()
    out = save_pruned(student, tokenizer, tmp_path / "final", {"recover": {"complete": True}})
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert sorted(p.name for p in out.iterdir()) == \
        sorted(json.loads((out / "llmprune.json").read_text())["files"])
    assert not any("lora" in k for k in reloaded.state_dict())
    for name, mask in zeros.items():
        i, rest = name.split(".", 1)
        assert torch.equal(reloaded.model.layers[int(i)].get_submodule(rest).weight == 0, mask)
        # the last checkpoint holds the trained model: merged, masked, equal to the final one
        torch.testing.assert_close(mid.model.layers[int(i)].get_submodule(rest).weight,
                                   student.model.layers[int(i)].get_submodule(rest).weight, rtol=0, atol=0)
    ids = torch.randint(0, 400, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student(ids).logits, rtol=0, atol=0)


def test_lora_trains_only_the_chosen_targets(tokenizer, texts):
    teacher = _teacher()
    student = _pruned(teacher, tokenizer)
    before = _weights(student)
    recover(student, teacher, tokenizer,
            _config(texts, method="lora", lr=1e-2, lora_targets=("q_proj", "v_proj")), progress=False)
    for name, weight in _weights(student).items():
        untouched = name.rsplit(".", 1)[-1] not in ("q_proj", "v_proj")
        assert torch.equal(weight, before[name]) == untouched, name
    with pytest.raises(LlmpruneError, match="matches no prunable Linear"):
        recover(student, teacher, tokenizer,
                _config(texts, method="lora", lora_targets=("qproj",)), progress=False)


def test_evaluation_before_along_and_after(tokenizer, texts):
    teacher = _teacher()
    student = _pruned(teacher, tokenizer)
    evaluation = EvalConfig(datasets=(texts[1],), seqlen=16)
    report = recover(student, teacher, tokenizer, _config(texts, steps=4, eval_every=2, lr=3e-3),
                     progress=False, eval_config=evaluation)
    assert [p["step"] for p in report.curve] == [0, 2, 4]
    assert report.perplexity_before == report.curve[0]["perplexity"]
    assert [p["tokens"] for p in report.curve] == [0, 64, 128]
    ppl = [p["perplexity"][texts[1]]["ppl"] for p in report.curve]
    assert len(set(ppl)) == 3 and report.curve[-1]["seconds"] > report.curve[1]["seconds"] > 0


# ---------------------------------------------------------------------------------------------
# resume


class _Stop(Exception):
    pass


def _interrupt_at(step):
    def callback(done, report):
        if done == step:
            raise _Stop
    return callback


@pytest.mark.parametrize("method", ["kd", "lora"])
def test_resume_after_interruption_gives_the_uninterrupted_result(tokenizer, texts, tmp_path, method):
    teacher = _teacher()
    pruned = _pruned(teacher, tokenizer, "2:4")
    config = _config(texts, method=method, steps=6, checkpoint_every=2, lr=1e-2 if method == "lora" else 3e-3,
                     warmup_steps=2, lr_schedule="linear")

    whole = copy.deepcopy(pruned)
    expected = recover(whole, teacher, tokenizer, config, progress=False)

    ckpt = tmp_path / "ckpt"
    first = copy.deepcopy(pruned)
    with pytest.raises(_Stop):  # stopped after step 3: the checkpoint of step 2 is what is left
        recover(first, teacher, tokenizer, config, progress=False,
                checkpoint_dir=ckpt, callback=_interrupt_at(3))
    assert check_resume(ckpt, config)["steps_done"] == 2
    # left as pruned
    assert torch.equal(_zeros(first)["0.self_attn.q_proj"], _zeros(pruned)["0.self_attn.q_proj"])
    assert not any("lora" in n for n, _ in first.named_parameters())

    second = copy.deepcopy(pruned)  # a new process: the pruned model loaded again
    resumed = recover(second, teacher, tokenizer, config, progress=False, checkpoint_dir=ckpt, resume=True)
    assert resumed.steps_done == 6 and resumed.resumed_at == [2]
    assert resumed.losses == expected.losses
    for name, weight in _weights(second).items():
        assert torch.equal(weight, _weights(whole)[name]), name

    other = RecoverConfig(**{**config.__dict__, "lr": 1e-4})
    with pytest.raises(LlmpruneError, match="made with lr"):
        check_resume(ckpt, other)
    # checkpoint_every, eval_every, max_minutes do not change the weights: a resume may differ there
    check_resume(ckpt, RecoverConfig(**{**config.__dict__, "checkpoint_every": 3, "max_minutes": 5.0}))


def test_max_minutes_stops_and_keeps_a_checkpoint(tokenizer, texts, tmp_path):
    teacher = _teacher()
    student = _pruned(teacher, tokenizer)
    report = recover(student, teacher, tokenizer, _config(texts, steps=50, max_minutes=1e-9), progress=False,
                     checkpoint_dir=tmp_path / "c")
    assert report.steps_done == 1 and report.stopped == "max_minutes"
    assert check_resume(tmp_path / "c", _config(texts, steps=50))["steps_done"] == 1
    cpu = recover(_pruned(teacher, tokenizer), teacher, tokenizer,
                  _config(texts, steps=50, max_cpu_minutes=1e-9), progress=False)
    assert cpu.steps_done == 1 and cpu.stopped == "max_cpu_minutes" and cpu.cpu_seconds > 0


# ---------------------------------------------------------------------------------------------
# bad input


def test_teacher_must_match_vocabulary_and_architecture(tokenizer, texts):
    teacher = _teacher()
    student = _pruned(teacher, tokenizer)
    with pytest.raises(LlmpruneError, match="vocabulary"):
        recover(student, _teacher(vocab_size=640), tokenizer, _config(texts), progress=False)
    with pytest.raises(LlmpruneError, match="architecture differs .*num_hidden_layers"):
        # a teacher with fewer blocks than its student
        recover(student, _teacher(layers=1), tokenizer, _config(texts), progress=False)
    with pytest.raises(LlmpruneError, match="architecture differs .*hidden_size"):
        recover(student, _teacher(hidden_size=96), tokenizer, _config(texts), progress=False)
    with pytest.raises(LlmpruneError, match="architecture differs .*model_type"):
        recover(student, make_model("qwen2", initializer_range=0.2), tokenizer,
                _config(texts), progress=False)


@pytest.mark.parametrize("bad, message", [({"steps": 0}, "steps must be a positive integer"),
                                          ({"steps": -3}, "steps must be a positive integer"),
                                          ({"lr": 0.0}, "lr must be a positive number"),
                                          ({"lr": -1e-4}, "lr must be a positive number"),
                                          ({"method": "dense"}, "unknown recovery method"),
                                          ({"alpha": 1.5}, "give a value in \\[0, 1\\]")])
def test_config_errors(bad, message):
    with pytest.raises(LlmpruneError, match=message):
        RecoverConfig(**bad)


def test_model_without_zeros_is_a_warning_not_an_error(tokenizer, texts):
    teacher = _teacher()
    student = _teacher(seed=1)
    with pytest.warns(RecoverWarning, match="no zero weights"):
        report = recover(student, teacher, tokenizer, _config(texts, steps=1), progress=False)
    assert report.zeros_before == 0 and report.steps_done == 1


def test_inputs_checked_before_any_model(texts, tmp_path):
    pruned_with = PruneConfig(method="wanda", calib={"dataset": texts[0], "seed": 0})
    with pytest.raises(LlmpruneError, match="pruning calibration's own windows"):
        check_inputs(RecoverConfig(data=texts[0], seed=0), None, (), pruned_with)
    check_inputs(RecoverConfig(data=texts[0], seed=1), None, (), pruned_with)
    with pytest.raises(LlmpruneError, match="also an evaluation dataset"):
        check_inputs(RecoverConfig(data=texts[1]), None, (texts[1],))
    with pytest.raises(LlmpruneError, match="no recovery checkpoint"):
        check_resume(tmp_path, RecoverConfig())


def test_lora_without_peft_says_how_to_install(monkeypatch, tokenizer, texts):
    import builtins

    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("No module named 'peft'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(LlmpruneError, match=r"pip install 'llmprune\[recover\]'"):
        check_inputs(RecoverConfig(method="lora", data=texts[0]))


# ---------------------------------------------------------------------------------------------
# the command line


@pytest.fixture
def saved_models(tokenizer, tmp_path):
    """A dense tiny model and its 2:4 magnitude-pruned copy, saved as llmprune checkpoints."""
    teacher = _teacher()
    config = PruneConfig(method="magnitude", pattern="2:4")
    student = copy.deepcopy(teacher)
    prune(student, tokenizer, config, progress=False)
    dense_dir = save_pruned(teacher, tokenizer, tmp_path / "dense", {"name": "dense"})
    pruned_dir = save_pruned(student, tokenizer, tmp_path / "pruned",
                             {"name": "magnitude-2_4", "config": config.to_dict()})
    return str(dense_dir), str(pruned_dir), _zeros(student)


def _cli(dense, pruned, texts, *extra):
    return ["recover", "--model", pruned, "--teacher", dense, "--steps", "4", "--seqlen", "16",
            "--batch-size", "2", "--data", texts[0], "--eval", texts[1], "--eval-seqlen", "16",
            "--no-progress", "--device", "cpu", *extra]


def test_cli_recover_writes_result_and_plain_checkpoint(saved_models, texts, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    dense, pruned, zeros = saved_models
    out, result = tmp_path / "out", tmp_path / "r.json"
    assert main(_cli(dense, pruned, texts, "--method", "lora", "--lr", "0.01", "--checkpoint-every", "2",
                     "--save", str(out), "--json", str(result))) == 0
    printed = capsys.readouterr().out
    assert "magnitude-2_4+lora: 4 steps, 128 tokens" in printed and "gap to dense closed" in printed
    record = json.loads(result.read_text())
    section = record["recover"]
    assert record["method"] == "magnitude" and record["pattern"] == "2:4"
    assert section["complete"] and section["steps_done"] == 4 and section["tokens"] == 128
    assert section["sparsity_after"] == section["sparsity_before"] == pytest.approx(0.5)
    assert set(section["perplexity_before"]) == {texts[1]} and record["perplexity"][texts[1]]["ppl"] > 0
    assert section["seconds"] > 0 and section["config"]["method"] == "lora"
    assert record["dense"]["perplexity"][texts[1]]["ppl"] > 0
    assert not (out / "recover_state.pt").exists()  # the final save replaced the resumable checkpoint
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, mask in zeros.items():
        i, rest = name.split(".", 1)
        assert torch.equal(reloaded.model.layers[int(i)].get_submodule(rest).weight == 0, mask)
    from llmprune.results import parse_result

    assert parse_result(record, "r.json").variant == ("lora",)


@pytest.mark.parametrize("extra, message", [
    (("--steps", "0"), "steps must be a positive integer"),
    (("--lr", "0"), "lr must be a positive number"),
    (("--lr=-1e-3",), "lr must be a positive number"),
    (("--resume",), "--resume continues the run whose checkpoint is in --save"),
])
def test_cli_bad_input_is_one_line_exit_2(saved_models, texts, capsys, extra, message):
    dense, pruned, _ = saved_models
    assert main(_cli(dense, pruned, texts, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_teacher_mismatch_exit_2(saved_models, texts, tokenizer, tmp_path, capsys):
    _, pruned, _ = saved_models
    other = save_pruned(_teacher(vocab_size=640), tokenizer, tmp_path / "other", {})
    capsys.readouterr()  # the save's own progress lines
    assert main(_cli(str(other), pruned, texts)) == 2
    err = capsys.readouterr().err.strip()
    assert "vocabulary" in err and len(err.splitlines()) == 1


def test_cli_resume_of_another_config_exit_2_and_resume_works(saved_models, texts,
                                                              tmp_path, capsys, monkeypatch):
    import llmprune.recover as recover_module

    dense, pruned, _ = saved_models
    out = tmp_path / "out"
    real_recover = recover_module.recover

    def interrupted(*args, **kwargs):  # Ctrl-C after step 3: the checkpoint of step 2 stays
        try:
            return real_recover(*args, **kwargs, callback=_interrupt_at(3))
        except _Stop:
            raise KeyboardInterrupt from None

    monkeypatch.setattr(recover_module, "recover", interrupted)
    assert main(_cli(dense, pruned, texts, "--checkpoint-every", "2", "--save", str(out))) == 130
    assert "holds the checkpoint of step 2: run the same command with --resume" in capsys.readouterr().err
    monkeypatch.setattr(recover_module, "recover", real_recover)

    assert main(_cli(dense, pruned, texts, "--checkpoint-every", "2", "--save", str(out))) == 2
    assert "unfinished recovery: add --resume" in capsys.readouterr().err
    assert main(_cli(dense, pruned, texts, "--checkpoint-every", "2", "--save", str(out), "--resume",
                     "--temperature", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert "made with temperature = 1.0, this run has 2.0" in err and len(err.splitlines()) == 1
    result = tmp_path / "r.json"
    assert main(_cli(dense, pruned, texts, "--checkpoint-every", "2", "--save", str(out), "--resume",
                     "--json", str(result))) == 0
    section = json.loads(result.read_text())["recover"]
    assert section["steps_done"] == 4 and section["resumed_at"] == [2]


def test_cli_warns_when_the_model_has_no_zeros(saved_models, texts, capsys):
    dense, _, _ = saved_models
    assert main(_cli(dense, dense, texts, "--steps", "1", "--skip-dense")) == 0
    err = capsys.readouterr().err
    assert "llmprune: warning: the model has no zero weights" in err


# ---------------------------------------------------------------------------------------------
# recipes: prune, then recover


def test_recipe_prunes_then_recovers(tokenizer, texts, tmp_path):
    import yaml

    from llmprune.recipes import load_recipe
    from llmprune.runner import run_recipe

    teacher = _teacher()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "rec", "dense": False,
        "defaults": {"model": "tiny", "device": "cpu",
                     "prune": {"method": "magnitude", "pattern": "2:4"},
                     "eval": {"datasets": [texts[1]], "seqlen": 16}},
        "runs": [{"name": "plain"},
                 {"name": "kd", "recover": {"method": "kd", "steps": 2, "seqlen": 16, "batch_size": 2,
                                            "data": texts[0], "lr": 3e-3}}]}))
    assert load_recipe(recipe).run("kd").recover.steps == 2

    def loader(name, dtype, device):
        return copy.deepcopy(teacher), tokenizer

    run_recipe(recipe, tmp_path / "out", loader=loader, progress=False, report=False)
    plain = json.loads((tmp_path / "out" / "plain.json").read_text())
    kd = json.loads((tmp_path / "out" / "kd.json").read_text())
    assert "recover" not in plain and kd["recover"]["steps_done"] == 2
    assert kd["recover"]["perplexity_before"][texts[1]]["ppl"] == \
        pytest.approx(plain["perplexity"][texts[1]]["ppl"])
    assert kd["perplexity"][texts[1]]["ppl"] != plain["perplexity"][texts[1]]["ppl"]
    assert kd["recover"]["zeros_after"] == kd["recover"]["zeros_before"]
    mtimes = {p.name: p.stat().st_mtime_ns
              for p in (tmp_path / "out").glob("*.json") if p.name != "recipe.json"}
    # resumable: nothing reruns
    run_recipe(recipe, tmp_path / "out", loader=loader, progress=False, report=False)
    assert mtimes == {p.name: p.stat().st_mtime_ns
                      for p in (tmp_path / "out").glob("*.json") if p.name != "recipe.json"}

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "b",
                                   "runs": [{"name": "x", "model": "m", "recover": {"stepz": 2}}]}))
    with pytest.raises(LlmpruneError, match=r"unknown key runs\[0\]\.recover\.stepz"):
        load_recipe(bad)


# ---------------------------------------------------------------------------------------------
# the real bundled model


def test_smollm2_two_to_four_stays_two_to_four_through_lora(smollm2, data_dir):
    """peft on the real (GGUF-loaded) model; kd's masking is the same code as on the tiny ones."""
    teacher, tokenizer = smollm2
    student = copy.deepcopy(teacher)
    prune(student, tokenizer, PruneConfig(method="magnitude", pattern="2:4"), progress=False)
    zeros = _zeros(student)
    config = RecoverConfig(method="lora", steps=2, seqlen=32, batch_size=1, data="c4", seed=1)
    report = recover(student, teacher, tokenizer, config, data_dir=data_dir, progress=False)
    assert report.zeros_after == report.zeros_before
    # the GGUF weights hold a few zeros of their own
    assert report.sparsity_before == pytest.approx(0.5, abs=1e-4)
    for name, weight in _weights(student).items():
        assert torch.equal(weight == 0, zeros[name]), name
    assert not any("lora" in n for n, _ in student.named_parameters())


def test_a_depth_pruned_student_distils_from_its_deeper_teacher(tokenizer, texts):
    teacher = _teacher(layers=3)
    student = copy.deepcopy(teacher)
    windows = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    prune(student, tokenizer, PruneConfig(method="shortgpt", remove_blocks=1), windows=windows,
          progress=False)
    before = _weights(student)
    with pytest.warns(RecoverWarning, match="no zero weights"):
        recover(student, teacher, tokenizer, _config(texts), progress=False)
    after = _weights(student)
    assert len(get_blocks(student)) == 2 and all(not torch.equal(before[k], after[k]) for k in before)
