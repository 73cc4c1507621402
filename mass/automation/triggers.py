"""The trigger engine: reads the event bus as the ``mass-triggers`` group, starts the job of every rule an event
matches through the Ray job API — once per (rule, event), however often the event is delivered or published —
and follows the jobs it started to their end. Each job's MLflow run carries tags naming the rule and event."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from mass.automation.launch import follow, launch
from mass.automation.rules import dedupe_key
from mass.automation.store import AutomationRun, AutomationStore

log = logging.getLogger(__name__)

GROUP = "mass-triggers"


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
        delivers the event again. The runs it recorded."""
        started = []
        for stored in self.store.rules():
            rule = stored.rule
            if event.time < stored.created_at or not rule.matches(event):
                continue
            key = dedupe_key(event)
            tags = {"mass.trigger.rule": rule.name, "mass.trigger.event": f"{event.type}@{event.offset}",
                    "mass.trigger.key": key}
            run = launch(self.store, self.client, kind="trigger", name=rule.name, key=key, action=rule.action,
                         config=rule.config, overrides=rule.overrides(event), job_id=f"mass-trigger-{rule.name}-"
                         f"{key[:12]}", tags=tags, event=event)
            if run is None:
                log.info("rule %s: %s at %s repeats an event already handled; nothing started", rule.name,
                         event.type, event.offset)
            else:
                started.append(run)
        return started

    def follow(self) -> int:
        """Record the state of the unfinished jobs rules started; the number that changed."""
        return follow(self.store, self.client, kind="trigger")


def run_engine(address: str, stop: threading.Event | None = None, once: bool = False, poll_s: float = 1.0,
               follow_s: float = 5.0, bus=None, engine: TriggerEngine | None = None) -> None:
    """Consume the bus (default: ``MASS_EVENTS_URL``'s) and start triggered jobs until ``stop`` is set (``once``:
    handle what is waiting, record the jobs' states, return). Delivery is at least once; the run table makes it
    exactly once per rule and event."""
    from mass.events import Consumer, open_bus

    engine = engine or TriggerEngine(address)
    own = bus is None
    bus = bus or open_bus()
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
        if own:
            bus.close()
