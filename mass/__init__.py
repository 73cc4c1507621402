"""MASS, the Model-As-a-Service Stack: train, compress, register and serve models on Ray.

The public API is re-exported here; heavy modules load only when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mass.errors import (ConfigError, DataError, InsufficientResources, InvalidApiKey, InvalidModelRef,
                         InvalidRequest, JobFailed, MassError, ModelNotFound, NotFound, PermissionDenied,
                         QuotaExceeded, RateLimited, RegistryError)
from mass.refs import ModelRef
from mass.settings import Settings, get_settings

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DataError", "InsufficientResources", "InvalidModelRef", "InvalidRequest", "JobFailed",
    "MassError", "ModelNotFound", "NotFound", "RegistryError", "InvalidApiKey", "PermissionDenied", "RateLimited",
    "QuotaExceeded", "ModelRef", "Settings", "get_settings",
    "ModelRegistry", "TrainConfig", "run_training", "build_corpus", "Client", "Completion", "__version__",
]

_LAZY = {
    "ModelRegistry": "mass.registry",
    "TrainConfig": "mass.training.config",
    "run_training": "mass.training.job",
    "build_corpus": "mass.data.corpus",
    "Client": "mass.sdk",
    "Completion": "mass.sdk",
}

if TYPE_CHECKING:  # pragma: no cover
    from mass.data.corpus import build_corpus
    from mass.registry import ModelRegistry
    from mass.sdk import Client, Completion
    from mass.training.config import TrainConfig
    from mass.training.job import run_training


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mass' has no attribute {name!r}")
