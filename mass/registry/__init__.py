"""The model repository: every model version MASS knows, stored in MLflow."""

from mass.registry.store import ModelRegistry
from mass.registry.versions import TASKS, ModelVersionInfo, RegisteredModelInfo

__all__ = ["ModelRegistry", "ModelVersionInfo", "RegisteredModelInfo", "TASKS"]
