"""API keys and the proxy in-process: the key store on sqlite (hash only, migrations), authentication and
its bad inputs, per-key model access, the admin API and the ``mass keys`` commands."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from mass.access.keys import SECRET_RE, KeyStore
from mass.cli.main import main


@pytest.fixture
def store(tmp_path):
    return KeyStore(f"sqlite:///{tmp_path / 'mass.db'}")


def test_a_key_is_stored_as_its_hash_only_and_resolves_until_revoked(store, tmp_path):
    key, secret = store.create({"name": "team-a", "models": ["tiny-gpt", "minilm*"], "rpm": 600, "tpm": 100000,
                                "budget": "1000000/day", "max_parallel": 8})
    assert SECRET_RE.fullmatch(secret) and secret.startswith(f"mass-{key.id}-")
    assert key.to_dict()["budget"] == "1000000/day" and key.prefix == f"mass-{key.id}-…"
    db = sqlite3.connect(tmp_path / "mass.db")
    dump = "\n".join(db.iterdump())
    random_part = secret[len(f"mass-{key.id}-"):]  # (it may hold '-' itself: split("-") once gave a 2-char tail)
    assert secret not in dump and random_part not in dump  # only the SHA-256 is kept
    assert db.execute("select version_num from alembic_version").fetchall() == [("0005",)]  # the head
    assert store.resolve(secret).name == "team-a"
    assert store.resolve(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None  # right prefix, wrong secret
    assert (key.allows("tiny-gpt"), key.allows("minilm-l6"), key.allows("tiny-gpt-2")) == (True, True, False)

    version = store.version()
    new, new_secret = store.rotate("team-a")
    assert store.resolve(secret) is None and store.resolve(new_secret).id == key.id and store.version() > version
    revoked = store.revoke(key.id)
    assert revoked.to_dict()["status"] == "revoked" and store.resolve(new_secret) is None
    assert store.revoke("team-a").revoked_at == revoked.revoked_at  # idempotent


def test_key_store_refusals_name_the_problem(store):
    store.create({"name": "team-a"})
    cases = [
        (lambda: store.create({"name": "team-a"}), "a key named 'team-a' already exists"),
        (lambda: store.create({"name": "bad name"}), "name"),
        (lambda: store.create({"name": "b", "budget": "5/week"}), "TOKENS/day or TOKENS/month"),
        (lambda: store.create({"name": "c", "rpm": 0}), "rpm"),
        (lambda: store.create({"name": "d", "models": []}), "at least one model pattern"),
        (lambda: store.update("team-a", {}), "nothing to update"),
        (lambda: store.update("team-a", {"models": None}), "cannot be null"),
        (lambda: store.get("nope"), "no API key named 'nope'"),
    ]
    for call, needle in cases:
        with pytest.raises(Exception) as info:
            call()
        assert needle in str(info.value)
    assert [k.name for k in store.list()] == ["team-a"]  # nothing half-written


def test_a_second_process_view_of_the_same_database_is_already_migrated(tmp_path):
    url = f"sqlite:///{tmp_path / 'mass.db'}"
    _, secret = KeyStore(url).create({"name": "a"})
    from mass.access import db

    db.dispose(url)  # as a new process would: a fresh engine runs the (no-op) upgrade again
    assert KeyStore(url).resolve(secret).name == "a"


# ------------------------------------------------------------------ the proxy, in-process
def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def without_key(client, path: str):
    """GET ``path`` without the client's default Authorization header."""
    request = client.build_request("GET", path)
    del request.headers["authorization"]
    return client.send(request)


