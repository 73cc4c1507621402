"""The event bus contract, run against both backends: the embedded SQLite log and Redis Streams (the machine's
Redis, under a key prefix of each test's own; a private durable redis-server where the test restarts it)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from mass.errors import InvalidEvent
from mass.events import Consumer, open_bus
from mass.events.redis_streams import RedisBus
from mass.events.sqlite_log import SqliteBus
from tests.servers import PrivateRedis, redis_available

REDIS = "redis://127.0.0.1:6379/0"
ALIAS = {"model": "tiny-gpt", "alias": "production", "version": "2", "previous": "1"}


def make_bus(kind: str, tmp_path, **kwargs):
    if kind == "sqlite":
        return SqliteBus(tmp_path / "events.db", **kwargs)
    assert redis_available(), "redis-server is needed (every MASS machine and CI has it)"
    return RedisBus(REDIS, prefix=f"test:events:{uuid.uuid4().hex[:8]}", **kwargs)


@pytest.fixture(params=["sqlite", "redis"])
def kind(request):
    return request.param


@pytest.fixture
def bus(kind, tmp_path):
    made = []

    def factory(**kwargs):
        made.append(make_bus(kind, tmp_path, **kwargs))
        return made[-1]

    yield factory
    for b in made:
        if isinstance(b, RedisBus):
            b._redis.delete(b.log_key, b.dead_key)
        b.close()


def test_published_events_come_back_typed_in_order_and_replay_from_an_offset(bus):
    b = bus()
    assert b.last_offset() is None  # an empty log
    first = b.publish("model.alias.changed", ALIAS, source="test")
    second = b.publish("model.offline", {"model": "tiny-gpt", "reason": "maintenance"})
    third = b.publish("dataset.updated", {"name": "docs", "version": "3", "path": "/d", "rows": 10,
                                          "content_hash": "ab"})
    events = b.replay()
    assert [e.offset for e in events] == [first.offset, second.offset, third.offset]
    assert events[0].data.version == "2" and events[0].source == "test" and events[0].version == 1
    assert events[1].data.reason == "maintenance" and events[2].data.rows == 10
    assert [e.offset for e in b.replay(after=first.offset)] == [second.offset, third.offset]
    assert [e.offset for e in b.replay(after=first.offset, count=1)] == [second.offset]
    assert b.last_offset() == third.offset and b.replay(after=b.last_offset()) == []


@pytest.mark.parametrize("event_type, data, needle", [
    ("model.alias.chnged", ALIAS, "unknown event type"),
    ("model.alias.changed", {**ALIAS, "extra": 1}, "extra"),
    ("model.alias.changed", {"model": "m"}, "alias"),
    ("dataset.updated", {"name": "d", "version": "1", "path": "/p", "rows": "many", "content_hash": "x"}, "rows"),
])
def test_an_invalid_event_is_refused_naming_the_field_and_nothing_is_written(bus, event_type, data, needle):
    b = bus()
    with pytest.raises(InvalidEvent, match=needle):
        b.publish(event_type, data)
    assert b.replay() == []


def test_each_group_sees_every_event_once_and_its_consumers_share_them(bus):
    b = bus()
    offsets = [b.publish("model.online", {"model": f"m{i}"}).offset for i in range(6)]
    a1 = b.read("controller", "c1", count=4)
    a2 = b.read("controller", "c2", count=4)
    assert [d.event.offset for d in a1 + a2] == offsets  # shared, each once
    assert b.read("controller", "c1") == []
    other = b.read("audit", "x", count=10)
    assert [d.event.offset for d in other] == offsets  # another group gets all of them again
    assert all(d.attempts == 1 and d.group == "audit" and d.consumer == "x" for d in other)


def test_a_new_group_can_start_after_the_latest_event(bus):
    b = bus()
    b.publish("model.online", {"model": "old"})
    assert b.read("late", "c", start="latest") == []
    new = b.publish("model.online", {"model": "new"})
    assert [d.event.offset for d in b.read("late", "c")] == [new.offset]


def shared(first, other):
    """``other`` (a second client) on ``first``'s stream (Redis buses get a prefix each)."""
    if isinstance(first, RedisBus):
        other.log_key, other.dead_key = first.log_key, first.dead_key
    return other


def test_a_blocking_read_returns_an_event_published_meanwhile(bus):
    b = bus()
    writer = shared(b, bus())
    b.read("g", "c")  # the group exists, empty
    threading.Timer(0.3, lambda: writer.publish("model.online", {"model": "m"})).start()
    started = time.monotonic()
    got = b.read("g", "c", block_s=5)
    assert len(got) == 1 and time.monotonic() - started < 4


def test_a_dead_consumers_unacknowledged_event_is_redelivered_to_another(bus):
    b = bus()
    event = b.publish("model.alias.changed", ALIAS)
    assert [d.event.offset for d in b.read("g", "dies")] == [event.offset]  # received, never acknowledged
    assert b.claim("g", "takes-over", idle_s=5) == []  # not idle long enough yet
    time.sleep(0.3)
    again = b.claim("g", "takes-over", idle_s=0.2)
    assert [(d.event.offset, d.consumer, d.attempts) for d in again] == [(event.offset, "takes-over", 2)]
    b.ack("g", event.offset)
    time.sleep(0.3)
    assert b.claim("g", "third", idle_s=0.2) == []  # acknowledged: never delivered to the group again
    assert b.read("g", "third") == []


