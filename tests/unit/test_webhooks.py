"""MLflow registry webhooks: deliveries signed the way MLflow signs them (its own signing function) are verified
and turned into MASS events; unsigned, wrongly signed, tampered or replayed ones are refused."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature

from mass.errors import InvalidSignature
from mass.events import open_bus
from mass.events.webhooks import to_events, verify

SECRET = "s3cret-for-tests"


def delivery(entity: str, action: str, data: dict, secret: str = SECRET, age_s: float = 0) -> tuple[dict, bytes]:
    """Headers and body as MLflow's webhook sender builds them."""
    body = json.dumps({"entity": entity, "action": action, "timestamp": "2026-11-26T00:00:00+00:00", "data": data})
    delivery_id, stamp = str(uuid.uuid4()), str(int(time.time() - age_s))
    return ({"x-mlflow-signature": _generate_hmac_signature(secret, delivery_id, stamp, body),
             "x-mlflow-timestamp": stamp, "x-mlflow-delivery-id": delivery_id}, body.encode())


def test_a_delivery_signed_by_mlflow_is_accepted_and_mapped():
    headers, body = delivery("model_version", "created", {"name": "m", "version": "3", "source": "models:/x",
                                                           "run_id": "r1", "tags": {"mass.task": "embedding"}})
    assert verify(SECRET, headers, body) == headers["x-mlflow-delivery-id"]
    assert to_events(body) == [("model.version.registered", {"model": "m", "version": "3", "task": "embedding",
                                                             "run_id": "r1"})]
    _, alias = delivery("model_version_alias", "created", {"name": "m", "alias": "production", "version": "3"})
    assert to_events(alias) == [("model.alias.changed", {"model": "m", "alias": "production", "version": "3"})]
    _, gone = delivery("model_version_alias", "deleted", {"name": "m", "alias": "canary"})
    assert to_events(gone) == [("model.alias.changed", {"model": "m", "alias": "canary", "version": None})]
    _, ignored = delivery("model_version_tag", "set", {"name": "m", "version": "3", "key": "k", "value": "v"})
    assert to_events(ignored) == []


@pytest.mark.parametrize("spoil, needle", [
    (lambda h, b: ({**h, "x-mlflow-signature": ""}, b), "without MLflow's signature headers"),
    (lambda h, b: (h, b.replace(b'"3"', b'"4"')), "does not match"),
    (lambda h, b: ({**h, "x-mlflow-delivery-id": "other"}, b), "does not match"),
    (lambda h, b: ({**h, "x-mlflow-signature": "v2," + h["x-mlflow-signature"][3:]}, b), "not v1"),
    (lambda h, b: ({**h, "x-mlflow-timestamp": "soon"}, b), "not a Unix time"),
])
def test_unsigned_tampered_or_foreign_deliveries_are_refused(spoil, needle):
    headers, body = spoil(*delivery("model_version", "created", {"name": "m", "version": "3"}))
    with pytest.raises(InvalidSignature, match=needle):
        verify(SECRET, headers, body)


def test_a_wrong_secret_and_a_replayed_old_delivery_are_refused():
    with pytest.raises(InvalidSignature, match="does not match"):
        verify(SECRET, *delivery("model_version", "created", {"name": "m", "version": "1"}, secret="other"))
    with pytest.raises(InvalidSignature, match="old"):
        verify(SECRET, *delivery("model_version", "created", {"name": "m", "version": "1"}, age_s=3600))


def test_the_gateway_hook_publishes_verified_deliveries_once(gateway_client, monkeypatch):
    headers, body = delivery("model_version_alias", "created", {"name": "hooked", "alias": "canary", "version": "2"})
    off = gateway_client.post("/hooks/mlflow", content=body, headers=headers)
    assert off.status_code == 404 and "MASS_WEBHOOK_SECRET" in off.json()["error"]["message"]
    monkeypatch.setenv("MASS_WEBHOOK_SECRET", SECRET)
    bad = gateway_client.post("/hooks/mlflow", content=body, headers={**headers, "x-mlflow-signature": "v1,AAAA"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_signature"
    first = gateway_client.post("/hooks/mlflow", content=body, headers=headers)
    again = gateway_client.post("/hooks/mlflow", content=body, headers=headers)  # MLflow's retry, same id
    assert first.status_code == 200 and len(first.json()["published"]) == 1
    assert again.status_code == 200 and again.json()["published"] == [] and again.json()["duplicate"]
    bus = open_bus()
    events = [e for e in bus.replay(count=10_000) if e.data.model == "hooked"]
    bus.close()
    assert [(e.type, e.source, e.data.alias, e.data.version) for e in events] == [
        ("model.alias.changed", "mlflow-webhook", "canary", "2")]
    assert "/hooks/mlflow" not in gateway_client.get("/openapi.json").json()["paths"]  # for MLflow, not clients
