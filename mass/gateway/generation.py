"""Shared serving logic of completions and chat: limits, upstream calls, SSE streaming, usage."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi.responses import JSONResponse, StreamingResponse

from mass.errors import MassError
from mass.gateway.errors import call_upstream, error_response
from mass.gateway.protocol import SamplingFields
from mass.gateway.state import GatewayState

Chunk = Callable[[str, str | None, bool], dict[str, Any]]


async def generate(state: GatewayState, body: SamplingFields, payload: dict[str, Any], prefix: str,
                   full: Callable[[dict[str, Any], str, int], dict[str, Any]], chunk: Callable[..., dict[str, Any]]):
    """Run one generation request: a JSON response, or SSE chunks ending with ``[DONE]``.

    Args:
        payload: ``prompt`` or ``messages`` for the LLM deployment (sampling is added here).
        prefix: response id prefix (``cmpl``, ``chatcmpl``).
        full: builds the non-streaming body from (engine result, id, created).
        chunk: builds one stream chunk from (id, created, text, finish_reason, first, usage).
    """
    route = state.route(body.model, "llm")  # limits are checked by the model deployment, for SDK calls too
    request = {**payload, "sampling": body.sampling()}
    rid, created = f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
    timeout, retry = state.args.gateway.request_timeout_s, state.args.gateway.retry_after_s
    if not body.stream:
        result = await call_upstream(route.target.generate.remote(request), timeout, body.model, retry)
        raise_if_error(result)
        return JSONResponse(full(result, rid, created), headers={"X-Request-Id": rid})

    stream = route.target.options(stream=True).stream.remote(request)
    try:  # the first event surfaces request errors (context overflow...) as a status, not a broken stream
        first = await call_upstream(stream.__anext__(), timeout, body.model, retry)
    except StopAsyncIteration:
        first = None
    except BaseException:
        stream.cancel()
        raise
    if first is not None and "error" in first:
        stream.cancel()
        raise_if_error(first)
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    async def events() -> AsyncIterator[str]:
        try:
            yield _sse(chunk(rid, created, "", None, True, None))
            event = first
            while event is not None:
                if event["text"] or event["finish_reason"]:
                    yield _sse(chunk(rid, created, event["text"], event["finish_reason"], False, None))
                if event["finish_reason"] is not None:
                    if include_usage:
                        yield _sse(chunk(rid, created, None, None, False, usage(event)))
                    break
                try:
                    event = await call_upstream(stream.__anext__(), timeout, body.model, retry)
                except StopAsyncIteration:
                    break
            yield "data: [DONE]\n\n"
        except Exception as exc:  # mid-stream failure: an error event, then the stream ends
            yield _sse(json.loads(error_response(exc).body))
        finally:
            stream.cancel()  # no-op when finished; frees the engine slot when the client went away

    return StreamingResponse(events(), media_type="text/event-stream", headers={"X-Request-Id": rid})


def raise_if_error(result: dict[str, Any]) -> None:
    """Re-raise an error the model deployment returned as the same MassError class."""
    if "error" in result:
        raise MassError.from_dict(result["error"])


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def usage(result: dict[str, Any]) -> dict[str, int]:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}

