"""LAMBADA (lm-eval's ``lambada_openai`` on the local release file): the local task is lm-eval's
registered one, and the acc and perplexity that come back through llmprune equal a computation
by hand from direct forward passes of the model.

The hand computation follows the task's definition, not lm-eval's code: context = the passage
without its last word, target = " " + the last word; the target's tokens are those the whole
passage's encoding adds after the context's encoding; its log-likelihood is the sum over those
tokens of log-softmax of the logits one position earlier; perplexity = exp(-mean log-likelihood)
over documents, acc = the share of documents whose every target token is the argmax.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import make_model, make_tokenizer
from llmprune.errors import LlmpruneError
from llmprune.evaluation import zeroshot as zs

FILE = "lambada/lambada_test.jsonl"
N_DOCS = 6


def passages(root: Path, n: int | None = None) -> list[str]:
    lines = (root / FILE).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines[:n]]


def registered_lambada(docs: list[dict]):
    """lm-eval's registered task, from its own YAML, reading ``docs`` instead of the hub."""
    import datasets
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / "lambada" / "lambada_openai.yaml",
                    resolve_func=True)
    cfg.pop("tag", None)
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
    return ConfigurableTask(config=cfg)


def by_hand(model, tokenizer, text: str) -> tuple[float, bool]:
    """(log-likelihood of the last word, whether greedy decoding produces it), by one forward pass."""
    context, word = text.rsplit(" ", 1)
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    whole = tokenizer(context + " " + word, add_special_tokens=False).input_ids
    assert whole[: len(ctx)] == ctx  # the passage's encoding extends the context's
    target = whole[len(ctx):]
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].double()  # (tokens, vocab)
    scored = logits[len(ctx) - 1: len(whole) - 1]  # the position before each target token
    logp = torch.log_softmax(scored, dim=-1)
    ll = sum(logp[i, t].item() for i, t in enumerate(target))
    greedy = all(int(scored[i].argmax()) == t for i, t in enumerate(target))
    return ll, greedy


def test_local_lambada_matches_registered(data_dir):
    local, sources = zs.build_tasks(["lambada_openai"], data_dir)
    task = local["lambada_openai"]
    texts = passages(data_dir)
    assert len(texts) == 5153 and len(task.eval_docs) == len(texts)
    registered = registered_lambada([{"text": t} for t in texts[:N_DOCS]])
    for i in range(N_DOCS):
        ours, theirs = task.eval_docs[i], registered.eval_docs[i]
        assert task.doc_to_text(ours) == registered.doc_to_text(theirs)
        assert task.doc_to_target(ours) == registered.doc_to_target(theirs)
        context, word = texts[i].rsplit(" ", 1)
        assert (task.doc_to_text(ours), task.doc_to_target(ours)) == (context, " " + word)
    assert task.config.output_type == registered.config.output_type == "loglikelihood"
    assert task.config.metric_list == registered.config.metric_list
    assert task.config.metadata["version"] == registered.config.metadata["version"]
    assert sources["lambada_openai"] == str((data_dir / FILE).resolve())


def test_lambada_acc_and_ppl_equal_hand_computation(data_dir):
    # a context long enough that no passage is cut (lm-eval would keep only the last tokens)
    model, tokenizer = make_model(vocab_size=512, max_position_embeddings=512), make_tokenizer()
    texts = passages(data_dir, N_DOCS)
    assert max(len(tokenizer(t).input_ids) for t in texts) < 512
    result = zs.zeroshot(model, tokenizer, "lambada_openai", limit=N_DOCS, batch_size=4,
                         data_dir=data_dir, progress=False)
    task = result.tasks["lambada_openai"]
    hand = [by_hand(model, tokenizer, t) for t in texts]
    ppl = math.exp(-sum(ll for ll, _ in hand) / N_DOCS)
    acc = sum(greedy for _, greedy in hand) / N_DOCS
    assert task.n == N_DOCS and task.n_total == 5153 and task.acc_norm is None
    assert task.ppl == pytest.approx(ppl, rel=1e-5)
    assert task.acc == pytest.approx(acc, abs=1e-12)
    assert task.metrics["perplexity,none"] == task.ppl and task.metrics["acc,none"] == task.acc
    assert "ppl |" in result.markdown_table()


def test_lambada_greedy_hit_counts(data_dir, monkeypatch):
    """acc counts a document only when every target token is the argmax: make the model's logits
    favour exactly the target tokens of documents 0 and 2, and acc must be 2/3, ppl finite."""
    tokenizer = make_tokenizer()
    texts = passages(data_dir, 3)
    favoured = {}
    for i in (0, 2):
        context, word = texts[i].rsplit(" ", 1)
        ctx = tokenizer(context, add_special_tokens=False).input_ids
        whole = tokenizer(context + " " + word, add_special_tokens=False).input_ids
        favoured[tuple(whole[:-1])] = (len(ctx), whole[len(ctx):])
    model = make_model(vocab_size=512, max_position_embeddings=512)
    plain_forward = model.forward

    def forward(input_ids=None, **kwargs):
        out = plain_forward(input_ids=input_ids, **kwargs)
        for row, ids in enumerate(input_ids.tolist()):
            for key, (start, target) in favoured.items():
                if tuple(ids[: len(key)]) == key:  # right padding: the document is a prefix of the row
                    for j, tok in enumerate(target):
                        out.logits[row, start - 1 + j, tok] += 1e3
        return out

    monkeypatch.setattr(model, "forward", forward)
    result = zs.zeroshot(model, tokenizer, "lambada_openai", limit=3, batch_size=3, data_dir=data_dir,
                         progress=False)
    assert result.tasks["lambada_openai"].acc == pytest.approx(2 / 3)
    assert math.isfinite(result.tasks["lambada_openai"].ppl)


def test_old_results_without_ppl_still_load():
    old = {"tasks": {"boolq": {"name": "boolq", "acc": 0.5, "acc_stderr": 0.1, "acc_norm": None,
                               "acc_norm_stderr": None, "n": 4, "n_total": 3270, "version": "2.0",
                               "source": "x", "seconds": 1.0}},
           "limit": 4, "batch_size": 1, "lm_eval_version": "0.4.8"}
    result = zs.ZeroShotResult.from_dict(old)
    assert result.tasks["boolq"].ppl is None and result.tasks["boolq"].metrics is None
    assert "ppl" not in result.markdown_table()  # tables of accuracy tasks unchanged


def test_lambada_row_without_last_word(tmp_path):
    path = tmp_path / FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"text": "alone"}) + "\n")
    with pytest.raises(LlmpruneError, match=r"lambada_test\.jsonl:2: text must hold a context"):
        zs.build_tasks("lambada_openai", tmp_path)
