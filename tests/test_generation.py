"""Greedy-continuation agreement: prompts from C4 documents calibration never reads, greedy decoding
with the KV cache equal to a brute-force loop, the agreement numbers equal a hand computation from
two brute-force continuations, and the dense side's cache is reused, keyed and never trusted corrupt.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

from conftest import CORPUS, make_model, make_tokenizer
from llmprune.data import describe_source
from llmprune.errors import LlmpruneError
from llmprune.evaluation import generation as gen

PROMPT_TOKENS, NEW_TOKENS, PROMPTS = 12, 6, 5
WORDS = " ".join(CORPUS).split()


def doc(i: int, words: int) -> str:
    return " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(words))


def write_docs(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = __import__("gzip").open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return path


# validation documents 1 and 4 are too short for a prompt and must be skipped
VALIDATION = [doc(i, 3 if i in (1, 4) else 20 + i) for i in range(10)]
TRAIN = [f"train document {i}: " + doc(100 + i, 40) for i in range(20)]


@pytest.fixture
def c4_dir(tmp_path) -> Path:
    root = tmp_path / "data"
    write_docs(root / "c4-sample" / "c4_sample.jsonl", TRAIN)  # the shared dir's layout ...
    write_docs(root / "c4-sample" / "c4-validation.jsonl", VALIDATION)  # ... plus validation documents
    return root


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"  # made by the first write


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def dense():
    return make_model(vocab_size=512)


@pytest.fixture(scope="module")
def perturbed(dense):
    model = copy.deepcopy(dense)
    torch.manual_seed(1)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.add_(torch.randn_like(weight) * 0.002)
    return model


def brute_force(model, prompt_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding without a cache: the whole sequence through the model at every step."""
    seq = prompt_ids.clone()
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=seq, use_cache=False).logits  # (prompts, length, vocab)
            seq = torch.cat([seq, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return seq[:, prompt_ids.shape[1]:]


def run(model, tok, c4_dir, cache_dir, **kwargs):
    kwargs = {"dense_key": "tiny-llama", "prompts": PROMPTS, "new_tokens": NEW_TOKENS,
              "prompt_tokens": PROMPT_TOKENS, "data_dir": c4_dir, "batch_size": 2, "progress": False,
              **kwargs}
    return gen.continuation_agreement(model, tok, cache_dir=cache_dir, **kwargs)


# ----------------------------------------------------------------------------- prompts

def test_prompts_are_validation_document_starts(tok, c4_dir):
    ids, source = gen.select_prompts(tok, PROMPTS, PROMPT_TOKENS, c4_dir)
    long_enough = [t for t in VALIDATION if len(tok(t).input_ids) >= PROMPT_TOKENS]
    assert len(long_enough) == 8  # the two short documents are skipped
    expected = [tok(t).input_ids[:PROMPT_TOKENS] for t in long_enough[:PROMPTS]]
    assert ids.tolist() == expected and ids.dtype == torch.long
    assert source == str(c4_dir / "c4-sample" / "c4-validation.jsonl") == gen.check_prompt_source(c4_dir)
    again, _ = gen.select_prompts(tok, PROMPTS, PROMPT_TOKENS, c4_dir)
    assert torch.equal(ids, again)  # fixed: no seed anywhere
    with pytest.raises(LlmpruneError, match=r"only 8 of the 10 documents .* have 12 tokens, 9 prompts"):
        gen.select_prompts(tok, 9, PROMPT_TOKENS, c4_dir)


@pytest.mark.parametrize("layout", ["sample", "hub-names"])
def test_prompt_files_disjoint_from_calibration(tmp_path, layout):
    if layout == "sample":
        write_docs(tmp_path / "c4-sample" / "c4_sample.jsonl", TRAIN)
        write_docs(tmp_path / "c4-sample" / "c4-validation.jsonl", VALIDATION)
    else:
        write_docs(tmp_path / "c4" / "en" / "c4-train.00000-of-01024.json.gz", TRAIN)
        write_docs(tmp_path / "c4" / "en" / "c4-validation.00000-of-00008.json.gz", VALIDATION)
    prompt_files = {str(p) for p in gen.c4_validation_files(tmp_path)}
    # calibration's readers (llmprune.data) say which files they read, whatever the seed
    calibration = set(describe_source("c4", tmp_path, split="calibration").split(", "))
    evaluation = set(describe_source("c4", tmp_path, split="eval").split(", "))
    assert prompt_files == evaluation and len(prompt_files) == 1
    assert not prompt_files & calibration and calibration


def test_train_only_data_dir_gives_documents_calibration_never_draws(tmp_path, tok, monkeypatch):
    """The shared data holds C4 train documents only: the prompts are those no calibration window of
    NEVER_DRAWN_TOKENS tokens can draw (the reference sampler keeps only longer documents)."""
    short = [doc(300 + i, 16) for i in range(4)]
    long_docs = [doc(200 + i, 60) for i in range(3)]
    limit = max(len(tok(t).input_ids) for t in short)
    assert min(len(tok(t).input_ids) for t in long_docs) > limit >= PROMPT_TOKENS
    monkeypatch.setattr(gen, "NEVER_DRAWN_TOKENS", limit)  # calibration windows of `limit` never draw `short`
    train = [long_docs[0], short[0], short[1], long_docs[1], short[2], short[3], long_docs[2]]
    write_docs(tmp_path / "c4-sample" / "c4_sample.jsonl", train)
    eligible = short
    ids, source = gen.select_prompts(tok, 3, PROMPT_TOKENS, tmp_path)
    assert ids.tolist() == [tok(t).input_ids[:PROMPT_TOKENS] for t in eligible[:3]]
    assert f"at most {limit} tokens" in source
    assert gen.check_prompt_source(tmp_path, calib="c4", calib_seqlen=limit).startswith(str(tmp_path))
    assert gen.check_prompt_source(tmp_path, calib="wikitext2", calib_seqlen=8)  # other calibration data
    expected = rf"calibration window of {limit - 1} tokens .* could draw them"
    with pytest.raises(LlmpruneError, match=expected) as exc_info:
        gen.check_prompt_source(tmp_path, calib="c4", calib_seqlen=limit - 1)
    assert "\n" not in str(exc_info.value)


def test_data_dir_without_c4_is_refused(tmp_path, tok):
    (tmp_path / "ptb").mkdir()
    for check, args in ((gen.select_prompts, (tok, 2, PROMPT_TOKENS, tmp_path)),
                        (gen.check_prompt_source, (tmp_path,))):
        with pytest.raises(LlmpruneError, match=r"no C4 documents .*expected .*c4/en/"
                                                r"c4-validation\.00000-of-00008\.json\.gz") as exc_info:
            check(*args)
        assert "\n" not in str(exc_info.value)
    with pytest.raises(LlmpruneError, match=r"data dir .*absent does not exist"):
        gen.select_prompts(tok, 2, PROMPT_TOKENS, tmp_path / "absent")


def test_no_data_dir_and_no_hub(tok, monkeypatch):
    monkeypatch.delenv("LLMPRUNE_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # conftest sets it too: no test reaches a hub
    expected = r"could not read allenai/c4/en/c4-validation\.00000-of-00008\.json\.gz from the hub .*c4/en/"
    with pytest.raises(LlmpruneError, match=expected) as exc_info:
        gen.select_prompts(tok, 2, PROMPT_TOKENS)
    assert "\n" not in str(exc_info.value)


def test_bad_document_names_file_and_line(tmp_path, tok):
    path = tmp_path / "c4-sample" / "c4-validation.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(LlmpruneError, match=r"c4-validation\.jsonl line 2 has no 'text'"):
        gen.select_prompts(tok, 2, 2, tmp_path)


# ----------------------------------------------------------------------------- decoding and the numbers

def test_greedy_with_cache_equals_brute_force(dense, tok, c4_dir):
    ids, _ = gen.select_prompts(tok, PROMPTS, PROMPT_TOKENS, c4_dir)
    dense.train()  # left as found; decoded in eval mode
    fast = gen.greedy_continuations(dense, ids, 10, batch_size=2)
    assert dense.training
    dense.eval()
    assert fast.shape == (PROMPTS, 10)
    assert torch.equal(fast, brute_force(dense, ids, 10))


def test_compare_by_hand():
    dense = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]])
    other = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [0, 6, 7, 8]])
    # identical runs: 4, 1, 0 tokens
    assert gen.compare(dense, other) == pytest.approx((5 / 12, 5 / 3, 1 / 3))


