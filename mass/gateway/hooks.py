"""Router for ``/hooks/mlflow``: MLflow registry webhook deliveries, authenticated by their HMAC signature (not
an API key: MLflow cannot send one), turned into MASS events on the bus. Off (404) without
``MASS_WEBHOOK_SECRET``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from mass.errors import NotFound

router = APIRouter()
_seen = None
_buses: dict[str, Any] = {}


@router.post("/hooks/mlflow", include_in_schema=False)
async def mlflow_webhook(request: Request) -> dict[str, Any]:
    """Verify one delivery and publish its events (source ``mlflow-webhook``)."""
    global _seen
    from mass.events import open_bus
    from mass.events.webhooks import SeenDeliveries, to_events, verify
    from mass.settings import get_settings

    settings = get_settings()
    if not settings.webhook_secret:
        raise NotFound("MLflow webhooks are off on this gateway: set MASS_WEBHOOK_SECRET and register the hook with "
                       "`mass events mlflow-webhook`")
    body = await request.body()
    delivery = verify(settings.webhook_secret, {k.lower(): v for k, v in request.headers.items()}, body)
    events = to_events(body)
    _seen = _seen or SeenDeliveries()
    if not _seen.first_time(delivery):
        return {"delivery": delivery, "published": [], "duplicate": True}

    def publish() -> list[str]:
        bus = _buses.get(settings.events_url)
        if bus is None:
            bus = _buses[settings.events_url] = open_bus(settings.events_url)
        return [bus.publish(kind, data, source="mlflow-webhook").offset for kind, data in events]

    return {"delivery": delivery, "published": await run_in_threadpool(publish)}
