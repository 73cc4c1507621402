"""Test tiers by folder: each test is auto-marked unit/integration/gpu/notebooks from its path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIERS = ("unit", "integration", "gpu", "notebooks")

# Tests never reach a hub and never write to the user's ~/.mass.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture
def mass_home(tmp_path, monkeypatch):
    """A private MASS_HOME (embedded sqlite registry + artifacts) for one test."""
    home = tmp_path / "mass-home"
    monkeypatch.setenv("MASS_HOME", str(home))
    for var in ("MASS_TRACKING_URI", "MASS_ARTIFACT_ROOT", "MASS_STORAGE_PATH", "MASS_DATABASE_URL", "MASS_API_KEY",
                "MASS_EVENTS_URL"):
        monkeypatch.delenv(var, raising=False)
    return home
