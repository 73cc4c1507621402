"""The unit tier never starts Ray: ``ray.init`` fails loudly here (Ray Serve's own unit tests do the same)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def unit_home(tmp_path_factory):
    """The unit tier never touches the user's ~/.mass (the fuzzer reaches the admin API's registry calls):
    MASS_HOME is a directory of the session's own; a test that needs a fresh one uses ``mass_home``."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MASS_HOME", str(tmp_path_factory.mktemp("unit-home")))
    for var in ("MASS_TRACKING_URI", "MASS_ARTIFACT_ROOT", "MASS_STORAGE_PATH", "MASS_DATABASE_URL",
                "MASS_EVENTS_URL"):
        patch.delenv(var, raising=False)
    yield
    patch.undo()


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
