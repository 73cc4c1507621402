"""Property-based fuzzing of the in-process gateway from its own ``/openapi.json`` (schemathesis): valid and
invalid requests alike get no 5xx, only the statuses and content types the document declares, bodies
that match it, and every request the document forbids is refused."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from mass.gateway.app import create_app

APP = create_app()  # the document needs no models; the session's in-process state is attached below
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture(autouse=True)
def serve_the_models(gateway_client):
    APP.state.mass = gateway_client.app.state.mass


@schema.parametrize()
@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_the_gateway_keeps_every_promise_of_its_openapi_document(case):
    aim_at_served_models(case)
    case.call_and_validate(checks=CHECKS)


def aim_at_served_models(case) -> None:
    """Point generated requests at the models that are served (a random name only finds the 404), so the
    generated sampling fields reach the engines; a ``model`` of the wrong type is left for the negative cases."""
    target = {"/v1/completions": "tiny-gpt", "/v1/chat/completions": "tiny-gpt", "/v1/embeddings": "minilm"}
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str) and case.path in target:
        case.body["model"] = target[case.path]
    if case.path == "/v1/models/{model}" and case.path_parameters and hash(case.path_parameters["model"]) % 2:
        case.path_parameters["model"] = "tiny-gpt"
