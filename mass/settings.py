"""Deployment settings: every ``MASS_*`` environment variable, declared once, typed, with a default.

This is the only module that reads ``os.environ``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: name -> (default, doc). The README's configuration table is generated from the same facts.
VARIABLES: dict[str, tuple[str, str]] = {
    "MASS_HOME": ("~/.mass", "Root for the embedded registry (sqlite + artifacts), corpus, checkpoints and caches."),
    "MASS_TRACKING_URI": ("", "MLflow tracking/registry URI. Empty: sqlite:///$MASS_HOME/mlflow.db."),
    "MASS_ARTIFACT_ROOT": ("", "Artifact root for new MLflow experiments. Empty: $MASS_HOME/artifacts (embedded) or the server's default."),
    "MASS_EXPERIMENT": ("mass", "MLflow experiment that training and registration runs are logged under."),
    "MASS_STORAGE_PATH": ("", "Ray Train storage for checkpoints. Empty: $MASS_HOME/ray_results. Multi-node: shared storage (s3://, NFS)."),
    "MASS_LOG_LEVEL": ("INFO", "Log level for MASS loggers (DEBUG, INFO, WARNING, ERROR)."),
    "MASS_GATEWAY_URL": ("http://127.0.0.1:8000", "Gateway the SDK calls over HTTP when it runs outside the Ray cluster."),
    "RAY_ADDRESS": ("", "Ray's own variable: the cluster to join. Empty: jobs start a local Ray."),
}


def _env(name: str) -> str:
    return os.environ.get(name, VARIABLES[name][0])


@dataclass(frozen=True)
class Settings:
    """Resolved deployment settings. Build with :func:`get_settings`."""

    home: Path
    tracking_uri: str
    artifact_root: str
    experiment: str
    storage_path: str
    log_level: str
    ray_address: str
    gateway_url: str

    @property
    def embedded(self) -> bool:
        """True when the registry is the embedded sqlite store under ``MASS_HOME``."""
        return self.tracking_uri.startswith("sqlite:///") and str(self.home) in self.tracking_uri

    def corpus_dir(self) -> Path:
        """Default location of the built corpus splits."""
        return self.home / "corpus"


def get_settings() -> Settings:
    """Read the ``MASS_*`` variables now (not at import) and return resolved settings."""
    home = Path(_env("MASS_HOME")).expanduser().resolve()
    tracking = _env("MASS_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"
    artifact_root = _env("MASS_ARTIFACT_ROOT")
    if not artifact_root and tracking.startswith("sqlite:"):
        artifact_root = (home / "artifacts").as_uri()
    return Settings(
        home=home,
        tracking_uri=tracking,
        artifact_root=artifact_root,
        experiment=_env("MASS_EXPERIMENT"),
        storage_path=_env("MASS_STORAGE_PATH") or str(home / "ray_results"),
        log_level=_env("MASS_LOG_LEVEL").upper(),
        ray_address=_env("RAY_ADDRESS"),
        gateway_url=_env("MASS_GATEWAY_URL").rstrip("/"),
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment that makes another process (a Ray job or worker) see the same settings."""
    return {
        "MASS_HOME": str(settings.home),
        "MASS_TRACKING_URI": settings.tracking_uri,
        "MASS_ARTIFACT_ROOT": settings.artifact_root,
        "MASS_EXPERIMENT": settings.experiment,
        "MASS_STORAGE_PATH": settings.storage_path,
        "MASS_LOG_LEVEL": settings.log_level,
        **OFFLINE_ENV,
    }


#: No process of ours may reach a model hub: these machines are offline and runs must be reproducible.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_LOGGING_LEVEL": "WARNING"}


def apply_offline_env() -> None:
    """Put the offline switches into this process's environment (called by entry points, not imports)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
