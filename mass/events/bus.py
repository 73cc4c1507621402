"""The event bus interface every backend implements, and what is shared: validation on publish, parsing and
dead-lettering on read, redelivery bounds, and a ``Consumer`` that handles, acknowledges and retries.

Delivery is at least once: a consumer acknowledges an event after handling it; one that dies (or fails) first
leaves it pending, and another consumer of its group claims it once it has been idle ``idle_s``. An event
that cannot be parsed, or was delivered ``max_deliveries`` times without an acknowledgement, goes to the
dead letters (with the reason) instead of blocking the group. Handlers must therefore be idempotent.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

from mass.errors import InvalidEvent
from mass.events.schemas import Event, Payload, make_event, parse_event

log = logging.getLogger(__name__)

#: where a new consumer group starts: the whole log, or only events published after it was created
STARTS = ("earliest", "latest")


@dataclass(frozen=True)
class Delivery:
    """An event handed to one consumer of a group; ``attempts`` counts its deliveries (1: the first)."""

    event: Event
    group: str
    consumer: str
    attempts: int


@dataclass(frozen=True)
class DeadLetter:
    """An event set aside: its offset, the group that could not use it, why, and its stored fields as read."""

    offset: str
    group: str
    reason: str
    fields: dict[str, str]
    time: datetime


class EventBus(ABC):
    """Publish typed events; consume them in groups (each group sees every event once, its consumers share
    them), acknowledge, claim what a dead consumer left, replay from an offset, read the dead letters.

    Args:
        max_deliveries: deliveries of one event to a group before it is dead-lettered.
    """

    def __init__(self, max_deliveries: int = 5) -> None:
        self.max_deliveries = max_deliveries

    # ---------------------------------------------------------------- the interface
    def publish(self, event_type: str, data: dict[str, Any] | Payload, source: str = "mass") -> Event:
        """Validate and append one event; returns it with its offset once it is stored (durably, as the
        backend allows). InvalidEvent (400) when ``data`` does not match the type's schema: nothing is
        written; EventBusError (503) when the backend cannot be reached."""
        event = make_event(event_type, data, source)
        return event.model_copy(update={"offset": self._append(event.to_fields())})

    def read(self, group: str, consumer: str, count: int = 16, block_s: float = 0.0,
             start: str = "earliest") -> list[Delivery]:
        """Up to ``count`` events ``group`` has not been given yet, delivered to ``consumer`` (waiting up to
        ``block_s`` for one). ``start`` applies when the group does not exist yet: ``earliest`` (the whole
        log) or ``latest``. Events that cannot be parsed are dead-lettered and skipped."""
        if start not in STARTS:
            raise InvalidEvent(f"start must be one of {', '.join(STARTS)}, got {start!r}", field="start")
        return self._parse(group, consumer, self._read_new(group, consumer, count, block_s, start))

    def claim(self, group: str, consumer: str, idle_s: float, count: int = 16) -> list[Delivery]:
        """Events of ``group`` delivered but not acknowledged for ``idle_s`` (their consumer died or failed),
        delivered again to ``consumer``; one already delivered ``max_deliveries`` times is dead-lettered
        instead."""
        stale, out = self._pending_idle(group, idle_s, count), []
        exhausted = [offset for offset, attempts in stale if attempts >= self.max_deliveries]
        for offset in exhausted:
            fields = self._fields(offset)
            self._dead_letter(group, offset, f"not acknowledged after {self.max_deliveries} deliveries", fields)
            log.warning("event %s dead-lettered for group %r: not acknowledged after %d deliveries", offset, group,
                        self.max_deliveries)
        retry = [offset for offset, attempts in stale if attempts < self.max_deliveries]
        if retry:
            out = self._parse(group, consumer, self._claim(group, consumer, retry, idle_s))
        return out

    @abstractmethod
    def ack(self, group: str, offset: str) -> None:
        """Acknowledge ``offset`` for ``group``: it will not be delivered to that group again."""

    def replay(self, after: str | None = None, count: int = 100) -> list[Event]:
        """Up to ``count`` events after offset ``after`` (None: from the start), in order, whatever any group
        has seen; events that cannot be parsed are skipped (they are dead-lettered when a group reads them)."""
        events = []
        for offset, fields in self._range(after, count):
            try:
                events.append(parse_event(fields, offset))
            except InvalidEvent as exc:
                log.warning("replay skips %s", exc)
        return events

    @abstractmethod
    def last_offset(self) -> str | None:
        """The offset of the newest event (None: the log is empty); ``replay(after=...)`` from it reads only what
        is published later."""

    @abstractmethod
    def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The most recent dead letters, oldest first."""

    @abstractmethod
    def close(self) -> None:
        """Release the backend's connections."""

    # ---------------------------------------------------------------- what a backend provides
    @abstractmethod
    def _append(self, fields: dict[str, str]) -> str:
        """Store one event; its offset."""

    @abstractmethod
    def _read_new(self, group: str, consumer: str, count: int, block_s: float,
                  start: str) -> list[tuple[str, dict[str, str], int]]:
        """(offset, fields, attempts) of new events for ``group``, now pending for ``consumer``."""

    @abstractmethod
    def _pending_idle(self, group: str, idle_s: float, count: int) -> list[tuple[str, int]]:
        """(offset, deliveries so far) of ``group``'s pending events idle for ``idle_s``."""

    @abstractmethod
    def _claim(self, group: str, consumer: str, offsets: list[str],
               idle_s: float) -> list[tuple[str, dict[str, str], int]]:
        """Move ``offsets`` (still idle for ``idle_s``: another consumer may have claimed them meanwhile) to
        ``consumer``, counting a delivery; (offset, fields, attempts) of those it got."""

    @abstractmethod
    def _fields(self, offset: str) -> dict[str, str]:
        """The stored fields of ``offset`` ({} when it is gone)."""

    @abstractmethod
    def _range(self, after: str | None, count: int) -> list[tuple[str, dict[str, str]]]:
        """(offset, fields) of up to ``count`` events after ``after``."""

    @abstractmethod
    def _dead_letter(self, group: str, offset: str, reason: str, fields: dict[str, str]) -> None:
        """Set ``offset`` aside for ``group`` with ``reason`` and acknowledge it (atomically where possible)."""

    # ---------------------------------------------------------------- shared
    def _parse(self, group: str, consumer: str, raw: list[tuple[str, dict[str, str], int]]) -> list[Delivery]:
        out = []
        for offset, fields, attempts in raw:
            try:
                out.append(Delivery(parse_event(fields, offset), group, consumer, attempts))
            except InvalidEvent as exc:
                log.warning("event %s dead-lettered for group %r: %s", offset, group, exc.message)
                self._dead_letter(group, offset, exc.message, fields)
        return out


