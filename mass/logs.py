"""Explicit logging set-up for entry points (CLI, jobs); importing MASS never configures logging."""

from __future__ import annotations

import logging
import sys

_NOISY = ("mlflow", "alembic", "urllib3", "filelock", "httpx", "transformers", "ray")


def setup_logging(level: str = "INFO", quiet_libraries: bool = True) -> None:
    """Send MASS logs to stderr at ``level`` and turn down chatty libraries.

    Args:
        level: level name for the ``mass`` loggers.
        quiet_libraries: lower MLflow/alembic/transformers logs to WARNING.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("mass")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    if quiet_libraries:
        for name in _NOISY:
            logging.getLogger(name).setLevel(logging.WARNING)


def setup_replica_logging() -> None:
    """In a Serve replica: MASS's records go straight to the replica's log file
    (``logs/serve/replica_<app>_<deployment>_<id>.log``), at ``MASS_LOG_LEVEL``.

    Serve writes its own records through a buffer of ``RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE`` records (1000
    with the throughput preset MASS enables) that is flushed only when full or on an ERROR, so a WARNING — a
    circuit breaker opening, a replica lost mid-stream — could stay unseen for minutes, or die with the
    replica. Outside a replica (no Serve file handler) nothing changes."""
    import logging.handlers

    from mass.settings import get_settings

    files = [h.target.baseFilename for h in logging.getLogger("ray.serve").handlers
             if isinstance(h, logging.handlers.MemoryHandler) and hasattr(h.target, "baseFilename")]
    if not files:
        return
    handler = logging.FileHandler(files[0])  # append mode: Serve's own handler keeps writing the same file
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s"))
    logger = logging.getLogger("mass")
    logger.handlers[:] = [handler]
    logger.setLevel(get_settings().log_level)
    logger.propagate = False
