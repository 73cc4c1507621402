"""``ModelRef``: the one way to name a registered model — ``name``, ``name/3`` or ``name@production``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mass.errors import InvalidModelRef

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_NAME_HELP = "letters, digits, '.', '_' or '-', starting with a letter or digit, at most 64 characters"
_ALIAS_HELP = "lowercase letters, digits, '_' or '-', starting with a letter, at most 32 characters"


@dataclass(frozen=True)
class ModelRef:
    """A reference to a registered model: the latest version, a fixed version, or an alias.

    Attributes:
        name: registered model name.
        version: a fixed version number, or None.
        alias: an alias such as ``production``, or None. At most one of version/alias is set.
    """

    name: str
    version: int | None = None
    alias: str | None = None

    def __post_init__(self) -> None:
        validate_name(self.name)
        if self.version is not None and self.alias is not None:
            raise InvalidModelRef(f"model ref {self.name!r} has both a version and an alias; use one")
        if self.version is not None and (not isinstance(self.version, int) or self.version < 1):
            raise InvalidModelRef(f"model version must be a positive integer, got {self.version!r}")
        if self.alias is not None:
            validate_alias(self.alias)

    @classmethod
    def parse(cls, text: "str | ModelRef") -> "ModelRef":
        """Parse ``name``, ``name/<version>`` or ``name@<alias>``; raise InvalidModelRef otherwise."""
        if isinstance(text, ModelRef):
            return text
        if not isinstance(text, str) or not text.strip():
            raise InvalidModelRef("model ref is empty; expected 'name', 'name/<version>' or 'name@<alias>'")
        text = text.strip()
        if "@" in text:
            name, _, alias = text.partition("@")
            return cls(name, alias=alias)
        if "/" in text:
            name, _, version = text.partition("/")
            validate_name(name)
            if not version.isdigit():
                raise InvalidModelRef(f"model ref {text!r}: version after '/' must be a positive integer")
            return cls(name, version=int(version))
        return cls(text)

    @property
    def is_latest(self) -> bool:
        """True when the ref names no version or alias (it means the newest version)."""
        return self.version is None and self.alias is None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}/{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def validate_name(name: str) -> str:
    """Return ``name`` if it is a legal registered-model name, else raise InvalidModelRef."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidModelRef(f"illegal model name {name!r}: use {_NAME_HELP}", field="name")
    return name


def validate_alias(alias: str) -> str:
    """Return ``alias`` if it is a legal alias, else raise InvalidModelRef."""
    if not isinstance(alias, str) or not ALIAS_RE.match(alias) or alias == "latest" or re.fullmatch(r"v\d+", alias):
        raise InvalidModelRef(
            f"illegal alias {alias!r}: use {_ALIAS_HELP} ('latest' and 'v<N>' are reserved)", field="alias")
    return alias
