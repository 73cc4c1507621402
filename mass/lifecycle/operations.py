"""Lifecycle operations over the registry. The desired serving state of a model lives only in MLflow: the
``production`` and ``canary`` aliases, and the model tags ``mass.canary`` (weight, rollout plan),
``mass.offline`` (why, who, when) and ``mass.production_history`` (earlier production versions, for
rollback). Each operation checks its preconditions, takes the model's generation in the platform database
(an operation that read an older one gets ``Conflict``), writes the registry, records who did what and why,
and announces it on the event bus.

MLflow has no multi-write transaction: each operation orders its writes so that every prefix is a state the
controller can serve (the new alias first, the leftovers last).
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from mass.errors import Conflict, InvalidRequest, RegistryError

PRODUCTION, CANARY = "production", "canary"
TAG_CANARY, TAG_OFFLINE, TAG_HISTORY = "mass.canary", "mass.offline", "mass.production_history"
HISTORY_KEPT = 50
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h)$")


@dataclass(frozen=True)
class Step:
    """One step of a rollout plan: the canary's traffic percent, and how long it must bake clean before the
    next step (the last step, 100 %, is the promotion)."""

    weight: int
    bake_s: float = 0.0


@dataclass(frozen=True)
class ServingPlan:
    """What the registry says should be served for one model."""

    model: str
    production: int | None
    canary: int | None = None
    canary_weight: int = 0
    plan: tuple[Step, ...] = ()
    step: int = 0
    canary_since: str | None = None
    offline: dict[str, Any] | None = None
    history: tuple[int, ...] = ()

    def weights(self) -> dict[str, int]:
        """Version -> percent of traffic ({} when nothing is served or the model is offline)."""
        if self.offline is not None or self.production is None:
            return {}
        if self.canary is None:
            return {str(self.production): 100}
        return {str(self.production): 100 - self.canary_weight, str(self.canary): self.canary_weight}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (with the traffic split)."""
        out = asdict(self)
        out["plan"], out["weights"] = [asdict(s) for s in self.plan], self.weights()
        return out


def parse_plan(text: str) -> tuple[Step, ...]:
    """``10:5m,50:5m,100`` -> steps (percent, bake time in s/m/h); weights rise to 100 at the last step."""
    steps = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        weight, _, bake = part.partition(":")
        if not weight.isdigit():
            raise InvalidRequest(f"rollout step {part!r}: the weight must be a whole percent", field="plan")
        seconds = 0.0
        if bake:
            match = _DURATION.match(bake.strip())
            if match is None:
                raise InvalidRequest(f"rollout step {part!r}: bake time must look like 30s, 5m or 1h", field="plan")
            seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]
        steps.append(Step(int(weight), seconds))
    weights = [s.weight for s in steps]
    if not steps or weights[-1] != 100 or any(not 1 <= w <= 100 for w in weights) or weights != sorted(set(weights)):
        raise InvalidRequest(f"rollout plan {text!r}: steps must rise from 1-99 % to a last step of 100 "
                             "(e.g. 10:5m,50:5m,100)", field="plan")
    return tuple(steps)


@contextmanager
def _parsing(model: str, tags: dict[str, str]):
    """Turn a lifecycle tag that does not parse (edited by hand, e.g. in the MLflow UI) into a RegistryError
    naming the model, the tags and the way out."""
    try:
        yield
    except (ValueError, TypeError, KeyError) as exc:
        shown = {k: tags[k][:200] for k in (TAG_CANARY, TAG_OFFLINE, TAG_HISTORY) if k in tags}
        raise RegistryError(f"model {model!r}: its lifecycle tags do not parse ({type(exc).__name__}: {exc}); "
                            f"they were {shown}. Restore the broken one (MASS writes them as JSON) or delete it in "
                            f"MLflow (UI, or MlflowClient().delete_registered_model_tag): without {TAG_CANARY} "
                            f"the canary ends, without {TAG_OFFLINE} the model is online, without {TAG_HISTORY} "
                            "a rollback has no earlier version") from None