def test_agreement_with_itself_is_one(dense, tok, c4_dir, cache):
    assert run(dense, tok, c4_dir, cache, record=True) is None
    result = run(dense, tok, c4_dir, cache)
    assert (result.agreement, result.first_divergence, result.identical) == (1.0, NEW_TOKENS, 1.0)
    assert (result.prompts, result.new_tokens, result.prompt_tokens) == (PROMPTS, NEW_TOKENS, PROMPT_TOKENS)
    assert result.source.endswith("c4-validation.jsonl") and Path(result.cache).parent == cache
    assert gen.GenerationResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_agreement_with_perturbed_model_equals_hand_computation(dense, perturbed, tok, c4_dir, cache):
    run(dense, tok, c4_dir, cache, record=True)
    result = run(perturbed, tok, c4_dir, cache)
    ids, _ = gen.select_prompts(tok, PROMPTS, PROMPT_TOKENS, c4_dir)
    a, b = brute_force(dense, ids, NEW_TOKENS).tolist(), brute_force(perturbed, ids, NEW_TOKENS).tolist()
    runs = []
    for x, y in zip(a, b):
        k = 0
        while k < NEW_TOKENS and x[k] == y[k]:
            k += 1
        runs.append(k)
    assert 0 < sum(runs) < PROMPTS * NEW_TOKENS  # the perturbation diverges somewhere, not everywhere
    assert result.agreement == pytest.approx(sum(k / NEW_TOKENS for k in runs) / PROMPTS)
    assert result.first_divergence == pytest.approx(sum(runs) / PROMPTS)
    assert result.identical == pytest.approx(sum(k == NEW_TOKENS for k in runs) / PROMPTS)