def test_a_corrupted_event_is_dead_lettered_and_the_consumer_goes_on(bus):
    b = bus()
    b.publish("model.online", {"model": "a"})
    # written past the schema check (another writer, a bug, a newer MASS): the backend's own append
    b._append({"type": "model.online", "version": "1", "time": "2026-11-26T00:00:00+00:00", "source": "x",
               "data": "{not json"})
    b._append({"type": "model.online", "version": "9", "time": "2026-11-26T00:00:00+00:00", "source": "x",
               "data": '{"model": "b"}'})
    b.publish("model.online", {"model": "c"})
    seen = []
    consumer = Consumer(b, "controller", "c1", lambda e: seen.append(e.data.model))
    assert consumer.poll() == 2 and seen == ["a", "c"]
    dead = b.dead_letters()
    assert [d.group for d in dead] == ["controller", "controller"]
    assert "does not match its schema" in dead[0].reason and dead[0].fields["data"] == "{not json"
    assert "newer than this MASS" in dead[1].reason
    time.sleep(0.2)
    assert b.claim("controller", "c2", idle_s=0.1) == []  # dead letters are no longer pending


def test_an_event_whose_handler_keeps_failing_is_dead_lettered_after_max_deliveries(bus):
    b = bus(max_deliveries=3)
    poison = b.publish("model.offline", {"model": "bad"})
    calls = []

    def handler(event):
        calls.append(event.data.model)
        if event.data.model == "bad":
            raise RuntimeError("handler bug")

    consumer = Consumer(b, "g", "c", handler, idle_s=0.1)
    deadline = time.monotonic() + 10
    while not b.dead_letters() and time.monotonic() < deadline:
        consumer.poll()
        time.sleep(0.15)
    assert calls == ["bad"] * 3
    (dead,) = b.dead_letters()
    assert dead.offset == poison.offset and "3 deliveries" in dead.reason
    b.publish("model.online", {"model": "next"})
    assert consumer.poll() == 1 and calls[-1] == "next"  # the group goes on


def test_concurrent_publishers_lose_nothing(bus):
    first = bus()
    buses = [first, *(shared(first, bus()) for _ in range(3))]  # four clients, one log
    offsets: list[str] = []

    def publish(b, i):
        for j in range(40):
            offsets.append(b.publish("model.online", {"model": f"{i}-{j}"}).offset)

    threads = [threading.Thread(target=publish, args=(b, i)) for i, b in enumerate(buses)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    replayed = buses[0].replay(count=1000)
    assert len(set(offsets)) == 160 and sorted(e.offset for e in replayed) == sorted(offsets)
    assert sorted(e.data.model for e in replayed) == sorted(f"{i}-{j}" for i in range(4) for j in range(40))


def test_sqlite_log_survives_reopening_with_its_groups(tmp_path):
    b = SqliteBus(tmp_path / "events.db")
    kept = b.publish("model.online", {"model": "m"})
    b.read("g", "c")  # delivered, not acknowledged
    b.close()
    reopened = SqliteBus(tmp_path / "events.db")
    assert [e.offset for e in reopened.replay()] == [kept.offset]
    time.sleep(0.2)
    assert [d.event.offset for d in reopened.claim("g", "c2", idle_s=0.1)] == [kept.offset]
    reopened.close()


def test_redis_restart_loses_no_acknowledged_publish():
    from mass.cluster import free_port

    assert redis_available(), "redis-server is needed (every MASS machine and CI has it)"
    server = PrivateRedis(free_port(), durable=True)
    server.start()
    try:
        b = RedisBus(server.url, timeout_s=1)
        published = [b.publish("model.online", {"model": f"m{i}"}).offset for i in range(50)]
        b.read("g", "c", count=10)
        server.stop()  # kill -9
        with pytest.raises(Exception) as failed:
            b.publish("model.online", {"model": "while-down"})
        assert getattr(failed.value, "code", "") == "event_bus_unavailable"
        server.start()
        assert [e.offset for e in b.replay(count=100)] == published
        assert len(b.read("g", "c", count=100)) == 40  # the group's position survived too
        b.close()
    finally:
        server.remove()


def test_open_bus_follows_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("MASS_HOME", str(tmp_path))
    monkeypatch.delenv("MASS_EVENTS_URL", raising=False)
    default = open_bus()
    assert isinstance(default, SqliteBus) and default.path == tmp_path / "events.db"
    default.close()
    monkeypatch.setenv("MASS_EVENTS_URL", REDIS)
    redis_bus = open_bus()
    assert isinstance(redis_bus, RedisBus)
    redis_bus.close()
    monkeypatch.setenv("MASS_EVENTS_URL", "kafka://x")
    with pytest.raises(Exception, match="MASS_EVENTS_URL"):
        open_bus()


def test_a_running_consumer_rides_out_a_redis_outage():
    """``Consumer.run`` in a thread: it handles events as they come, keeps going while its Redis is down (logged,
    retried every second) and picks up what was published after Redis came back; ``stop`` ends it."""
    from mass.cluster import free_port

    assert redis_available(), "redis-server is needed (every MASS machine and CI has it)"
    server = PrivateRedis(free_port(), durable=True)
    server.start()
    try:
        bus, seen, stop = RedisBus(server.url, timeout_s=1), [], threading.Event()
        worker = threading.Thread(target=Consumer(bus, "g", "c", lambda e: seen.append(e.data.model)).run,
                                  args=(stop, 0.2))
        worker.start()
        publisher = RedisBus(server.url, timeout_s=1)
        publisher.publish("model.online", {"model": "before"})
        deadline = time.monotonic() + 10
        while seen != ["before"] and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()
        time.sleep(1.5)  # the consumer meets the outage
        assert worker.is_alive()
        server.start()
        publisher.publish("model.online", {"model": "after"})
        deadline = time.monotonic() + 15
        while seen != ["before", "after"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen == ["before", "after"]
        stop.set()
        worker.join(timeout=10)
        assert not worker.is_alive()
    finally:
        server.remove()
