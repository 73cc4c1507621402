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
