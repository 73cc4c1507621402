"""The model repository: every model version MASS knows, stored in MLflow."""

from mass.registry.store import ModelRegistry, ModelVersionInfo, RegisteredModelInfo, TASKS

__all__ = ["ModelRegistry", "ModelVersionInfo", "RegisteredModelInfo", "TASKS"]
