"""``mass.Client``: call served models from Python — Serve handles inside the Ray cluster, HTTP outside.

Both transports return the same results and raise the same ``MassError`` classes. The SDK talks to the
gateway's HTTP API or to the model deployments directly; it never imports the gateway.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Literal

from mass.app import APP_NAME
from mass.errors import InvalidRequest, MassError, raise_if_error
from mass.routing import replica_lost
from mass.sampling import SamplingParams

log = logging.getLogger(__name__)
TABLE_TTL_S = 1.0  # how long the SDK trusts a routing table that holds managed models (their weights move)


@dataclass(frozen=True)
class Completion:
    """Generated text with its finish reason and token counts."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


def _openai_fields(params: SamplingParams) -> dict[str, Any]:
    """The OpenAI request fields of ``params`` (what the gateway turns back into the same SamplingParams)."""
    fields = params.to_dict()
    fields.pop("logprobs")
    return {k: v for k, v in fields.items() if v not in (None, [], {})}


class Client:
    """A client for the models MASS serves.

    Args:
        base_url: the gateway for HTTP (default ``MASS_GATEWAY_URL``).
        via: ``handle`` (Serve handles; needs Ray), ``http``, or ``auto`` (handles when this process is
            connected to a Ray cluster that runs the app, HTTP otherwise).
        app_name: the Serve application to call through handles.
        timeout_s: per-request timeout.
        api_key: the MASS API key sent to the gateway (default ``MASS_API_KEY``). Handle calls inside the Ray
            cluster need none: the cluster's own authentication guards them.
    """

    def __init__(self, base_url: str | None = None, via: Literal["auto", "handle", "http"] = "auto",
                 app_name: str = APP_NAME, timeout_s: float = 60.0, api_key: str | None = None) -> None:
        from mass.settings import get_settings

        settings = get_settings()
        self.base_url = (base_url or settings.gateway_url).rstrip("/")
        self.api_key = api_key or settings.api_key or None
        self.app_name = app_name
        self.timeout_s = timeout_s
        self._table: dict[str, dict[str, Any]] | None = None
        self._table_at = 0.0
        self._pending: list[Any] = []
        self._report: dict[str, dict[str, dict[str, Any]]] = {}  # managed models' outcomes, sent with the next table read
        self.via = self._pick(via)

    def _pick(self, via: str) -> str:
        if via != "auto":
            return via
        try:
            import ray
        except ImportError:
            return "http"
        if not ray.is_initialized():
            return "http"
        from ray import serve

        try:
            return "handle" if self.app_name in serve.status().applications else "http"
        except Exception:  # no Serve controller on this cluster
            return "http"

    # ------------------------------------------------------------------ public API
    def models(self) -> list[str]:
        """Ids of the served models."""
        if self.via == "http":
            return [m["id"] for m in self._post_or_get("GET", "/v1/models")["data"]]
        return sorted(self._routes())

    def complete(self, model: str, prompt: str, max_tokens: int = 16, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, stop: str | list[str] | None = None,
                 **sampling: Any) -> Completion:
        """Complete ``prompt``. More ``SamplingParams`` fields (``presence_penalty``, ``frequency_penalty``,
        ``logit_bias``) pass as keywords; every value is checked here, before anything is sent."""
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                stop=stop or (), **sampling)
        if self.via == "http":
            body = self._post_or_get("POST", "/v1/completions",
                                     {"model": model, "prompt": prompt, **_openai_fields(params)})
            return _from_openai(body, body["choices"][0]["text"])
        return _from_engine(self._call(model, "llm", "generate", {"prompts": [prompt],
                                                                   "sampling": params.to_dict()}))

    def chat(self, model: str, messages: str | list[dict[str, str]], max_tokens: int = 16,
             temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
             stop: str | list[str] | None = None, **sampling: Any) -> Completion:
        """Answer a chat (a string is one user message); keywords as for ``complete``."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                stop=stop or (), **sampling)
        if self.via == "http":
            body = self._post_or_get("POST", "/v1/chat/completions",
                                     {"model": model, "messages": messages, **_openai_fields(params)})
            return _from_openai(body, body["choices"][0]["message"]["content"])
        return _from_engine(self._call(model, "llm", "generate", {"messages": messages,
                                                                   "sampling": params.to_dict()}))

    def stream(self, model: str, prompt: str, max_tokens: int = 16, temperature: float = 1.0,
               top_p: float = 1.0, seed: int | None = None, stop: str | list[str] | None = None,
               **sampling: Any) -> Iterator[str]:
        """Yield the completion of ``prompt`` piece by piece; keywords as for ``complete``."""
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                stop=stop or (), **sampling)
        if self.via == "http":
            yield from self._http_stream({"model": model, "prompt": prompt, "stream": True,
                                          **_openai_fields(params)})
            return
        handle, version = self._handle(model, "llm")
        handle = handle.options(stream=True)
        request = {"prompts": [prompt], "sampling": params.to_dict()}
        started, usage, error, first_s = time.perf_counter(), {}, None, None
        ids, sent, lost = [], 0, 0  # what the caller got so far: resumed there when the replica dies
        try:
            while True:
                try:
                    for event in handle.stream.remote(request):
                        raise_if_error(event)
                        usage = event.get("usage", usage)
                        if "index" in event:
                            ids += event.get("token_ids") or []
                            sent += len(event["text"])
                            if event["text"]:
                                first_s = first_s or time.perf_counter()
                                yield event["text"]
                    break
                except Exception as exc:
                    if not replica_lost(exc):
                        raise
                    lost += 1
                    if lost > 2:
                        raise self._lost(model) from exc
                    # like the gateway: retried before any output, resumed from the tokens after (same model)
                    log.warning("model %r lost a replica mid-stream; %s", model, "resuming" if ids else "retrying")
                    if ids or sent:
                        request = {**request, "resume": [{"index": 0, "token_ids": ids, "sent": sent,
                                                          "finished": False}]}
        except MassError as exc:
            error = exc
            raise
        finally:
            failure = error or sys.exc_info()[1]
            if not isinstance(failure, GeneratorExit):  # (the caller stopped reading: no outcome to judge)
                self._observe(model, version, started, failure, first_s)
            self._attribute(model, "stream", started, usage, error)

    def embed(self, model: str, texts: str | list[str]) -> list[list[float]]:
        """One vector per text, in order."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if self.via == "http":
            body = self._post_or_get("POST", "/v1/embeddings",
                                     {"model": model, "input": texts, "encoding_format": "float"})
            return [d["embedding"] for d in body["data"]]
        if not texts or any(not t for t in texts):
            raise InvalidRequest("input must contain at least one non-empty text", field="input")
        return self._call(model, "embedding", "embed", texts)["data"]

    # ------------------------------------------------------------------ API keys (admin API, admin keys only)
    def create_key(self, name: str, models: list[str] | None = None, rpm: int | None = None,
                   tpm: int | None = None, max_parallel: int | None = None, budget: str | None = None,
                   admin: bool = False) -> dict[str, Any]:
        """A new API key (``budget``: ``"1000000/day"`` or ``".../month"``); the result's ``secret`` is shown
        this once."""
        spec = {"name": name, "models": models, "rpm": rpm, "tpm": tpm, "max_parallel": max_parallel,
                "budget": budget, "admin": admin}
        return self._post_or_get("POST", "/admin/keys", {k: v for k, v in spec.items() if v is not None})

    def list_keys(self) -> list[dict[str, Any]]:
        """Every API key (never a secret)."""
        return self._post_or_get("GET", "/admin/keys")["data"]

    def show_key(self, key: str) -> dict[str, Any]:
        """One API key, by name or id."""
        return self._post_or_get("GET", f"/admin/keys/{_q(key)}")

    def update_key(self, key: str, **changes: Any) -> dict[str, Any]:
        """Change a key's ``models``, ``rpm``, ``tpm``, ``max_parallel``, ``budget``, ``name`` or ``admin``
        (None clears a limit)."""
        return self._post_or_get("PATCH", f"/admin/keys/{_q(key)}", changes)

    def revoke_key(self, key: str) -> dict[str, Any]:
        """Revoke a key for good (every gateway replica refuses it within a second)."""
        return self._post_or_get("POST", f"/admin/keys/{_q(key)}/revoke")

    def rotate_key(self, key: str) -> dict[str, Any]:
        """A new secret for a key (in the result's ``secret``); the old one stops working."""
        return self._post_or_get("POST", f"/admin/keys/{_q(key)}/rotate")

    def services(self) -> dict[str, Any]:
        """Every served model's engine, deployment, fallbacks and circuit breaker (state, window counts, recent
        transitions), as the gateway replica that answers sees them (admin keys)."""
        return self._post_or_get("GET", "/admin/services")["data"]

    # ------------------------------------------------------------------ model lifecycle (admin API, admin keys)
    def model_status(self, model: str) -> dict[str, Any]:
        """A model's versions, aliases, traffic split, offline state, rollout plan, generation and operation log."""
        return self._post_or_get("GET", f"/admin/models/{_q(model)}")

    def publish(self, model: str, version: int, reason: str = "", expect: int | None = None) -> dict[str, Any]:
        """Make ``version`` production; ``expect``: fail with Conflict unless the model's generation is still
        this one. Returns the new serving plan (``weights``...)."""
        return self._lifecycle(model, "publish", {"version": version, "reason": reason, "expect": expect})

    def canary(self, model: str, version: int, weight: int | None = None, plan: str | None = None,
               reason: str = "", expect: int | None = None) -> dict[str, Any]:
        """Send ``weight`` % (1-99) of the model's traffic to ``version``, or start a rollout ``plan``
        (``"10:5m,50:5m,100"``)."""
        return self._lifecycle(model, "canary", {"version": version, "weight": weight, "plan": plan,
                                                 "reason": reason, "expect": expect})

    def promote(self, model: str, reason: str = "", expect: int | None = None) -> dict[str, Any]:
        """Make the canary version production."""
        return self._lifecycle(model, "promote", {"reason": reason, "expect": expect})

    def rollback(self, model: str, reason: str = "", expect: int | None = None) -> dict[str, Any]:
        """End the canary; without one, make the previous production version production again."""
        return self._lifecycle(model, "rollback", {"reason": reason, "expect": expect})

    def offline(self, model: str, reason: str = "", expect: int | None = None) -> dict[str, Any]:
        """Take the model offline (its requests get 404 naming it as offline)."""
        return self._lifecycle(model, "offline", {"reason": reason, "expect": expect})

    def online(self, model: str, reason: str = "", expect: int | None = None) -> dict[str, Any]:
        """Serve an offline model again."""
        return self._lifecycle(model, "online", {"reason": reason, "expect": expect})

    def _lifecycle(self, model: str, verb: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._post_or_get("POST", f"/admin/models/{_q(model)}/{verb}",
                                 {k: v for k, v in body.items() if v is not None})

    # ------------------------------------------------------------------ transports
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _routes(self) -> dict[str, dict[str, Any]]:
        """The app's routing table, asked of its gateway (its ingress deployment): once, or every
        ``TABLE_TTL_S`` when the app has managed models (their versions and weights move)."""
        stale = self._table is not None and any("versions" in r for r in self._table.values()) and \
            time.monotonic() - self._table_at > TABLE_TTL_S
        if self._table is None or stale:
            from ray import serve

            report, self._report = self._report, {}
            self._table = serve.get_app_handle(self.app_name).routes.remote(report).result(timeout_s=self.timeout_s)
            self._table_at = time.monotonic()
        return self._table

    def _handle(self, model: str, engine: str):
        """The deployment handle for ``model`` and the version it serves (a managed model's, picked by weight;
        None for others); the gateway's 404/400/503 when it is missing, offline, the wrong kind or has no version
        ready."""
        import random

        from ray import serve

        from mass.errors import Overloaded
        from mass.routing import check_online, check_served

        route = self._routes().get(model)
        if route is not None:
            check_online(model, route.get("offline"))
        check_served(model, route["engine"] if route else None, engine,
                     [n for n, r in self._routes().items() if not r.get("offline")])
        deployment, app, version = route["deployment"], self.app_name, None
        if "versions" in route:
            if not route["versions"]:
                raise Overloaded(f"model {model!r} has no version ready yet; retry in 1s", retry_after=1)
            picked = random.choices(route["versions"], weights=[v["weight"] for v in route["versions"]])[0]
            deployment, app, version = picked["deployment"], picked["app"], picked["version"]
        handle = serve.get_deployment_handle(deployment, app)
        return (handle.options(multiplexed_model_id=model) if route["multiplexed"] else handle), version

    def _observe(self, model: str, version: str | None, started: float, error: BaseException | None,
                 first_s: float | None = None) -> None:
        """Count a finished handle call of a managed model's version for the controller's SLO windows, as the
        gateway counts its own: server-side failures are errors, client errors (4xx) are not counted."""
        if version is None or isinstance(error, MassError) and error.http_status < 500:
            return
        from mass.lifecycle.slo import note

        now = time.perf_counter()
        note(self._report, model, version, error is not None, (now - started) * 1000,
             None if first_s is None else (first_s - started) * 1000)

    def _call(self, model: str, engine: str, method: str, payload: Any) -> dict[str, Any]:
        from ray.serve.exceptions import BackPressureError

        from mass.errors import Overloaded, UpstreamTimeout

        started, result, error = time.perf_counter(), None, None
        handle, version = self._handle(model, engine)
        try:
            for attempt in range(2):  # a replica lost mid-call: retried once (Serve routes it to another)
                response = getattr(handle, method).remote(payload)
                try:
                    result = raise_if_error(response.result(timeout_s=self.timeout_s))
                    break
                except Exception as exc:
                    if not replica_lost(exc):
                        raise
                    if attempt:
                        raise self._lost(model) from exc
                    log.warning("model %r lost a replica mid-request; retrying once", model)
        except BackPressureError as exc:
            error = Overloaded.at_capacity(model, self._routes()[model]["retry_after_s"])
            raise error from exc
        except TimeoutError as exc:
            response.cancel()
            error = UpstreamTimeout.after(model, self.timeout_s)
            raise error from exc
        except MassError as exc:
            error = exc
            raise
        finally:
            usage = (result or {}).get("usage") or {"prompt_tokens": (result or {}).get("prompt_tokens", 0)}
            self._observe(model, version, started, error or sys.exc_info()[1])
            self._attribute(model, method, started, usage, error)
        return result

    def _lost(self, model: str) -> MassError:
        """The error for a call whose replicas kept dying: 503 ``upstream_unavailable``, as the gateway says."""
        from mass.errors import UpstreamUnavailable

        retry = self._routes()[model]["retry_after_s"]
        return UpstreamUnavailable(f"model {model!r} lost the replica serving this request; retry in {retry}s",
                                   retry_after=retry)

    def _attribute(self, model: str, method: str, started: float, usage: dict[str, Any],
                   error: MassError | None) -> None:
        """With an API key, a handle call is recorded in the usage ledger under it (sent to the app's gateway,
        which writes it with its own records; not awaited, so the call pays nothing for it)."""
        if not self.api_key:
            return
        from datetime import datetime, timezone
        from uuid import uuid4

        from ray import serve

        record = {"at": datetime.now(timezone.utc), "request_id": uuid4().hex[:24], "model": model,
                  "path": f"handle:{method}", "status": error.http_status if error else 200,
                  "error_code": error.code if error else None,
                  "prompt_tokens": int(usage.get("prompt_tokens") or 0),
                  "completion_tokens": int(usage.get("completion_tokens") or 0),
                  "latency_ms": (time.perf_counter() - started) * 1000, "overhead_ms": 0.0}
        self._pending = [*self._pending[-15:], serve.get_app_handle(self.app_name).record_usage.remote(
            self.api_key, record)]  # kept referenced until sent

    def _post_or_get(self, verb: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        try:
            resp = httpx.request(verb, self.base_url + path, json=body, timeout=self.timeout_s,
                                 headers=self._headers())
        except httpx.HTTPError as exc:
            raise MassError(f"cannot reach the gateway at {self.base_url}: {exc}", url=self.base_url) from exc
        if resp.status_code >= 400:
            raise _http_error(resp)
        return resp.json()

    def _http_stream(self, body: dict[str, Any]) -> Iterator[str]:
        import httpx

        with httpx.stream("POST", self.base_url + "/v1/completions", json=body, timeout=self.timeout_s,
                          headers=self._headers()) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise _http_error(resp)
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise MassError.from_dict(chunk["error"])
                for choice in chunk.get("choices", []):
                    if choice.get("text"):
                        yield choice["text"]


def _http_error(resp) -> MassError:
    try:
        return MassError.from_dict(resp.json()["error"])
    except (ValueError, KeyError, TypeError):
        return MassError(f"gateway answered {resp.status_code}: {resp.text[:200]}")


def _from_openai(body: dict[str, Any], text: str) -> Completion:
    usage = body["usage"]
    return Completion(text, body["choices"][0]["finish_reason"], usage["prompt_tokens"], usage["completion_tokens"])


def _from_engine(result: dict[str, Any]) -> Completion:
    choice, usage = result["choices"][0], result["usage"]
    return Completion(choice["text"], choice["finish_reason"], usage["prompt_tokens"], usage["completion_tokens"])


def _q(part: str) -> str:
    """One URL path segment."""
    from urllib.parse import quote

    return quote(part, safe="")
