"""A tuning search space: dotted fields of the training recipe, each with a distribution, checked against the
recipe before any trial starts and turned into Ray Tune's search domains."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from mass.errors import ConfigError

KINDS = ("loguniform", "uniform", "randint", "choice", "grid")
#: recipe fields a trial may change (the rest — name, data files, scaling, checkpoints, registration — are the
#: same for every trial: they decide what runs where and what is kept, not how well it learns)
TUNABLE = ("model.arch.", "model.vocab_size", "optim.", "data.block_size", "data.max_train_tokens")
_MAX_COMBINATIONS = 1024  # every combination of the dimensions' extreme values is checked up to this many


@dataclass(frozen=True)
class Dimension:
    """One tuned field: ``path`` (``optim.lr``), ``kind`` (one of ``KINDS``) and its ``values`` (bounds, or the
    listed values of ``choice`` and ``grid``)."""

    path: str
    kind: str
    values: tuple

    def extremes(self) -> tuple:
        """The values a check tries: both bounds, or every listed value."""
        return self.values

    def to_tune(self):
        """The Ray Tune domain (``randint``'s high end is included here; Ray Tune's is not)."""
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "randint":
            return tune.randint(self.values[0], self.values[1] + 1)
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))


def parse_space(space: dict[str, Any] | None) -> list[Dimension]:
    """The dimensions of a ``space:`` mapping (``{"optim.lr": {"loguniform": [1e-4, 1e-2]}, ...}``); ConfigError
    naming the field for an empty space, an unknown distribution, a wrong number of bounds, an inverted bound, a
    non-positive loguniform bound, non-integer randint bounds or an empty list."""
    if not space:
        raise ConfigError("the search space is empty: give at least one field under `space:`, e.g. "
                          "optim.lr: {loguniform: [1.0e-4, 1.0e-2]}", field="space")
    dims = []
    for path, spec in space.items():
        where = f"space.{path}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(f"{where}: expected one distribution, e.g. {{loguniform: [1.0e-4, 1.0e-2]}}; "
                              f"distributions: {', '.join(KINDS)}; got {spec!r}", field=where)
        kind, raw = next(iter(spec.items()))
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{where}: {kind} takes a non-empty list, got {raw!r}", field=where)
        if kind in ("choice", "grid"):
            dims.append(Dimension(path, kind, tuple(raw)))
            continue
        if len(raw) != 2:
            raise ConfigError(f"{where}: {kind} takes [low, high], got {raw!r}", field=where)
        low, high = raw
        numeric = int if kind == "randint" else (int, float)
        if any(isinstance(v, bool) or not isinstance(v, numeric) for v in raw):
            raise ConfigError(f"{where}: {kind} bounds must be {'integers' if kind == 'randint' else 'numbers'}, "
                              f"got {raw!r}", field=where)
        if low >= high:
            raise ConfigError(f"{where}: {kind} bounds [{low}, {high}] are inverted or empty: the low end must be "
                              "below the high end", field=where)
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: loguniform bounds must be above 0, got {low}", field=where)
        dims.append(Dimension(path, kind, (low, high)))
    return dims


def check_space(dims: list[Dimension], recipe: dict[str, Any], model: type[BaseModel]) -> None:
    """Fail before any trial when a dimension names a field the recipe (of type ``model``, e.g. ``TrainConfig``,
    given as its dict) does not have or a trial may not change, or when one of its extreme values — alone, and in
    combination with the others' (up to 1,024 combinations) — does not make a valid recipe."""
    for dim in dims:
        _check_field(dim.path, model)
    for dim in dims:
        for value in dim.extremes():
            _validate(model, recipe, {dim.path: value}, f"space.{dim.path}: {value!r}")
    combos = 1
    for dim in dims:
        combos *= len(dim.extremes())
    if len(dims) > 1 and combos <= _MAX_COMBINATIONS:
        for values in itertools.product(*(dim.extremes() for dim in dims)):
            chosen = dict(zip((d.path for d in dims), values))
            _validate(model, recipe, chosen, "space: the combination " +
                      ", ".join(f"{k}={v!r}" for k, v in chosen.items()))


def sample_count(dims: list[Dimension], num_samples: int) -> int:
    """Trials a search runs: ``num_samples`` for every combination of the grid dimensions' values."""
    grid = 1
    for dim in dims:
        if dim.kind == "grid":
            grid *= len(dim.values)
    return grid * num_samples


def high_end(dims: list[Dimension], path: str, default: Any) -> Any:
    """The largest value ``path`` can take in the space (``default``: the recipe's, when it is not tuned)."""
    for dim in dims:
        if dim.path == path:
            return max(dim.values)
    return default


def apply(recipe: dict[str, Any], chosen: dict[str, Any]) -> dict[str, Any]:
    """A copy of the recipe dict with each dotted field in ``chosen`` set."""
    import copy

    out = copy.deepcopy(recipe)
    for path, value in chosen.items():
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _check_field(path: str, model: type[BaseModel]) -> None:
    where = f"space.{path}"
    cls: Any = model
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = getattr(cls, "model_fields", None)
        if fields is None or part not in fields:
            scope = ".".join(parts[:i]) or "the recipe"
            known = ", ".join(fields) if fields else "none"
            raise ConfigError(f"{where}: the training recipe has no field {path} ({scope}'s fields: {known})",
                              field=where)
        cls = fields[part].annotation
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        raise ConfigError(f"{where}: {path} is a section, not a field: name one of its fields "
                          f"({', '.join(f'{path}.{f}' for f in cls.model_fields)})", field=where)
    if not any(path == t or (t.endswith(".") and path.startswith(t)) for t in TUNABLE):
        raise ConfigError(f"{where}: {path} is the same for every trial and cannot be tuned (tunable: "
                          f"{', '.join(t + '*' if t.endswith('.') else t for t in TUNABLE)})", field=where)


def _validate(model: type[BaseModel], recipe: dict[str, Any], chosen: dict[str, Any], what: str) -> None:
    try:
        model.model_validate(apply(recipe, chosen))
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "the recipe"
        raise ConfigError(f"{what} does not make a valid training recipe: {loc}: {first['msg']}",
                          field="space") from exc