BAD_HEADERS = {
    "no header": None,
    "wrong scheme": "Basic dXNlcjpwYXNz",
    "empty key": "Bearer ",
    "not a MASS key": "Bearer sk-1234",
    "whitespace inside": "Bearer mass-0123456789ab- " + "a" * 42,
    "64 KB": "Bearer " + "a" * 65536,
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_authorization_is_401_invalid_api_key(gateway_client, case):
    header = BAD_HEADERS[case]
    if header is None:
        resp = without_key(gateway_client, "/v1/models")
    else:
        resp = gateway_client.get("/v1/models", headers={"Authorization": header})
    assert resp.status_code == 401, resp.text
    err = resp.json()["error"]
    assert err["code"] == "invalid_api_key" and err["type"] == "authentication_error"
    assert "Traceback" not in resp.text and "a" * 100 not in resp.text


def test_unknown_and_revoked_keys_are_refused_and_extra_outer_whitespace_is_tolerated(gateway_client, unit_keys):
    store = unit_keys["store"]
    _, secret = store.create({"name": "short-lived"})
    assert gateway_client.get("/v1/models", headers={"Authorization": f"  Bearer   {secret}  "}).status_code == 200
    wrong = secret[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB")
    assert gateway_client.get("/v1/models", headers=bearer(wrong)).json()["error"]["code"] == "invalid_api_key"
    store.revoke("short-lived")
    deadline = time.monotonic() + 5
    while gateway_client.get("/v1/models", headers=bearer(secret)).status_code == 200:
        assert time.monotonic() < deadline, "a revoked key was still accepted after 5 s"
        time.sleep(0.05)
    resp = gateway_client.get("/v1/models", headers=bearer(secret))
    assert resp.status_code == 401 and "unknown or revoked" in resp.json()["error"]["message"]


def test_health_probes_and_docs_need_no_key(gateway_client):
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert without_key(gateway_client, path).status_code == 200
    doc = gateway_client.get("/openapi.json").json()
    assert doc["paths"]["/v1/completions"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in doc["paths"]["/healthz"]["get"]


def test_a_key_sees_only_its_models_and_others_are_not_found(gateway_client, unit_keys):
    store = unit_keys["store"]
    _, secret = store.create({"name": "minilm-only", "models": ["minilm*"]})
    h = bearer(secret)
    assert [m["id"] for m in gateway_client.get("/v1/models", headers=h).json()["data"]] == ["minilm"]
    hidden = gateway_client.post("/v1/completions", headers=h, json={"model": "tiny-gpt", "prompt": "a"})
    unknown = gateway_client.post("/v1/completions", headers=h, json={"model": "nope", "prompt": "a"})
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.json()["error"]["code"] == "model_not_found"
    assert "tiny-gpt" not in hidden.json()["error"]["message"].replace("'tiny-gpt' is", "")  # not listed
    assert hidden.json()["error"]["message"] == unknown.json()["error"]["message"].replace("'nope'", "'tiny-gpt'")
    assert gateway_client.get("/v1/models/tiny-gpt", headers=h).status_code == 404
    ok = gateway_client.post("/v1/embeddings", headers=h, json={"model": "minilm", "input": "a cat"})
    assert ok.status_code == 200 and float(ok.headers["x-mass-overhead-ms"]) >= 0


def test_admin_endpoints_need_an_admin_key(gateway_client, unit_keys):
    resp = gateway_client.get("/admin/keys")  # the client's user key
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "permission_denied"
    assert "not an admin key" in resp.json()["error"]["message"]


def test_the_admin_api_manages_keys(gateway_client, unit_keys):
    h = bearer(unit_keys["admin"])
    created = gateway_client.post("/admin/keys", headers=h, json={"name": "via-http", "models": ["tiny-gpt"],
                                                                   "rpm": 60, "budget": "1000/month"})
    assert created.status_code == 201, created.text
    secret = created.json()["secret"]
    assert created.json()["budget"] == "1000/month" and SECRET_RE.fullmatch(secret)
    names = [k["name"] for k in gateway_client.get("/admin/keys", headers=h).json()["data"]]
    assert "via-http" in names and all("secret" not in k for k in gateway_client.get("/admin/keys", headers=h)
                                       .json()["data"])
    updated = gateway_client.patch("/admin/keys/via-http", headers=h, json={"rpm": None, "models": ["*"]})
    assert updated.json()["rpm"] is None and updated.json()["models"] == ["*"]
    assert gateway_client.patch("/admin/keys/via-http", headers=h, json={"admin": 1}).status_code == 400
    rotated = gateway_client.post("/admin/keys/via-http/rotate", headers=h).json()
    assert rotated["secret"] != secret
    assert gateway_client.post("/admin/keys/via-http/revoke", headers=h).json()["status"] == "revoked"
    missing = gateway_client.get("/admin/keys/nope", headers=h)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "key_not_found"


# ------------------------------------------------------------------ mass keys
def test_mass_keys_commands(mass_home, capsys):
    assert main(["-o", "json", "keys", "create", "--name", "team-a", "--models", "tiny-gpt,minilm*", "--rpm",
                 "600", "--tpm", "100000", "--budget-tokens", "1000000/day", "--max-parallel", "8"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["secret"].startswith(f"mass-{created['id']}-") and created["models"] == ["tiny-gpt", "minilm*"]
    assert main(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert "team-a" in listing and "1000000/day" in listing and created["secret"] not in listing
    assert main(["-o", "json", "keys", "update", "team-a", "--rpm", "none", "--admin", "true"]) == 0
    updated = json.loads(capsys.readouterr().out)
    assert updated["rpm"] is None and updated["admin"] is True
    assert main(["-o", "json", "keys", "rotate", "team-a"]) == 0
    assert json.loads(capsys.readouterr().out)["secret"] != created["secret"]
    assert main(["keys", "revoke", "team-a"]) == 0 and "revoked team-a" in capsys.readouterr().out
    assert main(["keys", "show", "nope"]) == 3
    # the last line: the session gateway's key poller (another thread) may log through the CLI's handler first
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("error: no API key named 'nope' (give its name or "
                                                                "id; `mass keys list` shows them)")
    assert main(["keys", "create", "--name", "x", "--rpm", "many"]) == 2
    assert "--rpm 'many' is not a whole number" in capsys.readouterr().err
    assert (mass_home / "mass.db").exists()


# ------------------------------------------------------------------ limits through the proxy (in-process limiter)
def test_rate_limit_headers_on_every_response_and_429_with_retry_after(gateway_client, unit_keys):
    _, secret = unit_keys["store"].create({"name": "two-per-minute", "rpm": 2, "tpm": 5000})
    h = bearer(secret)
    body = {"model": "tiny-gpt", "prompt": "Return the", "max_tokens": 4, "temperature": 0}
    first, second, third = (gateway_client.post("/v1/completions", headers=h, json=body) for _ in range(3))
    assert first.status_code == second.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2" and first.headers["x-ratelimit-limit-tokens"] == "5000"
    assert [r.headers["x-ratelimit-remaining-requests"] for r in (first, second, third)] == ["1", "0", "0"]
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 5000 - (12 + 4)  # the reservation: bytes + 2 + max
    assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
    err = third.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and "2 requests per minute" in err["message"]
    assert third.headers["x-ratelimit-reset-requests"].endswith("s")


def test_a_token_budget_is_never_exceeded_and_charges_real_usage(gateway_client, unit_keys):
    key, secret = unit_keys["store"].create({"name": "small-budget", "budget": "100/day"})
    h = bearer(secret)
    body = {"model": "tiny-gpt", "prompt": "Return the", "max_tokens": 8, "temperature": 0}
    used = 0
    for _ in range(20):
        resp = gateway_client.post("/v1/completions", headers=h, json=body)
        if resp.status_code != 200:
            break
        used += resp.json()["usage"]["total_tokens"]
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "insufficient_quota"
    assert "budget of 100 per day" in resp.json()["error"]["message"]
    limiter = gateway_client.app.state.mass.limits
    assert limiter.spent(unit_keys["store"].get(key.id)) == used <= 100  # charged what was used, never over


def test_a_cancelled_stream_is_charged_what_it_generated(gateway_client, unit_keys):
    key, secret = unit_keys["store"].create({"name": "streamer", "budget": "100000/day"})
    body = {"model": "tiny-gpt", "prompt": "Return the", "max_tokens": 60, "temperature": 0, "stream": True,
            "logit_bias": {"0": -100}}
    with gateway_client.stream("POST", "/v1/completions", headers=bearer(secret), json=body) as resp:
        lines = resp.iter_lines()
        seen = [next(lines) for _ in range(6)]  # three chunks (each followed by a blank line), then go away
    assert all(s.startswith("data: {") for s in seen[::2])
    limiter = gateway_client.app.state.mass.limits
    k = unit_keys["store"].get(key.id)
    deadline = time.monotonic() + 5
    while limiter._inflight[k.id]:  # settled once the gateway notices the client left
        assert time.monotonic() < deadline
        time.sleep(0.05)
    spent = limiter.spent(k)
    assert 3 + 3 <= spent < 3 + 60  # the prompt (3 tokens) and what was generated, not the 60 reserved


def test_an_app_under_a_route_prefix_protects_its_v1_routes():
    """Serve passes an app mounted at /proxy the full path and /proxy as root_path."""
    from mass.gateway.proxy import route_path

    assert route_path({"path": "/proxy/v1/models", "root_path": "/proxy"}) == "/v1/models"
    assert route_path({"path": "/v1/models", "root_path": ""}) == "/v1/models"
    assert route_path({"path": "/proxyx/v1/models", "root_path": "/proxy"}) == "/proxyx/v1/models"


def test_keys_on_the_machines_postgresql_in_a_database_of_their_own():
    """The same store on PostgreSQL (psycopg2), in a fresh database dropped afterwards."""
    import uuid

    from sqlalchemy import create_engine, text

    from mass.access.db import dispose

    name = f"mass_keys_{uuid.uuid4().hex[:8]}"
    admin = create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    try:
        store = KeyStore(url)
        key, secret = store.create({"name": "team-pg", "models": ["minilm*"], "budget": "10/month"})
        assert store.resolve(secret).budget_period == "month" and store.version() == 1
        store.revoke("team-pg")
        assert store.resolve(secret) is None and store.version() == 2
        with create_engine(url).connect() as conn:
            assert conn.execute(text("select version_num from alembic_version")).scalar() == "0005"
            assert secret not in str(conn.execute(text("select * from api_keys")).all())
    finally:
        dispose(url)
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def test_auth_off_takes_an_explicit_setting_and_is_logged(lm, caplog):
    from fastapi.testclient import TestClient

    from mass.gateway.app import create_app
    from tests.inprocess import build_state

    app = {"gateway": {"auth": False, "ledger": False},
           "models": [{"name": "open-gpt", "ref": "tiny-gpt@production", "engine": "llm"}]}
    with caplog.at_level("WARNING"):
        state = build_state(app, {"open-gpt": lm})
    assert "gateway.auth is false" in caplog.text
    try:
        with TestClient(create_app(state)) as client:
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["open-gpt"]
            assert client.get("/admin/keys").status_code == 403  # no admin API without authentication
    finally:
        state.routes["open-gpt"].handle._target.served.engine.shutdown()
