"""Property-based fuzzing of the in-process gateway from its own ``/openapi.json`` (schemathesis): valid and
invalid requests alike get no 5xx, only the statuses and content types the document declares, bodies
that match it, and every request the document forbids is refused."""

from __future__ import annotations

import collections

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
def serve_the_models(gateway_client, unit_keys):
    APP.state.mass = gateway_client.app.state.mass
    global ADMIN
    ADMIN = unit_keys["admin"]


STATUSES: dict[str, set[int]] = collections.defaultdict(set)  # path -> statuses the fuzzer saw
ADMIN = ""  # the session's admin key: the fuzzer reaches every route (the admin API too) authenticated


@schema.auth()
class AdminKey:
    """The bearer scheme the document declares, satisfied with the session's admin key."""

    def get(self, case, context):
        return ADMIN

    def set(self, case, data, context):
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@schema.parametrize()
@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_the_gateway_keeps_every_promise_of_its_openapi_document(case):
    aim_at_served_models(case)
    response = case.call_and_validate(checks=CHECKS)
    STATUSES[case.path].add(response.status_code)


def aim_at_served_models(case) -> None:
    """Point generated requests at the models that are served (a random name only finds the 404), so the
    generated sampling fields reach the engines; a ``model`` of the wrong type is left for the negative cases."""
    target = {"/v1/completions": "tiny-gpt", "/v1/chat/completions": "tiny-gpt", "/v1/embeddings": "minilm"}
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str) and case.path in target:
        case.body["model"] = target[case.path]
    if case.path == "/v1/models/{model}" and case.path_parameters and hash(case.path_parameters["model"]) % 2:
        case.path_parameters["model"] = "tiny-gpt"


def test_the_fuzzer_got_past_authentication():
    """The generated requests carried the admin key: every family answered 200 to some of them."""
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/admin/keys"):
        assert 200 in STATUSES[path] or 201 in STATUSES[path], (path, STATUSES[path])
