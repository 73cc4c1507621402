"""A version's size is its weights' bytes as stored: tied tensors count once."""

from mass.models import weights_bytes


def test_tied_embeddings_count_once(lm):
    model = lm[0]
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # GPT-2 ties them
    assert weights_bytes(model) == sum(p.numel() * p.element_size() for p in model.parameters())
