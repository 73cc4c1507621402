"""Pydantic config base and the YAML recipe loader with ``--set a.b=c`` overrides.

Every error names the file, the line or the dotted field, in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mass.errors import ConfigError

C = TypeVar("C", bound="MassConfig")


class MassConfig(BaseModel):
    """Base of every config read from YAML, HTTP or job arguments: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def parse_overrides(overrides: list[str] | None) -> list[tuple[list[str], Any]]:
    """Parse ``a.b=c`` strings into (path, value) pairs; values are read as YAML scalars."""
    parsed = []
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError(f"bad override {item!r}: expected dotted.key=value", field=item)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip().split("."), value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Return ``data`` with every ``a.b=c`` override applied (creating nested mappings as needed)."""
    for path, value in parse_overrides(overrides):
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[:i + 1])} is not a mapping",
                                  field=".".join(path))
            node = child
        node[path[-1]] = value
    return data


def format_validation_error(exc: ValidationError, source: str) -> ConfigError:
    """Turn a pydantic ValidationError into a one-line ConfigError naming the first bad field."""
    errors = exc.errors()
    first = errors[0]
    parts = list(first["loc"])
    if first["type"] == "union_tag_invalid":  # a discriminated union names its tag field in the context
        parts.append(first["ctx"]["discriminator"].strip("'"))
    tags = first.get("ctx", {}).get("expected_tags") if first["type"] == "union_tag_invalid" else None
    tag = next((i for i, p in enumerate(parts) if _is_union_tag(p, first)), None)  # the member's tag comes first;
    loc = ".".join(str(p) for i, p in enumerate(parts) if i != tag) or "<root>"  # a field named like a tag stays
    msg = first["msg"] if tags is None else f"must be one of {tags}"
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check spelling; see the recipe reference in the README)"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return ConfigError(f"{source}: {loc}: {msg}{more}", field=loc)


def _is_union_tag(part: Any, error: dict[str, Any]) -> bool:
    """pydantic puts the chosen member's tag (``llm``) into the location of errors inside it."""
    return isinstance(part, str) and part in UNION_TAGS


#: tags of the configs' discriminated unions, kept out of error locations (modules that declare one add theirs)
UNION_TAGS: set[str] = set()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path``; raise ConfigError for a missing file or malformed YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", field="config")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where}: malformed YAML: {problem}", field="config") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}", field="config")
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict[str, Any] | None = None) -> C:
    """Build a config of type ``cls`` from a YAML file (or ``data``) plus ``--set`` overrides.

    Args:
        cls: the MassConfig subclass to validate against.
        path: YAML file; optional when ``data`` is given.
        overrides: ``dotted.key=value`` strings applied after the file.
        data: an already-loaded mapping to start from.

    Raises:
        ConfigError: naming the file and the field for every kind of bad input.
    """
    base = dict(data or {})
    if path is not None:
        base.update(read_yaml(path))
    merged = apply_overrides(base, overrides)
    try:
        return cls.model_validate(merged)
    except ValidationError as exc:
        raise format_validation_error(exc, str(path) if path else cls.__name__) from exc
