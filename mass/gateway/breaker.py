"""One circuit breaker per served model: closed -> open when the failure ratio over a sliding window (with a
minimum request count) reaches the limit; open -> half-open after ``open_s``, letting a few probe requests
through; half-open -> closed when they all succeed, or open again on any failure. Transitions are logged and
kept for ``/admin/services``. This one lives in one gateway replica; ``shared_breaker`` shares it through Redis."""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True)
class Transition:
    """A state change, for people reading ``/admin/services``."""

    at: float  # wall clock
    model: str
    old: str
    new: str
    why: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"at": round(self.at, 3), "from": self.old, "to": self.new, "why": self.why}


class CircuitBreaker:
    """The breaker of one model.

    Args:
        model: the served model's name.
        failure_ratio: open at this share of failures in the window...
        min_requests: ...once the window holds at least this many outcomes.
        window_s: how far back outcomes count.
        open_s: how long it stays open before probing.
        half_open_probes: trial requests let through while half-open; all must succeed to close.
        clock: monotonic seconds (tests drive it).
    """

    def __init__(self, model: str, failure_ratio: float = 0.5, min_requests: int = 10, window_s: float = 30.0,
                 open_s: float = 10.0, half_open_probes: int = 2, clock: Callable[[], float] = time.monotonic):
        self.model, self.failure_ratio, self.min_requests = model, failure_ratio, min_requests
        self.window_s, self.open_s, self.half_open_probes, self.clock = window_s, open_s, half_open_probes, clock
        self.state = CLOSED
        self._outcomes: collections.deque[tuple[float, bool]] = collections.deque()  # (time, failed)
        self._failures = 0
        self._opened_at = 0.0
        self._probes_out = 0
        self._probes_ok = 0
        self.transitions: collections.deque[Transition] = collections.deque(maxlen=20)

    def _move(self, new: str, why: str) -> None:
        self.transitions.append(Transition(time.time(), self.model, self.state, new, why))
        log.warning("circuit breaker of model %r: %s -> %s (%s)", self.model, self.state, new, why)
        self.state = new

    def _trim(self, now: float) -> None:
        while self._outcomes and self._outcomes[0][0] <= now - self.window_s:
            _, failed = self._outcomes.popleft()
            self._failures -= failed

    def retry_after_s(self) -> float:
        """Seconds until an open breaker lets probes through (0 when not open)."""
        return max(0.0, self._opened_at + self.open_s - self.clock()) if self.state == OPEN else 0.0

    def allow(self) -> bool:
        """May a request go to the model now? (A half-open breaker admits its probes only.)"""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if self.clock() < self._opened_at + self.open_s:
                return False
            self._move(HALF_OPEN, f"{self.open_s:g}s open: probing with {self.half_open_probes} requests")
            self._probes_out = self._probes_ok = 0
        if self._probes_out < self.half_open_probes:
            self._probes_out += 1
            return True
        return False

    async def admit(self) -> bool:
        """``allow`` for the gateway's async path (the shared breaker may need a round trip to Redis here)."""
        return self.allow()

    def record(self, failed: bool) -> None:
        """The outcome of a request that ``allow`` let through."""
        now = self.clock()
        if self.state == HALF_OPEN:
            if failed:
                self._open(now, "a probe request failed")
                return
            self._probes_ok += 1
            if self._probes_ok >= self.half_open_probes:
                self._outcomes.clear()
                self._failures = 0
                self._move(CLOSED, f"{self._probes_ok} probe requests succeeded")
            return
        self._outcomes.append((now, failed))
        self._failures += failed
        self._trim(now)
        if (self.state == CLOSED and len(self._outcomes) >= self.min_requests
                and self._failures / len(self._outcomes) >= self.failure_ratio):
            self._open(now, f"{self._failures} of the last {len(self._outcomes)} requests failed "
                            f"(limit {self.failure_ratio:.0%} of at least {self.min_requests} in {self.window_s:g}s)")

    def _open(self, now: float, why: str) -> None:
        self._opened_at = now
        self._move(OPEN, why)

    def status(self) -> dict[str, Any]:
        """State, window counts and recent transitions."""
        self._trim(self.clock())
        return {"state": self.state, "window_requests": len(self._outcomes), "window_failures": self._failures,
                "retry_after_s": round(self.retry_after_s(), 3),
                "transitions": [t.to_dict() for t in self.transitions]}
