"""The usage ledger: one record per /v1 request (admitted or refused, never a secret) written in batches by the
proxy, the rollups behind ``mass usage`` and ``/admin/usage``, and no record lost while its database restarts
(a private PostgreSQL, stopped and started by the test)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from datetime import datetime, timezone


from mass.access.ledger import UsageLedger, parse_since, usage_summary
from mass.cli.main import main
from tests import servers


def rows(db_path, key_id):
    db = sqlite3.connect(db_path)
    db.row_factory = sqlite3.Row
    return [dict(r) for r in db.execute("select * from usage_records where key_id = ? order by id", (key_id,))]


def test_every_v1_request_leaves_one_record_and_the_rollups_add_up(gateway_client, unit_keys):
    store = unit_keys["store"]
    key, secret = store.create({"name": "ledgered", "rpm": 2, "models": ["tiny-gpt", "minilm"]})  # model calls count
    h = {"Authorization": f"Bearer {secret}"}
    ok = gateway_client.post("/v1/completions", headers=h, json={"model": "tiny-gpt", "prompt": "Return the",
                                                                  "max_tokens": 5, "temperature": 0})
    emb = gateway_client.post("/v1/embeddings", headers=h, json={"model": "minilm", "input": ["a cat", "a dog"]})
    hidden = gateway_client.post("/v1/embeddings", headers=h, json={"model": "nope", "input": "x"})
    limited = gateway_client.get("/v1/models", headers=h)
    assert (ok.status_code, emb.status_code, hidden.status_code, limited.status_code) == (200, 200, 404, 200)
    refused = gateway_client.post("/v1/completions", headers=h, json={"model": "tiny-gpt", "prompt": "a"})
    assert refused.status_code == 429
    db_path = store.url.split("///", 1)[1]
    deadline = time.monotonic() + 10
    while len(rows(db_path, key.id)) < 5:
        assert time.monotonic() < deadline, "ledger records not written within 10 s"
        time.sleep(0.1)
    got = rows(db_path, key.id)
    assert [(r["path"], r["model"], r["status"], r["error_code"]) for r in got] == [
        ("/v1/completions", "tiny-gpt", 200, None), ("/v1/embeddings", "minilm", 200, None),
        ("/v1/embeddings", "nope", 404, "model_not_found"), ("/v1/models", None, 200, None),
        ("/v1/completions", "tiny-gpt", 429, "rate_limit_exceeded")]
    assert (got[0]["prompt_tokens"], got[0]["completion_tokens"]) == (ok.json()["usage"]["prompt_tokens"], 5)
    assert got[1]["prompt_tokens"] == emb.json()["usage"]["prompt_tokens"] and got[1]["completion_tokens"] == 0
    assert got[0]["request_id"] == ok.headers["x-request-id"] and ok.json()["id"] == f"cmpl-{got[0]['request_id']}"
    assert all(r["overhead_ms"] <= r["latency_ms"] for r in got)
    dump = "\n".join(sqlite3.connect(db_path).iterdump())
    assert secret not in dump

    total = usage_summary(store.url, key="ledgered", since="1h")
    assert len(total) == 1 and total[0]["requests"] == 5 and total[0]["refused"] == 2
    assert total[0]["total_tokens"] == sum(r["prompt_tokens"] + r["completion_tokens"] for r in got)
    by_model = {r["model"]: r["requests"] for r in usage_summary(store.url, key=key.id, since="1h", by="model")}
    assert by_model == {None: 1, "minilm": 1, "nope": 1, "tiny-gpt": 2}
    admin = {"Authorization": f"Bearer {unit_keys['admin']}"}
    over_http = gateway_client.get("/admin/usage", headers=admin, params={"key": "ledgered", "since": "1h",
                                                                          "by": "day"}).json()["data"]
    assert [r["requests"] for r in over_http] == [5] and over_http[0]["day"] == datetime.now(timezone.utc).date().isoformat()
    assert gateway_client.get("/admin/usage", headers=admin, params={"by": "week"}).status_code == 400


def test_mass_usage_command(mass_home, capsys):
    from mass.access.keys import KeyStore

    store = KeyStore()
    key, _ = store.create({"name": "team-a"})
    ledger = UsageLedger()
    now = datetime.now(timezone.utc)

    async def write():
        for i, model in enumerate(["m1", "m1", "m2"]):
            ledger.record({"at": now, "request_id": f"r{i}", "key_id": key.id, "model": model, "path": "/v1/x",
                           "status": 200, "error_code": None, "prompt_tokens": 10, "completion_tokens": i,
                           "latency_ms": 5.0, "overhead_ms": 0.5})
        assert await ledger.flush() == 3

    asyncio.run(write())
    assert main(["-o", "json", "usage", "--key", "team-a", "--since", "1d", "--by", "model"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["requests"], r["total_tokens"]) for r in out] == [("m1", 2, 21), ("m2", 1, 12)]
    assert main(["usage"]) == 0 and "team-a" in capsys.readouterr().out  # every key, by key
    assert main(["usage", "--since", "yesterday"]) == 2
    assert "not a span (30m, 12h, 1d, 2w)" in capsys.readouterr().err


def test_parse_since():
    now = datetime(2026, 11, 26, 12, tzinfo=timezone.utc)
    assert parse_since("30m", now) == datetime(2026, 11, 26, 11, 30, tzinfo=timezone.utc)
    assert parse_since("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=timezone.utc)


def test_no_record_is_lost_while_postgresql_restarts_and_an_overflow_is_counted():
    assert servers.postgres_available(), "initdb/pg_ctl are not installed (every MASS machine and CI has them)"
    from mass.access.db import dispose
    from mass.cluster import free_port

    pg = servers.PrivatePostgres(free_port())
    pg.start()
    ledger = UsageLedger(pg.url, max_buffer=130)
    now = datetime.now(timezone.utc)

    def rec(i):
        return {"at": now, "request_id": f"r{i}", "key_id": None, "model": "m", "path": "/v1/x", "status": 200,
                "error_code": None, "prompt_tokens": 1, "completion_tokens": 1, "latency_ms": 1.0, "overhead_ms": 0.1}

    async def run():
        for i in range(50):
            ledger.record(rec(i))
        assert await ledger.flush() == 50
        pg.stop()
        for i in range(50, 200):  # the database is down: 130 kept in memory, 20 dropped and counted
            ledger.record(rec(i))
        assert await ledger.flush() == 0 and ledger.failing and ledger.pending == 130 and ledger.dropped == 20
        pg.start()
        assert await ledger.flush() == 130 and not ledger.failing and ledger.pending == 0

    try:
        asyncio.run(run())
        from sqlalchemy import text

        from mass.access.db import engine

        with engine(pg.url).connect() as conn:
            ids = [r[0] for r in conn.execute(text("select request_id from usage_records order by id"))]
        assert ids == [f"r{i}" for i in range(180)]  # every record kept, in order, none twice
    finally:
        dispose(pg.url)
        pg.remove()
