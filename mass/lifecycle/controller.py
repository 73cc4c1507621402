"""The lifecycle controller of one Serve app: it serves each managed model's registered versions as their own
Serve apps, moves traffic to a version only once it is ready, drains and deletes versions that leave the split,
and publishes the routing table (version -> weight) that every gateway replica polls.

Events on the bus make it react within a second; a full read of the registry every ``reconcile_s`` makes it
correct whatever the bus lost, duplicated or reordered. Everything it knows is rebuilt from the registry and
Serve's status when it restarts, so it can be killed at any moment.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from mass.lifecycle.slo import Window, judge
from mass.serving.args import AppArgs, version_app, version_of_app

log = logging.getLogger(__name__)

NAMESPACE = "mass"
RECORDS_KEPT = 50


def controller_name(app: str) -> str:
    """The named actor that controls Serve app ``app``."""
    return f"mass-controller:{app}"


@dataclass
class ServedVersion:
    """One deployed version of a managed model, as the controller sees it."""

    version: int
    app: str
    deployment: str
    state: str  # deploying | ready | draining (out of the split, kept drain_s) | deleting | failed
    since: float
    message: str = ""
    generation: int = 0  # the model's lifecycle generation when the version failed (retried after it moves)


def _status(overview) -> str:
    value = getattr(overview, "status", overview)
    return str(getattr(value, "value", value))


class Controller:
    """The controller's state and reconcile step (``ControllerActor`` runs it on a thread of its own).

    Args:
        app: the Serve app whose managed models it serves.
        args: that app's ``AppArgs`` (as a dict).
    """

    def __init__(self, app: str, args: dict[str, Any]) -> None:
        self.app, self.args = app, AppArgs.model_validate(args)
        self.models = {m.name: m for m in self.args.managed}
        self.versions: dict[str, dict[int, ServedVersion]] = {m: {} for m in self.models}
        self.plans: dict[str, Any] = {}  # model -> mass.lifecycle.ServingPlan (the registry's desired state)
        self.traffic: dict[str, dict[int, int]] = {m: {} for m in self.models}  # what the gateways route
        self.offline: dict[str, dict[str, Any] | None] = {}  # model -> why/who/when it was taken offline
        self.revision = f"{uuid.uuid4().hex[:8]}:0"  # a restarted controller's revisions never repeat old ones
        self.started = False  # set after the first pass that read every model's desired state
        self.records: deque[dict[str, Any]] = deque(maxlen=RECORDS_KEPT)
        self.lock = threading.Lock()
        self.dirty: set[str] = set(self.models)
        self._next_full = 0.0
        self._seen_app, self._app_missing = False, 0
        self._lifecycle = None
        self._apps: dict[str, Any] = {}  # Serve's application statuses, as of this step
        self.windows: dict[tuple[str, int], Window] = {}  # (model, version) -> the gateways' request outcomes
        self._bake: dict[str, tuple[tuple[int, int], float]] = {}  # model -> ((canary, step), when its split began)
        self._errors: dict[str, str] = {}  # model -> the reconcile error last recorded (until a pass succeeds)

    # ------------------------------------------------------------------ what the gateways read
    def table(self, since: str = "", report: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Merge a gateway's ``report`` (model -> version -> outcomes since its last poll) into the SLO windows;
        then the routing table (None when its revision is still ``since``, or before the first full pass): per
        model, ``offline`` (why, who, when, or None) and ``versions`` [{version, app, deployment, weight}] of the
        versions that get traffic."""
        with self.lock:
            for model, versions in (report or {}).items():
                if model in self.models:
                    for version, outcomes in versions.items():
                        self._window(model, int(version)).add(outcomes)
            if not self.started or self.revision == since:
                return None  # (before its first full pass, a restarted controller knows nothing worth routing)
            models = {}
            for name, traffic in self.traffic.items():
                served = dict(self.versions[name])  # (the loop thread may forget a deleted version meanwhile)
                models[name] = {"offline": self.offline.get(name), "versions": [
                    {"version": v, "app": served[v].app, "deployment": served[v].deployment, "weight": w}
                    for v, w in sorted(traffic.items()) if v in served]}
            return {"revision": self.revision, "models": models}

    def status(self) -> dict[str, Any]:
        """Per model: the desired state, the traffic split, every deployed version's state, and what the
        controller did recently."""
        with self.lock:
            return {"app": self.app, "revision": self.revision, "models": {
                name: {"desired": self.plans[name].to_dict() if name in self.plans else None,
                       "traffic": {str(v): w for v, w in self.traffic[name].items()},
                       "versions": [{**asdict(s), "weight": self.traffic[name].get(v, 0),
                                     "replicas": self._replicas(s), "slo": self._slo(name, v)}
                                    for v, s in sorted(self.versions[name].items())]}
                for name in self.models}, "records": list(self.records)}

    def _slo(self, model: str, version: int) -> dict[str, Any]:
        """A version's figures over the SLO window, and ``requests_total`` since this controller started."""
        window = self._window(model, version)
        return {**window.figures().to_dict(), "requests_total": window.total}

    def _replicas(self, sv: ServedVersion) -> dict[str, int]:
        """Replica state -> count of a version's deployment, as Serve reported it this step."""
        overview = self._apps.get(sv.app)
        deployment = getattr(overview, "deployments", {}).get(sv.deployment) if overview is not None else None
        states = getattr(deployment, "replica_states", None) or {}
        return {str(getattr(k, "value", k)): int(v) for k, v in states.items()}

    def wake(self, model: str | None = None) -> None:
        """Reconcile ``model`` (every managed model when None) on the next step."""
        with self.lock:
            self.dirty |= set(self.models) if model is None else ({model} & set(self.models))

    # ------------------------------------------------------------------ the reconcile step
    def step(self) -> bool:
        """One pass: read Serve's status, re-read the desired state of the models that need it, deploy what is
        missing, route, drain. False once the controlled app is gone (the controller then removes its versions)."""
        from ray import serve

        from ray.serve.exceptions import RayServeException

        now = time.monotonic()
        if now >= self._next_full:
            self.wake()
            self._next_full = now + self.args.controller.reconcile_s
        try:
            apps = serve.status().applications
        except RayServeException:  # Serve was shut down: the app is gone with it
            apps = {}
        if self.app in apps:
            self._seen_app, self._app_missing = True, 0
        elif self._seen_app:
            self._app_missing += 1
            if self._app_missing >= 3:
                self._remove_all(apps)
                return False
        self._observe(apps)
        with self.lock:
            dirty, self.dirty = self.dirty, set()
        for model in sorted(dirty):
            try:
                self._reconcile(model)
                if self._errors.pop(model, None) is not None:
                    self._record(model, None, "recovered", "the desired state reads and reconciles again")
            except Exception as exc:  # noqa: BLE001 - the registry may be briefly unreachable: next pass retries
                message = f"cannot reconcile: {type(exc).__name__}: {exc}"
                if self._errors.get(model) != message:  # recorded once, not on every retry
                    self._errors[model] = message
                    self._record(model, None, "error", message)
                self.wake(model)
        for model in self.models:
            self._route(model)
            self._guard(model)
            self._drain(model)
        if not self.started and set(self.plans) == set(self.models):
            with self.lock:
                self.started = True
        return True

    def _observe(self, apps: dict[str, Any]) -> None:
        """Update each version's state from Serve's; adopt version apps deployed before a restart (not those
        being deleted); forget versions whose apps were deleted (by a drain, or by an operator)."""
        self._apps = apps
        for model, args in self.models.items():
            served = self.versions[model]
            for name, overview in apps.items():
                version = version_of_app(self.app, model, name)
                if version is not None and version not in served and _status(overview) != "DELETING":
                    served[version] = ServedVersion(version, name, self.args.deployment_of(args), "deploying",
                                                    time.time())
            for version, sv in list(served.items()):
                if sv.state == "failed":
                    continue  # remembered until the model's lifecycle moves on
                overview = apps.get(sv.app)
                status = _status(overview) if overview is not None else "GONE"
                if status in ("GONE", "DELETING"):
                    if sv.state == "deploying" and status == "GONE" and time.time() - sv.since < 10:
                        continue  # just submitted: Serve lists it shortly
                    del served[version]
                    plan = self.plans.get(model)
                    if plan is None or str(version) in plan.weights():  # wanted again (a rollback): deployed again
                        self.wake(model)                                 # in this very step
                    if sv.state not in ("draining", "deleting"):
                        self._record(model, version, "gone", f"Serve app {sv.app!r} was deleted")
                elif status == "RUNNING" and sv.state == "deploying":
                    self._set(model, sv, "ready", "")
                elif status in ("DEPLOY_FAILED", "UNHEALTHY") and sv.state == "deploying":
                    self._failed(model, sv, getattr(overview, "message", "") or status)

    def _reconcile(self, model: str) -> None:
        """Re-read ``model``'s desired state and deploy the versions it names that are not deployed."""
        plan = self.lifecycle.state(model)
        with self.lock:
            self.plans[model] = plan
        if plan.offline is not None:
            return
        served = self.versions[model]
        for version in sorted(int(v) for v in plan.weights()):
            sv = served.get(version)
            if sv is not None and sv.state == "failed":
                if self.lifecycle.generation(model) == sv.generation:
                    continue  # failed under this very state: an operator must act (rollback is automatic below)
                del served[version]
                sv = None
            if sv is None:
                self._deploy(model, version)
            elif sv.state == "draining":  # wanted again before it was deleted (a quick rollback)
                self._set(model, sv, "ready", "back in the desired state")

    def _deploy(self, model: str, version: int) -> None:
        from ray import serve

        from mass.serving.deployments import bind_model

        args = self.models[model]
        deploy = 1  # a fresh name while Serve still deletes the version's earlier app: no wait for that
        while version_app(self.app, model, version, deploy) in self._apps:
            deploy += 1
        app, deployment = version_app(self.app, model, version, deploy), self.args.deployment_of(args)
        sv = ServedVersion(version, app, deployment, "deploying", time.time())
        self.versions[model][version] = sv
        self._record(model, version, "deploy", f"deploying {model}/{version} as Serve app {app!r}")
        try:
            serve._run(bind_model(args.pinned(version), deployment), name=app, route_prefix=None, _blocking=False)
        except Exception as exc:  # noqa: BLE001 - e.g. a bad option Serve refuses: recorded, not fatal
            self._failed(model, sv, f"{type(exc).__name__}: {exc}")

    def _failed(self, model: str, sv: ServedVersion, message: str) -> None:
        """A version that cannot serve: recorded, its app deleted, and, when the registry wants it as a canary
        or as a new production version, the lifecycle rolled back (the previous version keeps the traffic)."""
        from ray import serve

        sv.generation = self.lifecycle.generation(model)
        self._set(model, sv, "failed", message[:2000])
        try:
            serve.delete(sv.app, _blocking=False)
        except Exception as exc:  # noqa: BLE001
            log.warning("cannot delete the failed version app %r: %s", sv.app, exc)
        plan = self.plans.get(model)
        if plan is None or sv.version not in (plan.canary, plan.production) or plan.offline is not None:
            return
        if plan.production == sv.version and not plan.history:
            return  # nothing to roll back to: the model stays unavailable until an operator publishes a version
        self._operate(model, "rollback", f"version {sv.version} failed to load: {message[:300]}")

    def _route(self, model: str) -> None:
        """The traffic split the gateways get: the desired one once every version in it is ready; until then the
        current split (old versions keep serving); with nothing routable, what is ready."""
        plan = self.plans.get(model)
        if plan is None:
            return
        ready = {v for v, sv in self.versions[model].items() if sv.state in ("ready", "draining")}
        want = {int(v): w for v, w in plan.weights().items()}
        current = self.traffic[model]
        if plan.offline is not None:
            traffic = {}
        elif want and set(want) <= ready:
            traffic = want
        elif current and set(current) <= ready:
            traffic = current
        elif any(v in ready for v in want):
            part = {v: w for v, w in want.items() if v in ready}
            traffic = {v: round(100 * w / sum(part.values())) for v, w in part.items()}
        else:  # e.g. restarted while a new production version loads: keep the newest earlier one that is up
            earlier = [v for v in (*reversed(plan.history), *sorted(ready, reverse=True)) if v in ready]
            traffic = {earlier[0]: 100} if earlier else {}
        if traffic != current or plan.offline != self.offline.get(model):
            with self.lock:
                self.traffic[model], self.offline[model] = traffic, plan.offline
                epoch, count = self.revision.split(":")
                self.revision = f"{epoch}:{int(count) + 1}"
            self._record(model, None, "traffic", "offline" if plan.offline is not None else
                         ", ".join(f"v{v}: {w}%" for v, w in sorted(traffic.items())) or "no version ready")

    def _guard(self, model: str) -> None:
        """While a canary gets its share: roll it back when it breaks an SLO bound against production over the
        current step; advance its rollout plan once the step has baked clean. The bake clock of a step starts
        when the gateways get its split (a restarted controller starts it again)."""
        plan, traffic = self.plans.get(model), self.traffic[model]
        if plan is None or plan.canary is None or plan.offline is not None or plan.canary not in traffic \
                or plan.production not in traffic:
            self._bake.pop(model, None)
            return
        step = (plan.canary, plan.step)
        if self._bake.get(model, (None,))[0] != step:
            self._bake[model] = (step, time.monotonic())
        since = self._bake[model][1]
        slo = self.args.controller.slo
        with self.lock:
            canary = self._window(model, plan.canary).figures(since)
            production = self._window(model, plan.production).figures(since)
        breach = judge(canary, production, slo) if slo.enabled else None
        if breach is not None:
            reason = f"canary v{plan.canary} broke its SLO: {breach}"
            self._operate(model, "rollback", reason)
            return
        want = {int(v): w for v, w in plan.weights().items()}
        if plan.plan and traffic == want and time.monotonic() - since >= plan.plan[plan.step].bake_s:
            step_info = plan.plan[plan.step]
            self._operate(model, "advance", f"step {plan.step + 1} of the plan ({step_info.weight} %) baked "
                                            f"{step_info.bake_s:g}s clean: canary {canary.to_dict()}, "
                                            f"production {production.to_dict()}")

    def _operate(self, model: str, action: str, reason: str) -> None:
        """A lifecycle operation by the controller (recorded with actor ``controller``); a failure (an operator
        changed the model meanwhile: Conflict) is logged and the next pass sees the new state."""
        try:
            getattr(self.lifecycle, action)(model, actor="controller", reason=reason)
            self._record(model, None, action, reason)
        except Exception as exc:  # noqa: BLE001
            log.warning("controller %s of %r failed: %s: %s", action, model, type(exc).__name__, exc)
        self._bake.pop(model, None)
        self.wake(model)

    def _window(self, model: str, version: int):
        key = (model, version)
        if key not in self.windows:
            self.windows[key] = Window(self.args.controller.slo.window_s)
        return self.windows[key]

    def _drain(self, model: str) -> None:
        """Versions neither routed nor wanted are drained for ``drain_s``, then their apps are deleted."""
        from ray import serve

        plan = self.plans.get(model)
        if plan is None:
            return
        wanted = set() if plan.offline is not None else {int(v) for v in plan.weights()}
        for version, sv in list(self.versions[model].items()):
            if version in self.traffic[model] or version in wanted or sv.state in ("deploying", "failed", "deleting"):
                continue
            if sv.state != "draining":
                self._set(model, sv, "draining",
                          f"out of the traffic split; deleted after {self.args.controller.drain_s:g}s")
            elif time.time() - sv.since >= self.args.controller.drain_s:
                serve.delete(sv.app, _blocking=False)  # _observe forgets it once Serve lists it as deleting
                self._set(model, sv, "deleting", f"Serve app {sv.app!r} is being deleted")

    def _remove_all(self, apps: dict[str, Any]) -> None:
        from ray import serve

        for model in self.models:
            for name in [n for n in apps if version_of_app(self.app, model, n) is not None]:
                try:
                    serve.delete(name, _blocking=False)
                except Exception as exc:  # noqa: BLE001 - Serve itself going away takes them along
                    log.warning("cannot delete version app %r: %s", name, exc)
        log.info("app %r is gone: its version apps are deleted and the controller stops", self.app)

    # ------------------------------------------------------------------ helpers
    @property
    def lifecycle(self):
        """The lifecycle operations on the configured registry."""
        if self._lifecycle is None:
            from mass.lifecycle.operations import Lifecycle

            self._lifecycle = Lifecycle()
        return self._lifecycle

    def _set(self, model: str, sv: ServedVersion, state: str, message: str) -> None:
        sv.state, sv.since, sv.message = state, time.time(), message
        self._record(model, sv.version, state, message)

    def _record(self, model: str, version: int | None, action: str, detail: str) -> None:
        """Log an action and keep it in ``records`` (shown by ``status``); errors log as warnings."""
        log.log(logging.WARNING if action == "error" else logging.INFO, "%s%s: %s %s", model,
                f"/{version}" if version is not None else "", action, detail)
        self.records.append({"at": time.time(), "model": model, "version": version, "action": action,
                             "detail": detail})


