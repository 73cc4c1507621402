"""``RedisBus``: the production event bus on Redis Streams — one stream for the log (``XADD``), consumer groups
(``XREADGROUP``/``XACK``), the pending entries list for redelivery (``XPENDING``/``XCLAIM``), and a second
stream for dead letters. An event is as durable as the server's persistence: with ``appendonly yes`` and
``appendfsync always`` a published event survives a Redis restart (a warning says so when it is off)."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

from mass.errors import EventBusError
from mass.events.bus import DeadLetter, EventBus

log = logging.getLogger(__name__)


class RedisBus(EventBus):
    """The event log in the stream ``<prefix>:log`` of the Redis at ``url`` (dead letters in ``<prefix>:dead``).

    Args:
        url: ``redis://host:port/db``.
        prefix: key prefix (tests use their own).
        timeout_s: a call slower than this is an outage (EventBusError); a blocking read waits at most half.
    """

    def __init__(self, url: str, prefix: str = "mass:events", max_deliveries: int = 5,
                 timeout_s: float = 5.0) -> None:
        import redis

        super().__init__(max_deliveries)
        self.url, self.prefix, self.timeout_s = url, prefix, timeout_s
        self.log_key, self.dead_key = f"{prefix}:log", f"{prefix}:dead"
        self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                           socket_connect_timeout=timeout_s)
        self._groups: set[str] = set()
        self._warn_if_not_durable()

    def __repr__(self) -> str:
        from mass.access.db import redact

        return f"RedisBus({redact(self.url)!r}, prefix={self.prefix!r})"

    def _call(self, what: str, fn, *args, **kwargs):
        """Run one Redis command; EventBusError naming the server when it fails."""
        import redis

        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise EventBusError(f"event bus at {self!r}: {what} failed: {exc}") from exc

    def _warn_if_not_durable(self) -> None:
        import redis

        try:
            aof = self._redis.config_get("appendonly").get("appendonly")
        except redis.RedisError:  # CONFIG is often disabled on managed Redis: nothing to say then
            return
        if aof != "yes":
            log.warning("the event bus's Redis runs without appendonly: published events are lost if it restarts; "
                        "set appendonly yes (appendfsync always: none lost, everysec: up to 1 s)")

    def _group(self, group: str, start: str) -> None:
        import redis

        if group in self._groups:
            return
        try:
            self._redis.xgroup_create(self.log_key, group, id="0" if start == "earliest" else "$", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise EventBusError(f"event bus at {self!r}: cannot create group {group!r}: {exc}") from exc
        except redis.RedisError as exc:
            raise EventBusError(f"event bus at {self!r}: cannot create group {group!r}: {exc}") from exc
        self._groups.add(group)

    def _append(self, fields: dict[str, str]) -> str:
        return self._call("publish", self._redis.xadd, self.log_key, fields)

    def _read_new(self, group, consumer, count, block_s, start):
        self._group(group, start)
        # BLOCK 0 would wait forever; a block past the socket timeout would read as an outage
        block = int(min(block_s, self.timeout_s / 2) * 1000) if block_s > 0 else None
        reply = self._call("read", self._redis.xreadgroup, group, consumer, {self.log_key: ">"}, count=count,
                           block=block)
        return [(offset, fields, 1) for _, entries in (reply or []) for offset, fields in entries]

    def ack(self, group: str, offset: str) -> None:
        """Acknowledge ``offset`` for ``group``."""
        self._call("ack", self._redis.xack, self.log_key, group, offset)

    def _pending_idle(self, group, idle_s, count):
        self._group(group, "earliest")
        rows = self._call("pending", self._redis.xpending_range, self.log_key, group, min="-", max="+", count=count,
                          idle=int(idle_s * 1000))
        return [(r["message_id"], r["times_delivered"]) for r in rows]

    def _claim(self, group, consumer, offsets, idle_s):
        entries = self._call("claim", self._redis.xclaim, self.log_key, group, consumer, int(idle_s * 1000), offsets)
        got = [(offset, fields) for offset, fields in entries if fields]
        if not got:
            return []
        counts = {r["message_id"]: r["times_delivered"] for r in self._call(
            "pending", self._redis.xpending_range, self.log_key, group, min=got[0][0], max=got[-1][0],
            count=len(offsets), consumername=consumer)}
        return [(offset, fields, counts.get(offset, 1)) for offset, fields in got]

    def _fields(self, offset):
        rows = self._call("read", self._redis.xrange, self.log_key, min=offset, max=offset, count=1)
        return rows[0][1] if rows else {}

    def _range(self, after, count):
        return self._call("replay", self._redis.xrange, self.log_key, min=f"({after}" if after else "-", max="+",
                          count=count)

    def _dead_letter(self, group, offset, reason, fields):
        pipe = self._redis.pipeline(transaction=True)  # set aside and acknowledged together
        pipe.xadd(self.dead_key, {"offset": offset, "group": group, "reason": reason, "fields": json.dumps(fields),
                                  "time": datetime.now(timezone.utc).isoformat()})
        pipe.xack(self.log_key, group, offset)
        self._call("dead-letter", pipe.execute)

    def last_offset(self) -> str | None:
        """The newest event's offset (None when the stream is empty)."""
        rows = self._call("read", self._redis.xrevrange, self.log_key, count=1)
        return rows[0][0] if rows else None

    def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The most recent dead letters, oldest first."""
        rows = self._call("read dead letters", self._redis.xrevrange, self.dead_key, count=count)
        return [DeadLetter(f["offset"], f["group"], f["reason"], json.loads(f["fields"]),
                           datetime.fromisoformat(f["time"])) for _, f in reversed(rows)]

    def close(self) -> None:
        """Close the connection pool."""
        self._redis.close()
