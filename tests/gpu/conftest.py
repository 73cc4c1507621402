"""GPU tier: every test here is skipped unless CUDA is available."""

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (tests/gpu runs on GPU machines only)")
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory):
    """A small random GPT-2 (2 layers x 64) with a BPE tokenizer trained on two stdlib modules, saved as an HF
    directory."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from mass.data.corpus import collect_documents
    from mass.data.tokenizer import train_tokenizer

    tok = train_tokenizer([d["text"] for d in collect_documents(["json", "textwrap"], progress=False)], 512)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=2, n_head=4,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp("lm")
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