def _event_model(event) -> str | None:
    """The model an event is about (None for events that name none)."""
    return getattr(event.data, "model", None)


class ControllerActor:
    """The Ray actor (named ``controller_name(app)`` in namespace ``mass``, detached, restarted by Ray when it
    dies) that runs a ``Controller``: its loop and an event-bus consumer each on a thread of their own."""

    def __init__(self, app: str, args: dict[str, Any]) -> None:
        from mass.logs import setup_logging

        setup_logging()
        self.controller = Controller(app, args)
        self._stop, self._kick = threading.Event(), threading.Event()
        threading.Thread(target=self._loop, name="mass-controller", daemon=True).start()
        threading.Thread(target=self._consume, name="mass-controller-events", daemon=True).start()

    def table(self, since: str = "", report: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Merge a gateway's SLO ``report``; the routing table, or None when it is still at revision ``since``."""
        return self.controller.table(since, report)

    def status(self) -> dict[str, Any]:
        """The controller's view (``Controller.status``)."""
        return self.controller.status()

    def wake(self, model: str | None = None) -> None:
        """Reconcile ``model`` (or every managed model) now."""
        self.controller.wake(model)
        self._kick.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.controller.step():
                    self._stop.set()
                    import ray

                    ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                    return
            except Exception:  # noqa: BLE001 - e.g. Serve's controller restarting: the next pass retries
                log.exception("controller step failed")
            self._kick.wait(0.25)
            self._kick.clear()

    def _consume(self) -> None:
        from mass.events import open_bus
        from mass.events.bus import Consumer

        def handle(event) -> None:
            model = _event_model(event)
            if model in self.controller.models:
                self.controller.wake(model)
                self._kick.set()

        consumer = Consumer(open_bus(), f"controller-{self.controller.app}", "controller", handle, idle_s=10.0,
                            start="latest")
        consumer.run(self._stop, block_s=0.5)


def start_controller(app: str, args: AppArgs):
    """The controller actor of ``app`` (started when it does not exist yet; every gateway replica calls this)."""
    import ray

    from mass.serving.deployments import actor_options

    options = actor_options(0)
    cls = ray.remote(ControllerActor)
    return cls.options(name=controller_name(app), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                       max_restarts=-1, max_concurrency=8, num_cpus=0, runtime_env=options["runtime_env"]
                       ).remote(app, args.model_dump())