# ----------------------------------------------------------------------------- the cache

class Untouchable(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("the dense model was run although its continuations are cached")


def test_cache_reused_without_the_dense_model(dense, tok, c4_dir, cache):
    run(dense, tok, c4_dir, cache, record=True)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].name.startswith("continuations-")  # no temporary left behind
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = run(dense, tok, c4_dir, cache, dense_model=Untouchable())
    assert result.agreement == 1.0


@pytest.mark.parametrize("damage", ["token", "truncate"])
def test_corrupt_cache_is_rebuilt_or_refused(dense, tok, c4_dir, cache, damage):
    run(dense, tok, c4_dir, cache, record=True)
    (path,) = cache.iterdir()
    good = path.read_text()
    stored = json.loads(good)
    if damage == "token":  # a plausible, well-formed table: only the checksum can tell
        stored["continuations"][0][0] = (stored["continuations"][0][0] + 1) % 512
        path.write_text(json.dumps(stored))
    else:
        path.write_text(good[: len(good) // 2])
    why = "fails its checksum" if damage == "token" else "cannot be read"
    with pytest.raises(LlmpruneError, match=rf"cache {path} {why}.*record=True"):
        run(dense, tok, c4_dir, cache)
    with pytest.warns(UserWarning, match="rebuilding it from dense_model"):
        result = run(dense, tok, c4_dir, cache, dense_model=dense)
    assert result.agreement == 1.0
    assert json.loads(path.read_text()) == json.loads(good)  # rebuilt: the same continuations, valid again


def test_key_changes_with_new_tokens_prompts_and_dense_key(dense, tok, c4_dir, cache):
    ids, _ = gen.select_prompts(tok, PROMPTS, PROMPT_TOKENS, c4_dir)
    key = gen.cache_key("tiny-llama", ids, NEW_TOKENS)
    assert key == gen.cache_key("tiny-llama", ids.clone(), NEW_TOKENS)
    others = {gen.cache_key("tiny-llama", ids, NEW_TOKENS + 1), gen.cache_key("other", ids, NEW_TOKENS),
              gen.cache_key("tiny-llama", ids[:, :-1], NEW_TOKENS)}
    assert len(others | {key}) == 4
    run(dense, tok, c4_dir, cache, record=True)
    with pytest.raises(LlmpruneError, match=r"cache .*continuations-.*\.json does not exist"):
        run(dense, tok, c4_dir, cache, new_tokens=NEW_TOKENS + 1)
    # a file holding another key under this key's name (renamed by hand) is not trusted either
    (recorded,) = cache.iterdir()
    other = gen.cache_path(cache, gen.cache_key("tiny-llama", ids, NEW_TOKENS + 1))
    recorded.rename(other)
    with pytest.raises(LlmpruneError, match="holds another key"):
        run(dense, tok, c4_dir, cache, new_tokens=NEW_TOKENS + 1)


def test_bad_arguments(tok, c4_dir, tmp_path):
    with pytest.raises(LlmpruneError, match="dense_key must name the dense model"):
        run(None, tok, c4_dir, tmp_path, dense_key=" ")
    with pytest.raises(LlmpruneError, match="new_tokens must be a positive integer, got 0"):
        run(None, tok, c4_dir, tmp_path, new_tokens=0)
