"""The embedding engine on the real pretrained all-MiniLM-L6-v2 shipped in its package."""

import pytest
import torch

from mass.errors import InvalidRequest
from mass.serving.engines.embedding import EmbeddingEngine


@pytest.fixture(scope="module")
def engine():
    from transformers import AutoModel, AutoTokenizer

    from mass.registry.imports import minilm_dir

    path = minilm_dir()
    return EmbeddingEngine(AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path))


def test_vectors_are_normalised_ordered_and_meaningful(engine):
    texts = ["quarterly tax filing deadline", "a cat sits on the mat",
             "a small kitten is resting on a rug in the living room"]
    vectors, tokens = engine.embed(texts)
    v = torch.tensor(vectors)
    assert v.shape == (3, 384) and torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert float(v[1] @ v[2]) > float(v[1] @ v[0]) + 0.2
    assert len(tokens) == 3 and tokens[0] < tokens[2]


def test_length_sorting_does_not_change_results(engine):
    texts = ["short", "a much longer sentence about serving models behind a gateway", "mid length text"]
    together, _ = engine.embed(texts)
    alone = [engine.embed([t])[0][0] for t in texts]
    assert torch.allclose(torch.tensor(together), torch.tensor(alone), atol=1e-5)


def test_empty_input_is_rejected(engine):
    with pytest.raises(InvalidRequest, match="at least one text"):
        engine.embed([])
