"""Trigger rules: ``on`` an event type, ``where`` a condition over its payload holds, run a job (train, tune or a
compression pipeline) with a recipe and ``--set`` overrides filled from the event. Conditions are parsed and
checked against the event's schema when a rule is added, and evaluated without ``eval``."""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import operator
import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from mass.automation.launch import JobSpec
from mass.errors import ConfigError
from mass.events.schemas import SCHEMAS, Event

_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
            ast.NotIn: lambda a, b: a not in b}
_MISSING = object()
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")


class Condition:
    """A ``where`` expression: comparisons (``== != < <= > >= in``, ``not in``) of payload fields (dotted into dicts:
    ``metrics.val_loss``) with literals (strings, numbers, booleans, None, lists), joined by ``and``/``or``/``not``
    and parentheses. A field an event lacks makes its comparison false (never an error)."""

    def __init__(self, text: str, event_type: str) -> None:
        from mass.pyast import parse_python  # thread-safe ast.parse (see there)

        self.text = text.strip()
        try:
            self.tree = parse_python(self.text, mode="eval").body
        except SyntaxError as exc:
            raise ConfigError(f"where {self.text!r} does not parse: {exc.msg}; write e.g. \"name == 'docs'\"",
                              field="where") from None
        fields = set(SCHEMAS[event_type][1].model_fields)
        self._check(self.tree, fields, event_type)

    def _check(self, node: ast.AST, fields: set[str], event_type: str) -> None:
        if isinstance(node, ast.BoolOp):
            for value in node.values:
                self._check(value, fields, event_type)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            self._check(node.operand, fields, event_type)
        elif isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            for side in [node.left, *node.comparators]:
                path = _path(side)
                if path is not None:
                    if path[0] not in fields:
                        raise ConfigError(f"where {self.text!r}: {event_type} events have no field {path[0]!r}; "
                                          f"fields: {', '.join(sorted(fields))}", field="where")
                elif not _literal(side):
                    raise ConfigError(f"where {self.text!r}: {ast.unparse(side)!r} is neither a field nor a "
                                      "literal", field="where")
        else:
            raise ConfigError(f"where {self.text!r}: {ast.unparse(node)!r} is not a comparison; use == != < <= "
                              "> >= in, joined by and/or/not", field="where")

    def matches(self, payload: dict[str, Any]) -> bool:
        """Whether the condition holds for ``payload`` (an event's data as a dict)."""
        return bool(self._eval(self.tree, payload))

    def _eval(self, node: ast.AST, payload: dict[str, Any]) -> Any:
        if isinstance(node, ast.BoolOp):
            values = (self._eval(v, payload) for v in node.values)
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.UnaryOp):
            return not self._eval(node.operand, payload)
        if isinstance(node, ast.Compare):
            left = self._value(node.left, payload)
            for op, right_node in zip(node.ops, node.comparators):
                right = self._value(right_node, payload)
                if left is _MISSING or right is _MISSING:
                    return False
                try:
                    if not _COMPARE[type(op)](left, right):
                        return False
                except TypeError:  # e.g. a string field compared with a number: not a match
                    return False
                left = right
            return True
        raise AssertionError(f"unchecked node {ast.dump(node)}")  # _check admits nothing else

    @staticmethod
    def _value(node: ast.AST, payload: dict[str, Any]) -> Any:
        path = _path(node)
        if path is None:
            return ast.literal_eval(node)
        value = _lookup(payload, path)
        return _MISSING if value is None and not _has(payload, path) else value


def _has(payload: dict[str, Any], path: list[str]) -> bool:
    for part in path:
        if not isinstance(payload, dict) or part not in payload:
            return False
        payload = payload[part]
    return True


@functools.lru_cache(maxsize=256)
def _condition(where: str, event_type: str) -> Condition:
    """A rule's parsed condition (parsed once per text, not for every event the engine reads)."""
    return Condition(where, event_type)


def _path(node: ast.AST) -> list[str] | None:
    """``metrics.val_loss`` -> ["metrics", "val_loss"]; None for anything that is not a dotted name."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        head = _path(node.value)
        return None if head is None else [*head, node.attr]
    return None


def _literal(node: ast.AST) -> bool:
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        return False
    return True


class Rule(JobSpec):
    """One trigger rule (a YAML mapping, or ``mass triggers add`` flags): ``on`` an event type, ``where`` a
    condition holds, start the job; ``{field}`` in ``set`` is replaced from the event's payload (e.g.
    ``data.dataset={name}@{version}``)."""

    on: str = Field(..., description="Event type, e.g. dataset.updated, training.completed.")
    where: str | None = Field(None, description="Condition over the event's payload (None: every event).")
    enabled: bool = Field(True, description="Disabled rules match nothing.")

    @field_validator("on")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in SCHEMAS:
            raise ValueError(f"unknown event type {value!r}; known: {', '.join(sorted(SCHEMAS))}")
        return value

    @model_validator(mode="after")
    def _checked(self) -> "Rule":
        if self.where is not None:
            try:
                Condition(self.where, self.on)
            except ConfigError as exc:
                raise ValueError(exc.message) from None
        fields = set(SCHEMAS[self.on][1].model_fields)
        for item in self.set:
            for name in _PLACEHOLDER.findall(item):
                if name.split(".")[0] not in fields:
                    raise ValueError(f"set {item!r}: {self.on} events have no field {name!r}; fields: "
                                     f"{', '.join(sorted(fields))}")
        return self

    def matches(self, event: Event) -> bool:
        """Whether ``event`` starts this rule's job."""
        if not self.enabled or event.type != self.on:
            return False
        return self.where is None or _condition(self.where, self.on).matches(event.data.model_dump(mode="json"))

    def overrides(self, event: Event) -> list[str]:
        """``set`` with ``{field}`` filled from ``event``'s payload (dotted names reach into dicts)."""
        payload = event.data.model_dump(mode="json")
        out = []
        for item in self.set:
            out.append(_PLACEHOLDER.sub(lambda m: str(_lookup(payload, m.group(1).split("."))), item))
        return out


def _lookup(payload: dict[str, Any], path: list[str]) -> Any:
    value: Any = payload
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def dedupe_key(event: Event) -> str:
    """The same event however often it is delivered or published: SHA-256 of its type and canonical payload (not
    its offset or time: a publisher that sends one change twice makes two offsets with one meaning)."""
    payload = json.dumps(event.data.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{event.type}\n{payload}".encode()).hexdigest()


def load_rules(path: str | Path) -> list[Rule]:
    """Rules from a YAML file: a list of rule mappings, or ``{rules: [...]}``; ConfigError naming the rule and
    field."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read rules from {path}: {exc}", field="file") from None
    items = raw.get("rules") if isinstance(raw, dict) else raw
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path}: expected a list of rules (or rules: [...])", field="file")
    return [parse_rule(item, where=f"{path}: rule {i + 1}") for i, item in enumerate(items)]


def parse_rule(data: Any, where: str = "rule") -> Rule:
    """A validated Rule; ConfigError naming the field otherwise."""
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with name, on, action and config", field="rule")
    if True in data:  # YAML 1.1 reads a bare `on:` key as the boolean true
        data = {("on" if k is True else k): v for k, v in data.items()}
    try:
        return Rule.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        field = ".".join(str(p) for p in first["loc"])
        if not field:  # a whole-rule check: its message starts with the field it is about
            field = message.split()[0] if message.split()[0] in ("where", "set") else "rule"
            raise ConfigError(f"{where}: {message}", field=field) from None
        raise ConfigError(f"{where}: {field}: {message}", field=field) from None
