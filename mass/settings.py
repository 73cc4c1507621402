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
    "MASS_SERVE_INGRESS": ("haproxy", "How HTTP reaches the gateway when MASS starts Ray: haproxy (Ray Serve's high-throughput mode: HAProxy in front of the gateway replicas, direct ingress, gRPC between replicas) or proxy (Serve's default Python proxy)."),
    "RAY_ADDRESS": ("", "Ray's own variable: the cluster to join. Empty: jobs start a local Ray."),
}

#: Ray's own switches for each ``MASS_SERVE_INGRESS`` mode. Ray reads them when its processes start, so they
#: must be in the environment of ``ray start`` (or of the driver that starts a local Ray). Sync handle calls
#: (the SDK inside a Ray task) need the router on its own loop, so that flag keeps Ray's usual default.
SERVE_INGRESS_ENV: dict[str, dict[str, str]] = {
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"},
    "proxy": {},
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
    serve_ingress: str

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
        serve_ingress=_serve_ingress(),
    )


def _serve_ingress() -> str:
    from mass.errors import ConfigError

    mode = _env("MASS_SERVE_INGRESS").strip().lower()
    if mode not in SERVE_INGRESS_ENV:
        raise ConfigError(f"MASS_SERVE_INGRESS={mode!r} is not an ingress mode; use one of "
                          f"{', '.join(SERVE_INGRESS_ENV)}", field="MASS_SERVE_INGRESS")
    return mode


def ray_start_env(settings: Settings) -> dict[str, str]:
    """Ray Serve's switches for the configured ingress mode: the environment ``ray start`` needs."""
    return dict(SERVE_INGRESS_ENV[settings.serve_ingress])


def apply_ray_start_env(settings: Settings) -> None:
    """Put Serve's ingress switches into this process's environment before it starts a local Ray
    (values already set win, so ``RAY_SERVE_*`` can still be tuned one by one)."""
    for key, value in ray_start_env(settings).items():
        os.environ.setdefault(key, value)


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment that makes another process (a Ray job or worker) see the same settings."""
    return {
        "MASS_HOME": str(settings.home),
        "MASS_TRACKING_URI": settings.tracking_uri,
        "MASS_ARTIFACT_ROOT": settings.artifact_root,
        "MASS_EXPERIMENT": settings.experiment,
        "MASS_STORAGE_PATH": settings.storage_path,
        "MASS_LOG_LEVEL": settings.log_level,
        "MASS_SERVE_INGRESS": settings.serve_ingress,
        **OFFLINE_ENV,
    }


#: No process of ours may reach a model hub: these machines are offline and runs must be reproducible.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_LOGGING_LEVEL": "WARNING"}


def apply_offline_env() -> None:
    """Put the offline switches into this process's environment (called by entry points, not imports)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