class Consumer:
    """One consumer of a group: ``poll`` claims what stayed idle ``idle_s`` (a dead consumer's events, or ones
    a handler failed on), reads new events, calls ``handler`` on each and acknowledges it when the handler
    returns. A handler that raises leaves its event pending: it is delivered again after ``idle_s``, and
    dead-lettered after the bus's ``max_deliveries``.

    Args:
        bus: the event bus.
        group: the consumer group (every group sees every event once).
        name: this consumer's name within the group (unique per process).
        handler: called with each event; must be idempotent (delivery is at least once).
        idle_s: how long a delivery may stay unacknowledged before another consumer takes it over.
        start: where the group starts when it is new (``earliest`` or ``latest``).
    """

    def __init__(self, bus: EventBus, group: str, name: str, handler: Callable[[Event], Any], idle_s: float = 30.0,
                 start: str = "earliest") -> None:
        self.bus, self.group, self.name, self.handler = bus, group, name, handler
        self.idle_s, self.start = idle_s, start

    def poll(self, block_s: float = 0.0, count: int = 16) -> int:
        """Handle what is waiting (blocking up to ``block_s`` for new events); the number acknowledged."""
        done = 0
        deliveries = self.bus.claim(self.group, self.name, self.idle_s, count)
        deliveries += self.bus.read(self.group, self.name, count, 0.0 if deliveries else block_s, self.start)
        for delivery in deliveries:
            try:
                self.handler(delivery.event)
            except Exception as exc:  # noqa: BLE001 - left pending: redelivered, then dead-lettered
                log.warning("group %r: handling %s %s failed (delivery %d of %d): %s: %s", self.group,
                            delivery.event.type, delivery.event.offset, delivery.attempts, self.bus.max_deliveries,
                            type(exc).__name__, exc)
                continue
            self.bus.ack(self.group, delivery.event.offset)
            done += 1
        return done

    def run(self, stop: threading.Event, block_s: float = 0.5) -> None:
        """Poll until ``stop`` is set (a backend outage is logged and retried, not fatal)."""
        from mass.errors import EventBusError

        while not stop.is_set():
            try:
                self.poll(block_s)
            except EventBusError as exc:
                log.warning("group %r: event bus unavailable (%s); retrying in 1s", self.group, exc.message)
                stop.wait(1.0)
