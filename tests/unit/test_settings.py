from pathlib import Path

import pytest

from mass.errors import ConfigError
from mass.settings import VARIABLES, get_settings, ray_start_env, settings_env


def test_defaults_live_under_mass_home(mass_home):
    s = get_settings()
    assert s.home == mass_home.resolve()
    assert s.tracking_uri == f"sqlite:///{mass_home.resolve() / 'mlflow.db'}"
    assert s.artifact_root == (mass_home.resolve() / "artifacts").as_uri()
    assert s.embedded
    assert Path(s.storage_path) == mass_home.resolve() / "ray_results"


def test_environment_overrides(mass_home, monkeypatch):
    monkeypatch.setenv("MASS_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("MASS_LOG_LEVEL", "debug")
    s = get_settings()
    assert s.tracking_uri == "http://127.0.0.1:5000" and not s.embedded
    assert s.artifact_root == "" and s.log_level == "DEBUG"
    env = settings_env(s)
    assert env["MASS_TRACKING_URI"] == "http://127.0.0.1:5000" and env["HF_HUB_OFFLINE"] == "1"


def test_every_variable_is_documented():
    for name, (default, doc) in VARIABLES.items():
        assert doc.endswith(".") and len(doc) > 20, name


def test_serve_ingress_modes(mass_home, monkeypatch):
    assert ray_start_env(get_settings())["RAY_SERVE_ENABLE_HA_PROXY"] == "1"  # the default: haproxy
    monkeypatch.setenv("MASS_SERVE_INGRESS", "Proxy")
    assert get_settings().serve_ingress == "proxy" and ray_start_env(get_settings()) == {}
    monkeypatch.setenv("MASS_SERVE_INGRESS", "nginx")
    with pytest.raises(ConfigError, match="MASS_SERVE_INGRESS='nginx' is not an ingress mode; use one of haproxy, proxy"):
        get_settings()


def test_a_config_beyond_mlflows_tag_limit_points_at_its_artifact():
    """MLflow 3.17 takes 100,000 characters per model-version tag; a longer config is not silently lost:
    the tag says where the whole one is."""
    import json

    from mass.registry.versions import CONFIG_ARTIFACT, TAG_LIMIT, encode_tags

    small = encode_tags("text-generation", None, {"a": "x" * 6000}, None, 1)
    assert json.loads(small["mass.config"]) == {"a": "x" * 6000}  # the old 5,000 limit cut this
    big = encode_tags("text-generation", None, {"a": "x" * TAG_LIMIT}, None, 1)
    assert json.loads(big["mass.config"]) == {"truncated": True, "artifact": CONFIG_ARTIFACT}
