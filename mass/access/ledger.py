"""The usage ledger: one record per ``/v1`` request, admitted or refused (time, request id, key id — never the
secret —, model, status, error code, tokens, latency, the gateway's own overhead).

The request path only appends to an in-memory buffer; a writer task inserts the buffer in batches every
``flush_s`` (append-only, no per-request UPDATE). While the database is down, records stay buffered (up to
``max_buffer``; beyond it new records are dropped and counted) and are written when it returns. A killed
gateway replica loses at most what it buffered since its last flush.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from mass.errors import InvalidRequest, MassError

log = logging.getLogger(__name__)


class UsageLedger:
    """Buffered, batched writes of usage records to the platform database.

    Args:
        url: the platform database (default ``MASS_DATABASE_URL``).
        flush_s: how often the writer inserts what was buffered.
        max_batch: records per INSERT.
        max_buffer: records kept while the database is unreachable; beyond it new ones are dropped (counted).
    """

    def __init__(self, url: str | None = None, flush_s: float = 0.5, max_batch: int = 1000,
                 max_buffer: int = 100_000) -> None:
        from mass.access.db import database_url

        self.url, self.flush_s, self.max_batch, self.max_buffer = database_url(url), flush_s, max_batch, max_buffer
        self._buffer: collections.deque[dict[str, Any]] = collections.deque()
        self._writer: asyncio.Task | None = None
        self.written = 0
        self.dropped = 0
        self.failing = False

    @property
    def pending(self) -> int:
        """Records buffered, not yet written."""
        return len(self._buffer)

    def record(self, row: dict[str, Any]) -> None:
        """Append one record (no I/O; call from the event loop)."""
        if len(self._buffer) >= self.max_buffer:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.error("usage ledger buffer full (%d records, database unreachable): %d records dropped",
                          self.max_buffer, self.dropped)
            return
        self._buffer.append(row)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await self.flush()

    async def flush(self) -> int:
        """Write everything buffered now (in batches); on a database failure keep it buffered. Returns the
        number written."""
        written = 0
        while self._buffer:
            batch = [self._buffer.popleft() for _ in range(min(len(self._buffer), self.max_batch))]
            try:
                await asyncio.to_thread(self._insert, batch)
            except MassError as exc:
                self._buffer.extendleft(reversed(batch))
                if not self.failing:
                    log.warning("usage ledger cannot write (%s); %d records kept in memory until the database "
                                "returns", exc, len(self._buffer))
                self.failing = True
                return written
            if self.failing:
                log.warning("usage ledger writing again")
                self.failing = False
            written += len(batch)
            self.written += len(batch)
        return written

    def _insert(self, batch: list[dict[str, Any]]) -> None:
        from mass.access.db import transaction
        from mass.access.schema import usage_records

        with transaction(self.url, "append usage records") as conn:
            conn.execute(usage_records.insert(), batch)

    async def close(self) -> None:
        """Stop the writer after a last flush."""
        if self._writer is not None:
            self._writer.cancel()
        await self.flush()


_SINCE = re.compile(r"^(\d+)\s*([mhdw])$")


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``30m``, ``12h``, ``1d``, ``2w`` ago, or an ISO date/time (UTC)."""
    now = now or datetime.now(timezone.utc)
    match = _SINCE.match(text.strip())
    if match:
        unit = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[match.group(2)]
        return now - timedelta(**{unit: int(match.group(1))})
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidRequest(f"since {text!r} is not a span (30m, 12h, 1d, 2w) or an ISO date", field="since") from None
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


def spent_since(url: str | None, key_id: str, since: datetime) -> int:
    """Tokens (prompt + completion) the ledger charged ``key_id`` since ``since`` (what a restarted gateway
    replica starts the key's budget period from)."""
    from sqlalchemy import func, select

    from mass.access.db import transaction
    from mass.access.schema import usage_records as u

    query = select(func.coalesce(func.sum(u.c.prompt_tokens + u.c.completion_tokens), 0)).where(
        u.c.key_id == key_id, u.c.at >= since)
    with transaction(url, "read a key's spent budget") as conn:
        return int(conn.execute(query).scalar())


GROUPS = ("key", "model", "day")


def usage_summary(url: str | None = None, key: str | None = None, since: str = "1d",
                  by: str | None = None) -> list[dict[str, Any]]:
    """Rollups of the ledger since ``since``: per ``by`` (key, model or day; None: one total row), for one
    ``key`` (name or id) or every key. Each row: requests, refused (status >= 400), prompt, completion and
    total tokens, mean latency and overhead in ms."""
    from sqlalchemy import func, select

    from mass.access.db import transaction
    from mass.access.keys import KeyStore
    from mass.access.schema import api_keys, usage_records as u

    if by is not None and by not in GROUPS:
        raise InvalidRequest(f"by {by!r}: group by one of {', '.join(GROUPS)}", field="by")
    start = parse_since(since)
    key_id = KeyStore(url).get(key).id if key else None
    group = {"key": api_keys.c.name, "model": u.c.model, "day": func.date(u.c.at), None: None}[by]
    columns = [func.count().label("requests"),
               func.sum((u.c.status >= 400).cast(u.c.prompt_tokens.type)).label("refused"),
               func.coalesce(func.sum(u.c.prompt_tokens), 0).label("prompt_tokens"),
               func.coalesce(func.sum(u.c.completion_tokens), 0).label("completion_tokens"),
               func.avg(u.c.latency_ms).label("latency_ms"), func.avg(u.c.overhead_ms).label("overhead_ms")]
    query = select(*([group.label(by)] if group is not None else []), *columns).select_from(
        u.outerjoin(api_keys, api_keys.c.id == u.c.key_id)).where(u.c.at >= start)
    if key_id is not None:
        query = query.where(u.c.key_id == key_id)
    if group is not None:
        query = query.group_by(group).order_by(group)
    with transaction(url, "read usage") as conn:
        rows = [dict(r._mapping) for r in conn.execute(query)]
    out = []
    for row in rows:
        if not row["requests"]:
            continue
        row["refused"] = int(row["refused"] or 0)
        row["total_tokens"] = int(row["prompt_tokens"]) + int(row["completion_tokens"])
        row["latency_ms"] = round(float(row["latency_ms"] or 0), 2)
        row["overhead_ms"] = round(float(row["overhead_ms"] or 0), 3)
        if by == "day":
            row["day"] = str(row["day"])
        out.append(row)
    return out
