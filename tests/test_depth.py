"""Depth pruning (shortgpt, angular): the block statistics against transformers' own hidden states,
the removal against a shallower model built by hand, the checkpoint reloading with plain
transformers, and the refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import make_family_model, make_model, write_local_setup
from llmprune import PruneConfig, prune
from llmprune.cli import main
from llmprune.errors import LlmpruneError
from llmprune.math.drop import angular_distance, best_run, cosine_sum, lowest


def _windows(n=4, seqlen=24, seed=3, vocab=512):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _hidden_states(model, windows):
    """transformers' hidden states: the embeddings, each block's output, the last after the norm."""
    with torch.no_grad():
        return model(windows, output_hidden_states=True).hidden_states


# ---- the arithmetic --------------------------------------------------------------------------------

def test_cosine_sum_and_angular_distance_by_hand():
    x = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # (1 window, 2 tokens, 2)
    y = torch.tensor([[[0.0, 2.0], [2.0, 2.0]]])
    total, count = cosine_sum(x, y)
    assert count == 2 and total == pytest.approx(0.0 + 1.0)
    d = angular_distance(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 3.0], [-1.0, 0.0]]))
    assert d.tolist() == pytest.approx([0.5, 1.0])


def test_lowest_and_best_run_by_brute_force():
    assert lowest([0.3, 0.1, 0.1, 0.9], 2) == [1, 2]
    assert lowest([0.5, 0.2, 0.9, 0.2], 1) == [1]  # a tie goes to the earlier block
    gen = torch.Generator().manual_seed(0)
    states = [torch.randn(3, 5, generator=gen) for _ in range(7)]  # 6 blocks
    for n in (1, 2, 3):
        blocks, distances = best_run(states, n)
        brute = []
        for start in range(7 - n):
            a, b = states[start], states[start + n]
            cos = [float(a[k] @ b[k] / (a[k].norm() * b[k].norm())) for k in range(3)]
            brute.append(sum(math.acos(max(-1.0, min(1.0, c))) / math.pi for c in cos) / 3)
        assert distances == pytest.approx(brute, abs=1e-6)
        start = min(range(len(brute)), key=lambda s: (brute[s], s))
        assert blocks == list(range(start, start + n))


# ---- the engine against transformers' hidden states ------------------------------------------------

def test_shortgpt_block_influence_matches_transformers_hidden_states():
    model = make_model("llama", layers=5, seed=1)
    windows = _windows()
    states = _hidden_states(model, windows)
    expected = [1 - torch.nn.functional.cosine_similarity(states[i].double(), states[i + 1].double(),
                                                          dim=-1).mean().item() for i in range(5)]
    report = prune(model, None, PruneConfig(method="shortgpt", remove_blocks=2), windows=windows,
                   progress=False)
    assert report.depth["block_influence"] == pytest.approx(expected, abs=1e-6)
    assert report.depth["removed_blocks"] == sorted(sorted(range(5), key=lambda i: expected[i])[:2])
    assert report.depth["final_norm"] is True


def test_angular_distance_matches_transformers_hidden_states():
    model = make_model("llama", layers=6, seed=2)
    windows = _windows(seed=5)
    states = _hidden_states(model, windows)
    n = 2
    last = [s[:, -1].double() for s in states]
    cos = [torch.nn.functional.cosine_similarity(last[s], last[s + n], dim=-1) for s in range(6 - n + 1)]
    expected = [(torch.arccos(c.clamp(-1, 1)) / math.pi).mean().item() for c in cos]
    report = prune(model, None, PruneConfig(method="angular", remove_blocks=n), windows=windows,
                   progress=False)
    assert report.depth["angular_distance"] == pytest.approx(expected, abs=1e-6)
    start = min(range(len(expected)), key=lambda s: expected[s])
    assert report.depth["removed_blocks"] == [start, start + 1]


def _by_hand(model, removed):
    """The shallower model built independently: a fresh config with fewer layers, the kept blocks'
    weights under their new indices."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers -= len(removed)
    kept = [i for i in range(model.config.num_hidden_layers) if i not in removed]
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.layers."):
            index, rest = key[len("model.layers."):].split(".", 1)
            if int(index) not in removed:
                state[f"model.layers.{kept.index(int(index))}.{rest}"] = value
        else:
            state[key] = value
    shallow = type(model)(config).float().eval()
    shallow.load_state_dict(state)
    return shallow


@pytest.mark.parametrize("method", ["shortgpt", "angular"])
def test_removed_blocks_give_the_hand_built_shallow_model(method, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_model("llama", layers=6, seed=4)
    dense = copy.deepcopy(model)
    windows = _windows(seed=9)
    report = prune(model, None, PruneConfig(method=method, remove_blocks=3), windows=windows, progress=False)
    removed = report.depth["removed_blocks"]
    assert len(removed) == 3 and model.config.num_hidden_layers == 3
    assert report.overall_sparsity == pytest.approx(0.5)
    expected = _by_hand(dense, removed)
    with torch.no_grad():
        torch.testing.assert_close(model(windows).logits, expected(windows).logits, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert len(back.model.layers) == 3
    with torch.no_grad():
        torch.testing.assert_close(back(windows).logits, expected(windows).logits, rtol=0, atol=0)
    # generation with a KV cache: the renumbered layer_idx index the cache
    prompt = windows[:1, :8]
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False),
                       expected.generate(prompt, max_new_tokens=6, do_sample=False))


def test_per_layer_config_lists_follow_the_removed_blocks():
    model = make_family_model("qwen2", layers=4, use_sliding_window=True, sliding_window=8,
                              max_window_layers=2)
    before = list(model.config.layer_types)
    report = prune(model, None, PruneConfig(method="shortgpt", remove_blocks=1),
                   windows=_windows(seed=1), progress=False)
    removed = report.depth["removed_blocks"][0]
    assert model.config.layer_types == [t for i, t in enumerate(before) if i != removed]
    assert model.config.num_hidden_layers == 3


# ---- refusals ----------------------------------------------------------------------------------------

def test_depth_bad_input_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(LlmpruneError, match="would leave no block"):
        prune(make_model("llama", layers=3), None, PruneConfig(method="shortgpt", remove_blocks=3),
              windows=_windows())
    with pytest.raises(LlmpruneError, match="removes no block"):
        prune(make_model("llama", layers=3), None, PruneConfig(method="angular", sparsity=0.1),
              windows=_windows())
    with pytest.raises(LlmpruneError, match="does not apply"):
        PruneConfig(method="shortgpt", pattern="2:4")
    with pytest.raises(LlmpruneError, match="whole number"):
        PruneConfig(method="angular", remove_blocks=1.5)
    root = write_local_setup(tmp_path)
    capsys.readouterr()
    code = main(["prune", "--model", str(root / "model"), "--calib", str(root / "calib.jsonl"), "--nsamples",
                 "2", "--seqlen", "32", "--eval", str(root / "eval.txt"), "--method", "shortgpt",
                 "--remove-blocks", "2", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "leave no block" in err
