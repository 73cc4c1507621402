"""The automation service: one named, detached Ray actor (``mass-automation`` in namespace ``mass``, on the head
node) that ticks the schedules and runs the trigger engine. Ray restarts it when it dies; everything it knows is
in the platform database, so a restart loses no schedule and repeats no run."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger(__name__)

NAME, NAMESPACE = "mass-automation", "mass"


class AutomationService:
    """The actor's body: a loop thread that every ``tick_s`` ticks the schedules, hands waiting events to the
    trigger engine and records the state of the jobs both started.

    Args:
        job_address: the Ray job server jobs are submitted to (``http://HOST:8265``).
        tick_s: seconds between ticks.
    """

    def __init__(self, job_address: str, tick_s: float = 15.0) -> None:
        from mass.automation.schedules import Scheduler
        from mass.automation.triggers import TriggerEngine
        from mass.logs import setup_logging
        from mass.settings import get_settings

        setup_logging(get_settings().log_level)
        self.job_address, self.tick_s = job_address, tick_s
        self.engine = TriggerEngine(job_address)
        self.scheduler = Scheduler(self.engine.client)
        self.started_at = datetime.now(timezone.utc)
        self.ticks, self.last_tick, self.last_error = 0, None, None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one tick at a time (the loop, or a tick() call)
        threading.Thread(target=self._loop, name="mass-automation", daemon=True).start()

    def _loop(self) -> None:
        from mass.automation.triggers import GROUP
        from mass.events import Consumer, open_bus

        bus = open_bus()
        consumer = Consumer(bus, GROUP, f"{socket.gethostname()}-{os.getpid()}", self.engine.handle, idle_s=30.0)
        while not self._stop.is_set():
            try:
                with self._lock:
                    self.scheduler.tick()
                    while consumer.poll(block_s=0.0):
                        pass
                    self.engine.follow()
                    self.ticks, self.last_tick, self.last_error = self.ticks + 1, datetime.now(timezone.utc), None
            except Exception as exc:  # noqa: BLE001 - logged and retried at the next tick
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("automation tick failed: %s", self.last_error)
            self._stop.wait(self.tick_s)
        bus.close()

    def tick(self, now: str | None = None) -> list[dict[str, Any]]:
        """Tick the schedules at ``now`` (ISO time; default: the clock) and return the runs recorded. Operators
        and tests use it to act on a slot without waiting for it."""
        when = datetime.fromisoformat(now) if now else None
        with self._lock:
            return [r.to_dict() for r in self.scheduler.tick(when)]

    def status(self) -> dict[str, Any]:
        """Where the service runs and how its ticks go."""
        return {"pid": os.getpid(), "node": socket.gethostname(), "job_address": self.job_address,
                "tick_s": self.tick_s, "started_at": self.started_at.isoformat(), "ticks": self.ticks,
                "last_tick": self.last_tick.isoformat() if self.last_tick else None, "last_error": self.last_error}


def _actor_class():
    import ray

    return ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(AutomationService)


def _join(address: str | None) -> None:
    """Join a running cluster (never a local Ray of this process's own: the service must outlive it)."""
    from mass.cluster import connect_ray
    from mass.errors import MassError
    from mass.settings import get_settings

    settings = get_settings()
    try:
        connect_ray(address or settings.ray_address or "auto", settings)
    except (ConnectionError, RuntimeError) as exc:
        raise MassError(f"no Ray cluster to run the automation service on ({str(exc).splitlines()[0]}); start "
                        "one with `ray start --head --port=6380` or pass --address", field="address") from None


def start_service(job_address: str, address: str | None = None, tick_s: float = 15.0) -> dict[str, Any]:
    """Start the service on the cluster at ``address`` (default ``RAY_ADDRESS`` or a local Ray) unless it runs
    already; its status."""
    import ray

    from mass.settings import get_settings, settings_env

    _join(address)
    env = {k: v for k, v in settings_env(get_settings()).items() if v}
    handle = _actor_class().options(
        name=NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        resources={"node:__internal_head__": 0.001},  # the head node: it holds the project jobs are built from
        runtime_env={"env_vars": env}).remote(job_address, tick_s)
    return ray.get(handle.status.remote(), timeout=120)


def service(address: str | None = None):
    """The running service's actor handle; None when it is not running."""
    import ray

    _join(address)
    try:
        return ray.get_actor(NAME, namespace=NAMESPACE)
    except ValueError:
        return None


def stop_service(address: str | None = None) -> bool:
    """Stop the service for good (no restart); whether one was running."""
    import ray

    handle = service(address)
    if handle is None:
        return False
    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and service(address) is not None:
        time.sleep(0.5)
    return True
