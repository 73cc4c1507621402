"""The event bus (the platform's message queue): typed, versioned events, consumer groups, redelivery, replay
and dead letters, on an embedded SQLite log (the default) or Redis Streams (``MASS_EVENTS_URL``)."""

from __future__ import annotations

from mass.events.bus import Consumer, DeadLetter, Delivery, EventBus
from mass.events.schemas import SCHEMAS, Event

__all__ = ["Consumer", "DeadLetter", "Delivery", "Event", "EventBus", "SCHEMAS", "open_bus"]


def open_bus(url: str | None = None) -> EventBus:
    """The bus at ``url`` (default ``MASS_EVENTS_URL``; empty: ``$MASS_HOME/events.db``): ``sqlite:///path``
    or ``redis://host:port/db``. ConfigError naming the variable for anything else."""
    from mass.errors import ConfigError
    from mass.settings import get_settings

    url = url or get_settings().events_url
    if url.startswith("sqlite:///"):
        from mass.events.sqlite_log import SqliteBus

        return SqliteBus(url[len("sqlite:///"):])
    if url.startswith(("redis://", "rediss://", "unix://")):
        from mass.events.redis_streams import RedisBus

        return RedisBus(url)
    raise ConfigError(f"MASS_EVENTS_URL={url!r} is not an event bus; use sqlite:///path or redis://host:port/db",
                      field="MASS_EVENTS_URL")
