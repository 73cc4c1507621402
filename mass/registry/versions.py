"""What a model version is to MASS: ``ModelVersionInfo``/``RegisteredModelInfo`` and the ``mass.*`` tag codec
that stores task, metrics, size, lineage and the resolved config on an MLflow model version."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: our task name -> the transformers pipeline task mlflow.transformers records.
TASKS = {"text-generation": "text-generation", "embedding": "feature-extraction"}
TAG = "mass."
TAG_LIMIT = 100_000  # MLflow 3.17's MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH
CONFIG_ARTIFACT = "resolved_config.json"


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered model version, as MASS sees it."""

    name: str
    version: int
    status: str
    task: str
    source: str
    run_id: str | None
    created_at: float
    aliases: tuple[str, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    size_bytes: int = 0
    lineage: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    description: str = ""
    format: str = "transformers"  # the artifact: an HF directory (transformers), an ONNX export (onnx), or a
    # quantized copy's files: PyTorch dynamic int8 (torch-int8), bitsandbytes (bnb)

    @property
    def ref(self) -> str:
        """The fixed ``name/version`` reference of this version."""
        return f"{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of this version."""
        return {"name": self.name, "version": self.version, "ref": self.ref, "status": self.status,
                "task": self.task, "aliases": list(self.aliases), "metrics": self.metrics,
                "size_bytes": self.size_bytes, "lineage": self.lineage, "run_id": self.run_id,
                "source": self.source, "created_at": self.created_at, "description": self.description,
                "config": self.config, "format": self.format}


@dataclass(frozen=True)
class RegisteredModelInfo:
    """A registered model with its versions (newest first) and aliases."""

    name: str
    aliases: dict[str, int]
    versions: tuple[ModelVersionInfo, ...]
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of this model and its versions."""
        return {"name": self.name, "aliases": self.aliases, "description": self.description,
                "versions": [v.to_dict() for v in self.versions]}


def encode_tags(task: str, metrics: dict[str, float] | None, config: dict[str, Any] | None,
                lineage: dict[str, str] | None, size: int, fmt: str = "transformers") -> dict[str, str]:
    """The ``mass.*`` tags of a new version (``fmt``: the artifact's format: ``transformers``, ``onnx``,
    ``torch-int8`` or ``bnb``). A
    resolved config longer than MLflow's limit on a registry tag value is kept as ``{"truncated": true,
    "artifact": ...}`` (the run holds it whole as an artifact)."""
    tags = {TAG + "task": task, TAG + "size_bytes": str(size), TAG + "format": fmt}
    for key, value in (metrics or {}).items():
        tags[f"{TAG}metric.{key}"] = repr(float(value))
    for key, value in (lineage or {}).items():
        if value is not None:
            tags[f"{TAG}lineage.{key}"] = str(value)
    if config is not None:
        text = json.dumps(config, sort_keys=True, default=str)
        if len(text) > TAG_LIMIT:
            text = json.dumps({"truncated": True, "artifact": CONFIG_ARTIFACT})
        tags[TAG + "config"] = text
    return tags


def aliases_by_version(aliases: dict[str, Any]) -> dict[int, tuple[str, ...]]:
    """Invert ``alias -> version`` into ``version -> sorted aliases``."""
    out: dict[int, list[str]] = {}
    for alias, version in aliases.items():
        out.setdefault(int(version), []).append(alias)
    return {v: tuple(sorted(a)) for v, a in out.items()}


def version_info(mv, aliases: tuple[str, ...]) -> ModelVersionInfo:
    """A ``ModelVersionInfo`` from an MLflow ``ModelVersion`` and the aliases pointing at it."""
    tags = dict(mv.tags or {})
    metrics = {k[len(TAG + "metric."):]: float(v) for k, v in tags.items() if k.startswith(TAG + "metric.")}
    lineage = {k[len(TAG + "lineage."):]: v for k, v in tags.items() if k.startswith(TAG + "lineage.")}
    config = json.loads(tags[TAG + "config"]) if TAG + "config" in tags else None
    return ModelVersionInfo(
        name=mv.name, version=int(mv.version), status=str(mv.status), task=tags.get(TAG + "task", "unknown"),
        source=mv.source, run_id=mv.run_id, created_at=(mv.creation_timestamp or 0) / 1000.0,
        aliases=aliases, metrics=metrics, size_bytes=int(tags.get(TAG + "size_bytes", 0)), lineage=lineage,
        config=config, description=mv.description or "", format=tags.get(TAG + "format", "transformers"))
