"""The unit tier never starts Ray: ``ray.init`` fails loudly here (Ray Serve's own unit tests do the same)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def disallow_ray_init(monkeypatch):
    """Any ``ray.init`` (a Serve handle call would make one) fails the test that made it."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("the unit tier must not start Ray; move this test to tests/integration")

    monkeypatch.setattr(ray, "init", refuse)


from tests.unit.gateway_app import gateway_client, tiny_lm, unit_keys  # noqa: E402,F401  (fixtures)


@pytest.fixture(scope="session")
def lm():
    """(model, tokenizer): a 2-layer random-weight GPT-2 over our BPE tokenizer, shared by the engine tests."""
    return tiny_lm()