class Lifecycle:
    """The lifecycle operations on a registry (default: the configured one) and platform database.

    Args:
        registry: a ``ModelRegistry``.
        db_url: the platform database (default ``MASS_DATABASE_URL``).
    """

    def __init__(self, registry=None, db_url: str | None = None) -> None:
        if registry is None:
            from mass.registry import ModelRegistry

            registry = ModelRegistry()
        self.registry, self.db_url = registry, db_url

    # ---------------------------------------------------------------- read
    def state(self, model: str) -> ServingPlan:
        """The model's desired serving state, read from the registry."""
        aliases, tags = self.registry.model_meta(model)
        with _parsing(model, tags):
            canary = json.loads(tags[TAG_CANARY]) if TAG_CANARY in tags and CANARY in aliases else None
            return ServingPlan(
                model=model, production=aliases.get(PRODUCTION),
                canary=aliases.get(CANARY) if canary else None, canary_weight=canary["weight"] if canary else 0,
                plan=tuple(Step(**s) for s in canary["plan"]) if canary else (),
                step=canary["step"] if canary else 0, canary_since=canary["since"] if canary else None,
                offline=json.loads(tags[TAG_OFFLINE]) if TAG_OFFLINE in tags else None,
                history=tuple(int(v) for v in json.loads(tags.get(TAG_HISTORY, "[]"))))

    def generation(self, model: str) -> int:
        """How many lifecycle operations the model has had (0: none); pass it as ``expect`` to make an operation
        fail with Conflict if anything changed since it was read."""
        from sqlalchemy import select

        from mass.access.db import transaction
        from mass.access.schema import lifecycle_models as models

        with transaction(self.db_url, "read the model's generation") as conn:
            return conn.execute(select(models.c.generation).where(models.c.model == model)).scalar() or 0

    def history(self, model: str, limit: int = 50) -> list[dict[str, Any]]:
        """The model's recorded operations, newest first."""
        from sqlalchemy import select

        from mass.access.db import transaction
        from mass.access.schema import lifecycle_operations as ops

        with transaction(self.db_url, "read the lifecycle log") as conn:
            rows = conn.execute(select(ops).where(ops.c.model == model).order_by(ops.c.id.desc()).limit(limit))
            return [{**r._asdict(), "detail": json.loads(r.detail), "at": r.at.isoformat()} for r in rows]

    def show(self, model: str) -> dict[str, Any]:
        """Versions, aliases, the desired state with its traffic split, and the operation log."""
        info = self.registry.get_model(model)
        return {**self.state(model).to_dict(), "aliases": info.aliases, "generation": self.generation(model),
                "versions": [{"version": v.version, "status": v.status, "aliases": list(v.aliases),
                              "method": v.lineage.get("method"), "lineage": v.lineage, "metrics": v.metrics,
                              "size_bytes": v.size_bytes} for v in info.versions],
                "operations": self.history(model)}

    # ---------------------------------------------------------------- operations
    def publish(self, model: str, version: int, actor: str, reason: str = "", expect: int | None = None
                ) -> ServingPlan:
        """Make ``version`` the production version (the previous one is kept for ``rollback``); an active
        canary of another version is ended."""
        def apply(before: ServingPlan) -> dict[str, Any]:
            self._ready(model, version)
            if before.production == version:
                raise InvalidRequest(f"{model}/{version} is already production", field="version")
            self._set_production(model, version, before)
            return {"previous": before.production}

        return self._operate(model, "publish", version, actor, reason, apply, expect=expect)

    def canary(self, model: str, version: int, actor: str, weight: int | None = None,
               plan: tuple[Step, ...] | str | None = None, reason: str = "", expect: int | None = None
               ) -> ServingPlan:
        """Send ``weight`` % of the model's traffic to ``version`` (1-99), or start a rollout ``plan`` at its
        first step; production keeps the rest."""
        if isinstance(plan, str):
            plan = parse_plan(plan)
        if (weight is None) == (plan is None):
            raise InvalidRequest("give a canary either a weight (1-99) or a rollout plan", field="weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 99):
            raise InvalidRequest(f"canary weight must be a whole percent from 1 to 99, got {weight!r}", field="weight")
        steps = plan or ()
        first = steps[0].weight if steps else weight

        def apply(before: ServingPlan) -> dict[str, Any]:
            self._ready(model, version)
            if before.production is None:
                raise InvalidRequest(f"{model} has no production version to compare a canary with; "
                                     f"`publish` one first", field="version")
            if before.production == version:
                raise InvalidRequest(f"{model}/{version} is production already: canary another version",
                                     field="version")
            if first == 100:
                raise InvalidRequest("a plan's first step must send less than 100 %", field="plan")
            self.registry.set_alias(model, CANARY, version)
            since = datetime.now(timezone.utc).isoformat()
            self.registry.set_model_tags(model, {TAG_CANARY: json.dumps(
                {"weight": first, "plan": [asdict(s) for s in steps], "step": 0, "since": since})})
            return {"weight": first, "plan": [asdict(s) for s in steps], "production": before.production}

        return self._operate(model, "canary", version, actor, reason, apply, expect=expect)

    def promote(self, model: str, actor: str, reason: str = "", expect: int | None = None) -> ServingPlan:
        """Make the canary version production (the old production is kept for ``rollback``)."""
        def apply(before: ServingPlan) -> dict[str, Any]:
            if before.canary is None:
                raise InvalidRequest(f"{model} has no canary to promote", field="model")
            self._set_production(model, before.canary, before)
            return {"previous": before.production}

        return self._operate(model, "promote", None, actor, reason, apply, version_of=lambda b: b.canary, expect=expect)

    def advance(self, model: str, actor: str, reason: str = "", expect: int | None = None) -> ServingPlan:
        """Move the canary's rollout plan to its next step; the last step (100 %) promotes the canary."""
        state = self.state(model)
        if state.canary is None or not state.plan:
            raise InvalidRequest(f"{model} has no rollout plan to advance", field="model")
        nxt = state.step + 1
        if nxt >= len(state.plan) - 1:
            return self.promote(model, actor, reason or "the rollout plan's last step", expect=expect)

        def apply(before: ServingPlan) -> dict[str, Any]:
            if before.canary != state.canary or before.step != state.step:
                raise self._conflict(model, "this advance read it")
            weight = before.plan[nxt].weight
            self.registry.set_model_tags(model, {TAG_CANARY: json.dumps(
                {"weight": weight, "plan": [asdict(s) for s in before.plan], "step": nxt,
                 "since": datetime.now(timezone.utc).isoformat()})})
            return {"step": nxt, "weight": weight, "bake_s": before.plan[nxt].bake_s}

        return self._operate(model, "advance", state.canary, actor, reason, apply, expect=expect)

    def rollback(self, model: str, actor: str, reason: str = "", expect: int | None = None) -> ServingPlan:
        """End the canary when one runs (production stays); otherwise make the previous production version
        production again."""
        def apply(before: ServingPlan) -> dict[str, Any]:
            if before.canary is not None:
                self._end_canary(model)
                return {"ended_canary": before.canary, "production": before.production}
            if not before.history:
                raise InvalidRequest(f"{model} has no earlier production version to roll back to", field="model")
            target = before.history[-1]
            self._ready(model, target)
            self.registry.set_alias(model, PRODUCTION, target)
            self.registry.set_model_tags(model, {TAG_HISTORY: json.dumps(list(before.history[:-1]))})
            return {"from": before.production, "to": target}

        return self._operate(model, "rollback", None, actor, reason, apply, expect=expect,
                             version_of=lambda b: b.canary or (b.history[-1] if b.history else None))

    def offline(self, model: str, actor: str, reason: str = "", expect: int | None = None) -> ServingPlan:
        """Take the model offline: its requests get 404 naming it as offline, and it leaves ``/v1/models``."""
        def apply(before: ServingPlan) -> dict[str, Any]:
            if before.offline is not None:
                raise InvalidRequest(f"{model} is already offline (since {before.offline['at']})", field="model")
            self.registry.set_model_tags(model, {TAG_OFFLINE: json.dumps(
                {"reason": reason, "actor": actor, "at": datetime.now(timezone.utc).isoformat()})})
            return {}

        return self._operate(model, "offline", None, actor, reason, apply, expect=expect)

    def online(self, model: str, actor: str, reason: str = "", expect: int | None = None) -> ServingPlan:
        """Serve an offline model again."""
        def apply(before: ServingPlan) -> dict[str, Any]:
            if before.offline is None:
                raise InvalidRequest(f"{model} is not offline", field="model")
            self.registry.set_model_tags(model, {TAG_OFFLINE: None})
            return {}

        return self._operate(model, "online", None, actor, reason, apply, expect=expect)

    # ---------------------------------------------------------------- internals
    def _ready(self, model: str, version: int) -> None:
        from mass.refs import ModelRef

        info = self.registry.resolve(ModelRef(model, version=int(version)))
        if info.status != "READY":
            raise InvalidRequest(f"{info.ref} is {info.status}, not READY: it cannot be served", field="version")

    def _set_production(self, model: str, version: int, before: ServingPlan) -> None:
        self.registry.set_alias(model, PRODUCTION, version)  # first: every later prefix serves the new version
        history = [*before.history, before.production] if before.production is not None else list(before.history)
        self.registry.set_model_tags(model, {TAG_HISTORY: json.dumps(history[-HISTORY_KEPT:])})
        if before.canary is not None:
            self._end_canary(model)

    def _end_canary(self, model: str) -> None:
        self.registry.set_model_tags(model, {TAG_CANARY: None})  # first: without the tag the alias is inert
        self.registry.remove_alias(model, CANARY)

    def _operate(self, model: str, action: str, version: int | None, actor: str, reason: str,
                 apply: Callable[[ServingPlan], dict[str, Any]], expect: int | None = None,
                 version_of: Callable[[ServingPlan], int | None] | None = None) -> ServingPlan:
        """Run one operation: read the state and the model's generation, apply it under that generation
        (Conflict when another operation moved it, or when it is not ``expect``: the generation the caller
        saw), record it and announce it."""
        from sqlalchemy import insert, update
        from sqlalchemy.exc import IntegrityError

        from mass.access.db import DatabaseError, transaction
        from mass.access.schema import lifecycle_models as models
        from mass.access.schema import lifecycle_operations as ops

        if not actor:
            raise InvalidRequest("a lifecycle operation needs an actor (who does it)", field="actor")
        # the generation first: an operation that commits after this read makes ours a Conflict, and one that
        # committed before it is already in the state read next
        generation = self.generation(model)
        before = self.state(model)  # ModelNotFound naming the models
        if expect is not None and expect != generation:
            raise self._conflict(model, f"generation {expect} (it is at {generation} now)")
        generation = generation or None
        acted_on = version if version is not None else (version_of(before) if version_of else None)
        try:
            with transaction(self.db_url, f"record {action} of {model}") as conn:
                if generation is None:
                    conn.execute(insert(models).values(model=model, generation=1))
                else:
                    moved = conn.execute(update(models).where(models.c.model == model,
                                                              models.c.generation == generation)
                                         .values(generation=generation + 1)).rowcount
                    if not moved:
                        raise self._conflict(model, f"this {action} read it")
                detail = apply(before)
                conn.execute(insert(ops).values(at=datetime.now(timezone.utc), model=model, action=action,
                                                version=None if acted_on is None else str(acted_on),
                                                detail=json.dumps(detail), actor=actor[:128], reason=reason))
        except DatabaseError as exc:
            if isinstance(exc.__cause__, IntegrityError):  # two first operations on one model at once
                raise self._conflict(model, f"this {action} read it") from None
            raise
        after = self.state(model)
        self._announce(action, model, before, after, acted_on, reason)
        return after

    def _conflict(self, model: str, since: str) -> Conflict:
        last = self.history(model, limit=1)
        by = f" (last: {last[0]['action']} by {last[0]['actor']} at {last[0]['at'][:19]})" if last else ""
        return Conflict(f"{model} was changed by another operation since {since}{by}; check "
                        f"`mass models status {model}` and retry", model=model)

    def _announce(self, action: str, model: str, before: ServingPlan, after: ServingPlan, version: int | None,
                  reason: str) -> None:
        """The operation's events (alias changes were announced by the registry itself)."""
        announce = self.registry.announce
        if action == "canary":
            announce("rollout.started", {"model": model, "version": str(version),
                                         "plan": [asdict(s) for s in after.plan]}, source="lifecycle")
        elif action in ("promote", "publish") and before.canary is not None:
            announce("rollout.promoted", {"model": model, "version": str(after.production)}, source="lifecycle")
        elif action == "rollback" and before.canary is not None:
            announce("rollout.rolled_back", {"model": model, "version": str(before.canary),
                                             "reason": reason or "rolled back by an operator"}, source="lifecycle")
        elif action == "offline":
            announce("model.offline", {"model": model, "reason": reason}, source="lifecycle")
        elif action == "online":
            announce("model.online", {"model": model}, source="lifecycle")
        if before.weights() != after.weights():
            announce("model.traffic.changed", {"model": model, "weights": after.weights()}, source="lifecycle")

