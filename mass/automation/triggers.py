"""The trigger engine: reads the event bus as the ``mass-triggers`` group, starts the job of every rule an event
matches through the Ray job API — once per (rule, event), however often the event is delivered or published —
and follows the jobs it started to their end. Each job's MLflow run carries tags naming the rule and event."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from mass.automation.rules import ACTIONS, dedupe_key
from mass.automation.store import AutomationRun, AutomationStore
from mass.errors import ConfigError, MassError

log = logging.getLogger(__name__)

GROUP = "mass-triggers"
#: JSON object of MLflow tags a job's runs carry (set by the engine on the jobs it submits)
RUN_TAGS_ENV = "MASS_RUN_TAGS"
_RAY_STATUS = {"PENDING": "submitted", "RUNNING": "running", "SUCCEEDED": "succeeded", "FAILED": "failed",
               "STOPPED": "stopped"}


def run_tags() -> dict[str, str]:
    """The tags ``MASS_RUN_TAGS`` asks this job's MLflow runs to carry ({} when unset or not a JSON object)."""
    try:
        tags = json.loads(os.environ.get(RUN_TAGS_ENV) or "{}")
    except json.JSONDecodeError:
        log.warning("%s is not JSON; ignored", RUN_TAGS_ENV)
        return {}
    return {str(k): str(v) for k, v in tags.items()} if isinstance(tags, dict) else {}


class TriggerEngine:
    """Matches events against the stored rules and submits their jobs to the Ray job server at ``address``.

    Args:
        address: the Ray dashboard / job server (``http://HOST:8265``).
        store: where rules and runs live (default: the platform database).
    """

    def __init__(self, address: str, store: AutomationStore | None = None) -> None:
        self.address = address
        self.store = store or AutomationStore()
        self._client = None

    @property
    def client(self):
        """The Ray JobSubmissionClient (connected on first use)."""
        if self._client is None:
            from mass.cli.submit import job_client

            self._client = job_client(self.address)[0]
        return self._client

    def handle(self, event) -> list[AutomationRun]:
        """Start the job of every enabled rule ``event`` matches (rules added after the event was published are
        not asked). A duplicate of an event already handled starts nothing. A rule whose recipe is gone is
        recorded as a failed run (the rule is kept). A submission the job server refuses raises, so the bus
        delivers the event again; the runs it started."""
        from mass.cli.submit import project_root, submit_job

        started = []
        for stored in self.store.rules():
            rule = stored.rule
            if event.time < stored.created_at or not rule.matches(event):
                continue
            key = dedupe_key(event)
            job_id = f"mass-trigger-{rule.name}-{key[:12]}"
            run = self.store.claim("trigger", rule.name, key, rule.action, event)
            if run is None:
                log.info("rule %s: %s at %s repeats an event already handled; nothing started", rule.name,
                         event.type, event.offset)
                continue
            try:
                rule.check_config(project_root())
            except ConfigError as exc:
                self.store.update(run.id, status="failed", detail=exc.message)
                log.warning("rule %s: %s", rule.name, exc.message)
                continue
            overrides = rule.overrides(event)
            tags = {"mass.trigger.rule": rule.name, "mass.trigger.event": f"{event.type}@{event.offset}",
                    "mass.trigger.key": key}
            try:
                submit_job(self.client, ACTIONS[rule.action], rule.config, overrides, submission_id=job_id,
                           env={RUN_TAGS_ENV: json.dumps(tags)}, metadata={k: v[:64] for k, v in tags.items()})
            except Exception as exc:  # noqa: BLE001 - anything the job server says
                if "already exists" not in str(exc):  # (Ray: a submission id is taken once)
                    self.store.forget(run.id)
                    raise MassError(f"rule {rule.name}: the Ray job server refused job {job_id}: "
                                    f"{str(exc).splitlines()[0]}; the event will be delivered again") from exc
            detail = f"{rule.action} {rule.config}" + "".join(f" --set {o}" for o in overrides)
            self.store.update(run.id, status="submitted", job_id=job_id, detail=detail)
            log.info("rule %s: %s at %s started job %s (%s)", rule.name, event.type, event.offset, job_id, detail)
            started.append(self.store.runs(rule.name, limit=1)[0])
        return started

    def follow(self) -> int:
        """Record the state of every unfinished job this engine started (running, succeeded, failed with Ray's
        message); the number that changed."""
        changed = 0
        for run in self.store.runs(kind="trigger", unfinished=True, limit=1000):
            if run.status == "submitting" or not run.job_id:
                continue
            try:
                info = self.client.get_job_info(run.job_id)
            except Exception as exc:  # noqa: BLE001 - a job the server no longer knows
                log.warning("job %s of rule %s: %s", run.job_id, run.name, str(exc).splitlines()[0])
                continue
            status = _RAY_STATUS.get(str(info.status).split(".")[-1], run.status)
            if status != run.status:
                detail = run.detail if status != "failed" else f"{run.detail}: {(info.message or '').strip()}"
                self.store.update(run.id, status=status, detail=detail)
                changed += 1
        return changed


def run_engine(address: str, stop: threading.Event | None = None, once: bool = False, poll_s: float = 1.0,
               follow_s: float = 5.0, events_url: str | None = None) -> None:
    """Consume the bus and start triggered jobs until ``stop`` is set (``once``: handle what is waiting, record
    the jobs' states, return). Delivery is at least once; the run table makes it exactly once per rule and
    event."""
    from mass.events import Consumer, open_bus

    engine = TriggerEngine(address)
    bus = open_bus(events_url)
    consumer = Consumer(bus, GROUP, f"{socket.gethostname()}-{os.getpid()}", engine.handle, idle_s=30.0)
    stop = stop or threading.Event()
    last_follow = 0.0
    try:
        while not stop.is_set():
            handled = consumer.poll(block_s=0.0 if once else poll_s)
            if once or time.monotonic() - last_follow >= follow_s:
                engine.follow()
                last_follow = time.monotonic()
            if once and not handled:
                return
    finally:
        bus.close()
