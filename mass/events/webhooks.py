"""MLflow registry webhooks -> MASS events: changes made outside MASS (the MLflow UI, a raw MLflow client) reach
the bus too. A delivery is accepted only with a valid HMAC-SHA256 signature (MLflow's ``v1`` scheme over
``<delivery id>.<timestamp>.<body>``) made within the last 5 minutes (replayed old deliveries are refused)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections import OrderedDict
from typing import Any

from mass.errors import InvalidRequest, InvalidSignature

SIGNATURE, TIMESTAMP, DELIVERY = "x-mlflow-signature", "x-mlflow-timestamp", "x-mlflow-delivery-id"
TOLERANCE_S = 300
#: the MLflow webhook events MASS listens to
MLFLOW_EVENTS = ("model_version.created", "model_version_alias.created", "model_version_alias.deleted")


def verify(secret: str, headers: dict[str, str], body: bytes, now: float | None = None) -> str:
    """The delivery id of a correctly signed, recent delivery; InvalidSignature (401) otherwise."""
    signature, stamp, delivery = headers.get(SIGNATURE, ""), headers.get(TIMESTAMP, ""), headers.get(DELIVERY, "")
    if not (signature and stamp and delivery):
        raise InvalidSignature("webhook delivery without MLflow's signature headers (X-MLflow-Signature, "
                               "-Timestamp, -Delivery-Id): register it with a secret (`mass events mlflow-webhook`)")
    version, _, given = signature.partition(",")
    try:
        age = (time.time() if now is None else now) - int(stamp)
    except ValueError:
        raise InvalidSignature(f"webhook timestamp {stamp[:32]!r} is not a Unix time") from None
    if version != "v1":
        raise InvalidSignature(f"webhook signature scheme {version[:16]!r} is not v1")
    expected = base64.b64encode(hmac.new(secret.encode(), f"{delivery}.{stamp}.".encode() + body,
                                         hashlib.sha256).digest()).decode()
    if not hmac.compare_digest(expected, given):
        raise InvalidSignature("webhook signature does not match (is MASS_WEBHOOK_SECRET the webhook's secret?)")
    if abs(age) > TOLERANCE_S:
        raise InvalidSignature(f"webhook delivery is {age:.0f}s old (at most {TOLERANCE_S}s): refused as a replay")
    return delivery


def to_events(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """The MASS events of one MLflow delivery: (type, payload) pairs; [] for MLflow events MASS ignores."""
    try:
        delivery = json.loads(body)
        what, data = f"{delivery['entity']}.{delivery['action']}", delivery["data"]
    except (ValueError, KeyError, TypeError):
        raise InvalidRequest("webhook body is not an MLflow webhook delivery", field="body") from None
    if what == "model_version.created":
        return [("model.version.registered", {"model": data["name"], "version": str(data["version"]),
                                              "task": (data.get("tags") or {}).get("mass.task"),
                                              "run_id": data.get("run_id")})]
    if what == "model_version_alias.created":
        return [("model.alias.changed", {"model": data["name"], "alias": data["alias"],
                                         "version": str(data["version"])})]
    if what == "model_version_alias.deleted":
        return [("model.alias.changed", {"model": data["name"], "alias": data["alias"], "version": None})]
    return []


class SeenDeliveries:
    """The last ``size`` delivery ids: MLflow retries a delivery under the same id; one seen is not published
    twice (per gateway replica: a retry landing on another replica is a duplicate event, which consumers
    tolerate by contract)."""

    def __init__(self, size: int = 4096) -> None:
        self.size, self._ids = size, OrderedDict()

    def first_time(self, delivery: str) -> bool:
        """True the first time ``delivery`` is seen."""
        if delivery in self._ids:
            return False
        self._ids[delivery] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return True
