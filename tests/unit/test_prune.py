"""Pruning without Ray: structured pruning really shrinks MiniLM's and a GPT-2's tensors and removes exactly the channels and
layers that matter least (channels that carry nothing are removed without changing a single output), magnitude
pruning reports the zeros it made, and what cannot be pruned is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mass.compression.prune import _build, _pooled, prune_magnitude, prune_structured
from mass.models import load_hf_dir
from mass.registry.imports import minilm_dir

TEXTS = ["Return the number of items in a container.", "Open a file and return a stream.",
         "Create a new thread that runs the target callable.", "Parse the command line arguments."] * 4


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer = load_hf_dir(Path(minilm_dir()), "embedding", dtype="float32")
    return model.config.to_dict(), model.state_dict(), tokenizer


def test_channels_that_carry_nothing_are_the_ones_removed_and_the_outputs_do_not_change(minilm):
    spec, state, tokenizer = minilm
    state = dict(state)
    dead = torch.arange(0, 1536, 4)  # a quarter of every layer's FFN channels, zeroed on the way out
    for layer in range(6):
        key = f"encoder.layer.{layer}.output.dense.weight"
        state[key] = state[key].clone()
        state[key][:, dead] = 0
    before = _pooled(_build(spec, state), tokenizer, TEXTS)
    new_spec, new_state, removed = prune_structured(spec, state, tokenizer, TEXTS, drop_layers=0, ffn=0.25)
    pruned = _build(new_spec, new_state)
    assert new_spec["intermediate_size"] == 1152 and removed == {"ffn_channels": "384 of 1536 per layer"}
    assert pruned.encoder.layer[0].intermediate.dense.weight.shape == (1152, 384)  # really smaller
    assert pruned.encoder.layer[5].output.dense.weight.shape == (384, 1152)
    assert torch.allclose(_pooled(pruned, tokenizer, TEXTS), before, atol=1e-5)


def test_the_least_important_layer_is_dropped_and_the_rest_kept_in_order(minilm):
    spec, state, tokenizer = minilm
    new_spec, new_state, removed = prune_structured(spec, state, tokenizer, TEXTS, drop_layers=1, ffn=0.0)
    scores = removed["layer_scores"]
    assert len(scores) == 6 and removed["layers"] == [scores.index(min(scores))]
    assert new_spec["num_hidden_layers"] == 5 and new_spec["intermediate_size"] == 1536
    kept = [i for i in range(6) if i not in removed["layers"]]
    assert torch.equal(new_state["encoder.layer.4.attention.self.query.weight"],
                       state[f"encoder.layer.{kept[4]}.attention.self.query.weight"])
    cosine = (_pooled(_build(new_spec, new_state), tokenizer, TEXTS) * _pooled(_build(spec, state), tokenizer, TEXTS))
    assert cosine.sum(-1).mean() > 1 - max(scores)  # dropping the least important costs less than the most


def test_magnitude_pruning_zeroes_the_smallest_weights_and_says_how_many(minilm):
    _, state, _ = minilm
    pruned, zeros = prune_magnitude(state, 0.5)
    linear = [k for k, v in state.items() if k.startswith("encoder.layer.") and k.endswith(".weight") and v.dim() == 2]
    share = sum(int((pruned[k] == 0).sum()) for k in linear) / sum(pruned[k].numel() for k in linear)
    assert 0.499 <= share <= 0.501
    assert 0.05 < zeros < 0.5  # of all parameters: embeddings and norms untouched
    assert torch.equal(pruned["embeddings.word_embeddings.weight"], state["embeddings.word_embeddings.weight"])
    assert all(pruned[k].shape == state[k].shape for k in linear)  # dense: nothing got smaller


@pytest.fixture(scope="module")
def gpt2():
    """A random 3-layer GPT-2 (Conv1D layers, tied LM head) and token blocks."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=3, n_head=4)).eval()
    blocks = torch.randint(0, 300, (16, 32), generator=torch.Generator().manual_seed(1)).numpy()
    return model.config.to_dict(), model.state_dict(), blocks


def test_a_causal_lms_dead_ffn_channels_are_the_ones_removed_and_its_logits_do_not_change(gpt2):
    spec, state, blocks = gpt2
    state = dict(state)
    dead = torch.arange(0, 128, 4)  # a quarter of every layer's FFN channels, zeroed on the way out (Conv1D: rows)
    for layer in range(3):
        key = f"transformer.h.{layer}.mlp.c_proj.weight"
        state[key] = state[key].clone()
        state[key][dead] = 0
    ids = torch.as_tensor(blocks[:4], dtype=torch.long)
    with torch.no_grad():
        before = _build(spec, state)(ids).logits
    new_spec, new_state, removed = prune_structured(spec, state, None, blocks, drop_layers=0, ffn=0.25)
    pruned = _build(new_spec, new_state)
    assert new_spec["n_inner"] == 96 and removed == {"ffn_channels": "32 of 128 per layer"}
    assert pruned.transformer.h[0].mlp.c_fc.weight.shape == (32, 96)  # really smaller
    assert pruned.transformer.h[2].mlp.c_proj.weight.shape == (96, 32)
    with torch.no_grad():
        assert torch.allclose(pruned(ids).logits, before, atol=1e-4)


def test_a_causal_lms_least_important_layer_is_the_one_whose_removal_raises_its_loss_least(gpt2):
    from mass.compression.card import mean_loss

    spec, state, blocks = gpt2
    new_spec, new_state, removed = prune_structured(spec, state, None, blocks, drop_layers=1, ffn=0.0)
    scores = removed["layer_scores"]
    assert len(scores) == 3 and removed["layers"] == [scores.index(min(scores))]
    assert new_spec["n_layer"] == 2
    kept = [i for i in range(3) if i not in removed["layers"]]
    assert torch.equal(new_state["transformer.h.1.attn.c_attn.weight"],
                       state[f"transformer.h.{kept[1]}.attn.c_attn.weight"])
    assert mean_loss(_build(new_spec, new_state), blocks) - mean_loss(_build(spec, state), blocks) == pytest.approx(
        min(scores), abs=1e-3)
