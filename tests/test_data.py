"""data.py: texts built as the reference scripts build them, the same random draws, clear errors.

Each loader reads fixture files written here in the original layouts; the expected text is
built directly in the test, following the HF builders (wikitext: a row per raw line, newline
kept, blank lines as ""; ptb_text_only: each line stripped). The tiny tokenizer is byte-level
BPE, so ``decode(ids)`` gives back the exact text that was tokenized.
"""

from __future__ import annotations

import gzip
import json
import random
import time

import pytest
import torch

from llmprune import data
from llmprune.data import (
    DATASETS,
    calibration_windows,
    clear_caches,
    describe_source,
    eval_tokens,
    resolve_data_dir,
)
from llmprune.errors import LlmpruneError

WIKI_TEST = (" \n = Robert Boulter = \n \n Robert Boulter is an English film , television and theatre "
             "actor . \n"
             " \n = = Career = = \n \n In 2000 Boulter had a guest @-@ starring role . \n")
WIKI_TRAIN = (" \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles is a "
              "game . \n"
              " The game began development in 2010 , carrying over a large portion of the work . \n") * 3
PTB_TEST = " no it was n't black monday \n but while the new york stock exchange did n't fall apart friday \n"
PTB_TRAIN = (" aer banknote berlitz calloway centrust cluett fromstein gitano \n"
             " pierre <unk> N years old will join the board as a nonexecutive director nov. N \n") * 4


@pytest.fixture(autouse=True)
def _fresh_caches():
    clear_caches()
    yield
    clear_caches()


def hf_wikitext_rows(raw: str) -> list[str]:
    """What the HF ``wikitext`` builder yields for a raw file: ``row if row.strip() else ""``."""
    return [row if row.strip() else "" for row in raw.splitlines(keepends=True)]


def hf_ptb_rows(raw: str) -> list[str]:
    return [line.strip() for line in raw.splitlines(keepends=True)]


def ids_of(tok, text: str) -> torch.Tensor:
    return tok(text, return_tensors="pt").input_ids[0]


def reference_stream_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """sparsegpt/wanda get_wikitext2 / get_ptb calibration loop, on the global generator."""
    enc = ids[None]
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        i = random.randint(0, enc.shape[1] - seqlen - 1)
        out.append(enc[:, i:i + seqlen])
    return torch.cat(out)


