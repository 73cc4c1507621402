from pathlib import Path

from mass.settings import VARIABLES, get_settings, settings_env


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