def reference_c4_windows(tok, docs: list[str], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """wanda get_c4 calibration loop (rejection on ``> seqlen``), on the global generator."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            enc = tok(docs[i], return_tensors="pt")
            if enc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, enc.input_ids.shape[1] - seqlen - 1)
        out.append(enc.input_ids[:, i:i + seqlen])
    return torch.cat(out)


def write_jsonl(path, docs, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps({"text": d, "timestamp": "2019-04-25T12:57:54Z", "url": "u"}) + "\n"
                      for d in docs)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(payload)
    else:
        path.write_text(payload, encoding="utf-8")


def c4_docs(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    words = "the quick brown fox jumps over the lazy dog pruning sparse weights".split()
    # Mostly short documents, a few long ones: the rejection loop has to skip.
    return [" ".join(rng.choice(words) for _ in range(rng.choice([3, 5, 8, 60]))) + "\nend."
            for _ in range(n)]


# --------------------------------------------------------------------------------------------
# text construction
# --------------------------------------------------------------------------------------------


def test_wikitext_raw_layout(tmp_path, tiny_tokenizer):
    folder = tmp_path / "wikitext-2-raw-v1"
    folder.mkdir()
    (folder / "wiki.test.raw").write_text(WIKI_TEST, encoding="utf-8")
    (folder / "wiki.train.raw").write_text(WIKI_TRAIN, encoding="utf-8")
    rows = hf_wikitext_rows(WIKI_TEST)
    assert rows[:3] == ["", " = Robert Boulter = \n", ""]
    expected = "\n\n".join(rows)
    ids = eval_tokens("wikitext2", tiny_tokenizer, 8, data_dir=tmp_path)
    assert tiny_tokenizer.decode(ids) == expected
    assert torch.equal(ids, ids_of(tiny_tokenizer, expected))
    assert ids.dtype == torch.long and ids.dim() == 1

    train = ids_of(tiny_tokenizer, " ".join(hf_wikitext_rows(WIKI_TRAIN)))
    got = calibration_windows("wikitext2", tiny_tokenizer, 6, 16, seed=3, data_dir=tmp_path)
    assert torch.equal(got, reference_stream_windows(train, 6, 16, 3))
    assert describe_source("wikitext2", tmp_path) == str(folder / "wiki.test.raw")
    assert describe_source("wikitext2", tmp_path, split="calibration") == str(folder / "wiki.train.raw")


def test_wikitext_parquet_layout(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "wikitext" / "wikitext-2-raw-v1"
    folder.mkdir(parents=True)
    for split, raw in (("test", WIKI_TEST), ("train", WIKI_TRAIN)):
        pq.write_table(pa.table({"text": hf_wikitext_rows(raw)}), folder / f"{split}-00000-of-00001.parquet")
    ids = eval_tokens("wikitext2", tiny_tokenizer, 8, data_dir=tmp_path)
    assert tiny_tokenizer.decode(ids) == "\n\n".join(hf_wikitext_rows(WIKI_TEST))
    train = ids_of(tiny_tokenizer, " ".join(hf_wikitext_rows(WIKI_TRAIN)))
    got = calibration_windows("wikitext2", tiny_tokenizer, 5, 12, seed=0, data_dir=tmp_path)
    assert torch.equal(got, reference_stream_windows(train, 5, 12, 0))


def test_wikitext_raw_and_parquet_give_the_same_stream(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw_dir, pq_dir = tmp_path / "raw" / "wikitext-2-raw-v1", tmp_path / "pq" / "wikitext-2-raw-v1"
    raw_dir.mkdir(parents=True)
    pq_dir.mkdir(parents=True)
    (raw_dir / "wiki.test.raw").write_text(WIKI_TEST, encoding="utf-8")
    pq.write_table(pa.table({"text": hf_wikitext_rows(WIKI_TEST)}), pq_dir / "test-00000-of-00001.parquet")
    a = eval_tokens("wikitext2", tiny_tokenizer, 4, data_dir=tmp_path / "raw")
    b = eval_tokens("wikitext2", tiny_tokenizer, 4, data_dir=tmp_path / "pq")
    assert torch.equal(a, b)


def test_ptb_layout(tmp_path, tiny_tokenizer):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text(PTB_TEST, encoding="utf-8")
    (tmp_path / "ptb" / "ptb.train.txt").write_text(PTB_TRAIN, encoding="utf-8")
    expected = " ".join(hf_ptb_rows(PTB_TEST))
    assert expected.startswith("no it was n't black monday but while")
    ids = eval_tokens("ptb", tiny_tokenizer, 8, data_dir=tmp_path)
    assert tiny_tokenizer.decode(ids) == expected
    train = ids_of(tiny_tokenizer, " ".join(hf_ptb_rows(PTB_TRAIN)))
    for seed in (0, 7):
        got = calibration_windows("ptb", tiny_tokenizer, 8, 20, seed=seed, data_dir=tmp_path)
        assert got.shape == (8, 20)
        assert torch.equal(got, reference_stream_windows(train, 8, 20, seed))


@pytest.mark.parametrize("layout", ["jsonl", "json.gz"])
def test_c4_layouts(tmp_path, tiny_tokenizer, layout):
    train_docs, val_docs = c4_docs(40, seed=1), c4_docs(1200, seed=2)
    if layout == "jsonl":
        write_jsonl(tmp_path / "c4-sample" / "c4_sample.jsonl", train_docs)
        write_jsonl(tmp_path / "c4-sample" / "c4-validation.jsonl", val_docs)
    else:
        write_jsonl(tmp_path / "c4" / "en" / "c4-train.00000-of-01024.json.gz", train_docs, gz=True)
        write_jsonl(tmp_path / "c4" / "en" / "c4-validation.00000-of-00008.json.gz", val_docs, gz=True)

    full = ids_of(tiny_tokenizer, " ".join(val_docs[:1100]))  # only the first 1100 documents
    assert full.numel() < 256 * 200
    assert torch.equal(eval_tokens("c4", tiny_tokenizer, 200, data_dir=tmp_path), full)
    assert torch.equal(eval_tokens("c4", tiny_tokenizer, 8, data_dir=tmp_path), full[: 256 * 8])

    for seed in (0, 5):
        got = calibration_windows("c4", tiny_tokenizer, 10, 40, seed=seed, data_dir=tmp_path)
        assert torch.equal(got, reference_c4_windows(tiny_tokenizer, train_docs, 10, 40, seed))
    # the memoized documents give the same draws again
    again = calibration_windows("c4", tiny_tokenizer, 10, 40, seed=5, data_dir=tmp_path)
    assert torch.equal(again, reference_c4_windows(tiny_tokenizer, train_docs, 10, 40, 5))


def test_c4_train_files_are_concatenated_in_name_order(tmp_path, tiny_tokenizer):
    a, b = c4_docs(15, seed=3), c4_docs(15, seed=4)
    write_jsonl(tmp_path / "c4" / "c4-train.00001-of-01024.json", b)
    write_jsonl(tmp_path / "c4" / "c4-train.00000-of-01024.json", a)
    got = calibration_windows("c4", tiny_tokenizer, 6, 30, seed=2, data_dir=tmp_path)
    assert torch.equal(got, reference_c4_windows(tiny_tokenizer, a + b, 6, 30, 2))


def test_local_files(tmp_path, tiny_tokenizer):
    txt = tmp_path / "notes.txt"
    txt.write_text(WIKI_TRAIN, encoding="utf-8")
    assert tiny_tokenizer.decode(eval_tokens(str(txt), tiny_tokenizer, 8)) == WIKI_TRAIN
    got = calibration_windows(str(txt), tiny_tokenizer, 4, 16, seed=1)
    assert torch.equal(got, reference_stream_windows(ids_of(tiny_tokenizer, WIKI_TRAIN), 4, 16, 1))
    assert describe_source(str(txt)) == str(txt.resolve())

    docs = c4_docs(30, seed=6)
    jl = tmp_path / "docs.jsonl"
    write_jsonl(jl, docs)
    assert tiny_tokenizer.decode(eval_tokens(str(jl), tiny_tokenizer, 8)) == " ".join(docs)
    got = calibration_windows(str(jl), tiny_tokenizer, 5, 25, seed=4)
    assert torch.equal(got, reference_c4_windows(tiny_tokenizer, docs, 5, 25, 4))

    arr = tmp_path / "docs.json"  # a JSON list of objects is read too
    arr.write_text(json.dumps([{"text": d} for d in docs]), encoding="utf-8")
    assert tiny_tokenizer.decode(eval_tokens(str(arr), tiny_tokenizer, 8)) == " ".join(docs)


def test_bos_is_added_once(tmp_path, tiny_tokenizer):
    """A tokenizer that prepends BOS gets it once, at the start of the joined text (as the references)."""

    class BosTokenizer:
        name_or_path = "bos"

        def __call__(self, text, return_tensors=None):
            ids = torch.cat([torch.tensor([0]), ids_of(tiny_tokenizer, text)])[None]
            return type("Enc", (), {"input_ids": ids})()

        def __len__(self):
            return len(tiny_tokenizer)

    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text(PTB_TEST, encoding="utf-8")
    ids = eval_tokens("ptb", BosTokenizer(), 4, data_dir=tmp_path)
    assert ids[0] == 0
    assert (ids == 0).sum() == (ids_of(tiny_tokenizer, " ".join(hf_ptb_rows(PTB_TEST))) == 0).sum() + 1


def test_draws_leave_the_global_generator_alone(tmp_path, tiny_tokenizer):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.train.txt").write_text(PTB_TRAIN, encoding="utf-8")
    random.seed(123)
    expected = random.random()
    random.seed(123)
    calibration_windows("ptb", tiny_tokenizer, 3, 8, seed=9, data_dir=tmp_path)
    assert random.random() == expected


# --------------------------------------------------------------------------------------------
# caching
# --------------------------------------------------------------------------------------------


class CountingTokenizer:
    def __init__(self, inner):
        self.inner, self.calls, self.name_or_path = inner, 0, "counting"

    def __call__(self, text, **kwargs):
        self.calls += 1
        return self.inner(text, **kwargs)

    def __len__(self):
        return len(self.inner)


def test_streams_are_cached_and_follow_file_changes(tmp_path, tiny_tokenizer):
    (tmp_path / "ptb").mkdir()
    path = tmp_path / "ptb" / "ptb.test.txt"
    path.write_text(PTB_TEST, encoding="utf-8")
    tok = CountingTokenizer(tiny_tokenizer)
    first = eval_tokens("ptb", tok, 4, data_dir=tmp_path)
    first[:] = 0  # the caller's copy: must not reach the cache
    second = eval_tokens("ptb", tok, 8, data_dir=tmp_path)
    assert tok.calls == 1
    assert torch.equal(second, ids_of(tiny_tokenizer, " ".join(hf_ptb_rows(PTB_TEST))))

    path.write_text(PTB_TRAIN, encoding="utf-8")  # new content, new size: a fresh read
    third = eval_tokens("ptb", tok, 4, data_dir=tmp_path)
    assert tok.calls == 2
    assert torch.equal(third, ids_of(tiny_tokenizer, " ".join(hf_ptb_rows(PTB_TRAIN))))

    other = CountingTokenizer(tiny_tokenizer)  # another tokenizer object never shares entries
    eval_tokens("ptb", other, 4, data_dir=tmp_path)
    assert other.calls == 1


def test_c4_documents_tokenized_once_per_draw(tmp_path, tiny_tokenizer):
    docs = c4_docs(20, seed=8)
    write_jsonl(tmp_path / "c4" / "c4-train.json", docs)
    tok = CountingTokenizer(tiny_tokenizer)
    calibration_windows("c4", tok, 8, 30, seed=0, data_dir=tmp_path)
    assert tok.calls <= len(docs)
    calls = tok.calls
    calibration_windows("c4", tok, 8, 30, seed=0, data_dir=tmp_path)
    assert tok.calls == calls


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_missing_file_lists_every_searched_path(tmp_path, tiny_tokenizer):
    with pytest.raises(LlmpruneError) as err:
        eval_tokens("wikitext2", tiny_tokenizer, 8, data_dir=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("wikitext-2-raw-v1/wiki.test.raw", "wikitext-2-raw-v1/test-00000-of-00001.parquet",
                 "wikitext/wikitext-2-raw-v1/test-00000-of-00001.parquet"):
        assert str(tmp_path / part) in msg
    with pytest.raises(LlmpruneError, match="ptb.train.txt"):
        calibration_windows("ptb", tiny_tokenizer, 2, 8, data_dir=tmp_path)
    write_jsonl(tmp_path / "c4-sample" / "c4_sample.jsonl", ["a b c"])  # train only, as the shared dir
    with pytest.raises(LlmpruneError) as err:
        eval_tokens("c4", tiny_tokenizer, 8, data_dir=tmp_path)
    assert str(tmp_path / "c4") in str(err.value) and str(tmp_path / "c4-sample") in str(err.value)
    assert "validation" in str(err.value)


def test_missing_data_dir(tmp_path, tiny_tokenizer):
    with pytest.raises(LlmpruneError, match="data dir .*nowhere does not exist"):
        eval_tokens("ptb", tiny_tokenizer, 8, data_dir=tmp_path / "nowhere")


def test_unknown_dataset_lists_known_names(tiny_tokenizer):
    with pytest.raises(LlmpruneError) as err:
        eval_tokens("wikitext103", tiny_tokenizer, 8)
    for name in DATASETS:
        assert name in str(err.value)
    with pytest.raises(LlmpruneError, match="does not exist"):
        eval_tokens("/no/such/file.jsonl", tiny_tokenizer, 8)


def test_corrupt_files_are_named(tmp_path, tiny_tokenizer):
    bad = tmp_path / "c4" / "c4-train.jsonl"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"text": "fine"}\n\n{"text": "broken\n', encoding="utf-8")
    with pytest.raises(LlmpruneError) as err:
        calibration_windows("c4", tiny_tokenizer, 2, 8, data_dir=tmp_path)
    assert str(bad) in str(err.value) and "line 3" in str(err.value)

    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(LlmpruneError, match=r"line 2 has no 'text'"):
        calibration_windows("c4", tiny_tokenizer, 2, 8, data_dir=tmp_path)

    bad.unlink()
    gz = tmp_path / "c4" / "c4-train.json.gz"
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(LlmpruneError, match=str(gz)):
        calibration_windows("c4", tiny_tokenizer, 2, 8, data_dir=tmp_path)

    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_bytes(b"ok line\n\xff\xfe bad bytes\n")
    with pytest.raises(LlmpruneError, match=r"ptb.test.txt line 2 is not UTF-8"):
        eval_tokens("ptb", tiny_tokenizer, 4, data_dir=tmp_path)

    folder = tmp_path / "wikitext-2-raw-v1"
    folder.mkdir()
    (folder / "test-00000-of-00001.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(LlmpruneError, match="test-00000-of-00001.parquet"):
        eval_tokens("wikitext2", tiny_tokenizer, 4, data_dir=tmp_path)


def test_seqlen_checks(tmp_path, tiny_tokenizer):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text(PTB_TEST, encoding="utf-8")
    (tmp_path / "ptb" / "ptb.train.txt").write_text(PTB_TEST, encoding="utf-8")
    n = ids_of(tiny_tokenizer, " ".join(hf_ptb_rows(PTB_TEST))).numel()
    assert eval_tokens("ptb", tiny_tokenizer, n, data_dir=tmp_path).numel() == n
    with pytest.raises(LlmpruneError, match=f"has {n} tokens, fewer than seqlen {n + 1}"):
        eval_tokens("ptb", tiny_tokenizer, n + 1, data_dir=tmp_path)
    # calibration windowing needs one token more than a window (randint(0, n - seqlen - 1))
    assert calibration_windows("ptb", tiny_tokenizer, 2, n - 1, data_dir=tmp_path).shape == (2, n - 1)
    with pytest.raises(LlmpruneError, match=f"at least {n + 1}"):
        calibration_windows("ptb", tiny_tokenizer, 2, n, data_dir=tmp_path)
    for bad in (1, 0, "8"):
        with pytest.raises(LlmpruneError, match="seqlen"):
            eval_tokens("ptb", tiny_tokenizer, bad, data_dir=tmp_path)
    with pytest.raises(LlmpruneError, match="nsamples"):
        calibration_windows("ptb", tiny_tokenizer, 0, 8, data_dir=tmp_path)


def test_c4_without_long_documents_fails_instead_of_looping(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "c4" / "c4-train.jsonl", ["short doc", "another short one"] * 10)
    start = time.perf_counter()
    with pytest.raises(LlmpruneError, match="no document .* longer than seqlen 64.*shorter --seqlen"):
        calibration_windows("c4", tiny_tokenizer, 4, 64, data_dir=tmp_path)
    assert time.perf_counter() - start < 10


def test_hub_path_fails_fast_offline(monkeypatch, tiny_tokenizer):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert resolve_data_dir() is None
    assert describe_source("ptb") == "hub:ptb-text-only/ptb_text_only/penn_treebank:test"
    assert describe_source("c4", split="calibration") == "hub:allenai/c4/en/c4-train.00000-of-01024.json.gz"
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(LlmpruneError) as err:
        eval_tokens("ptb", tiny_tokenizer, 8)
    assert time.perf_counter() - start < 5
    assert "--data-dir" in str(err.value) and "<data-dir>/ptb/ptb.test.txt" in str(err.value)


def test_hub_errors_are_wrapped(monkeypatch, tiny_tokenizer):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LlmpruneError) as err:
        calibration_windows("c4", tiny_tokenizer, 2, 8)
    msg = str(err.value)
    assert "\n" not in msg and "Couldn't reach" in msg and "--data-dir" in msg and "c4-sample" in msg


def test_hub_rows_are_read_from_the_dataset(monkeypatch, tiny_tokenizer):
    """The online path: the right repo/config/split, the column read as the references read it."""
    import datasets

    calls = []

    def fake_load(path, config=None, split=None, **kwargs):
        calls.append((path, config, split, kwargs))
        return datasets.Dataset.from_dict({"sentence": hf_ptb_rows(PTB_TEST)})

    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ids = eval_tokens("ptb", tiny_tokenizer, 4)
    assert calls == [("ptb-text-only/ptb_text_only", "penn_treebank", "test", {})]
    assert tiny_tokenizer.decode(ids) == " ".join(hf_ptb_rows(PTB_TEST))

    docs = c4_docs(30, seed=9)

    def fake_c4_load(*a, **k):
        calls.append(a + (k,))
        return datasets.Dataset.from_dict({"text": docs})

    monkeypatch.setattr(datasets, "load_dataset", fake_c4_load)
    got = calibration_windows("c4", tiny_tokenizer, 4, 30, seed=1)
    assert calls[-1] == ("allenai/c4", None, {"split": "train",
                                              "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}})
    assert torch.equal(got, reference_c4_windows(tiny_tokenizer, docs, 4, 30, 1))


# --------------------------------------------------------------------------------------------
# the shared data with the real SmolLM2 tokenizer
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from llmprune.models import bundled_model_path

    path = bundled_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_shared_ptb_eval_stream(data_dir, smollm2_tokenizer):
    raw = (data_dir / "ptb" / "ptb.test.txt").read_text(encoding="utf-8")
    rows = hf_ptb_rows(raw)
    assert len(rows) == 3761  # HF ptb_text_only test split size
    ids = eval_tokens("ptb", smollm2_tokenizer, 2048, data_dir=data_dir)
    assert torch.equal(ids, ids_of(smollm2_tokenizer, " ".join(rows)))
    assert ids.numel() // 2048 >= 40
    assert describe_source("ptb", data_dir) == str(data_dir / "ptb" / "ptb.test.txt")


def test_shared_c4_calibration_windows(data_dir, smollm2_tokenizer):
    path = data_dir / "c4-sample" / "c4_sample.jsonl"
    docs = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(docs) == 1000
    got = calibration_windows("c4", smollm2_tokenizer, 4, 2048, seed=0, data_dir=data_dir)
    assert got.shape == (4, 2048)
    assert torch.equal(got, reference_c4_windows(smollm2_tokenizer, docs, 4, 2048, 0))
    assert describe_source("c4", data_dir, split="calibration") == str(path)
