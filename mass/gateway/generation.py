"""Shared serving logic of completions and chat: the upstream call, SSE streaming, choices and usage.

Each endpoint family supplies a ``Shape``: how one choice looks in a whole response and in a stream chunk.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, AsyncIterator, Protocol

from fastapi.responses import JSONResponse, StreamingResponse

from mass.errors import raise_if_error
from mass.gateway.errors import call_upstream, error_response, is_upstream_failure, replica_lost
from mass.gateway.protocol import SamplingFields
from mass.gateway.proxy import current_call, upstream
from mass.gateway.state import GatewayState

log = logging.getLogger(__name__)


class Shape(Protocol):
    """The wire shape of one endpoint family's choices."""

    object: str  # of a whole response
    chunk_object: str  # of a stream chunk

    def whole(self, choice: dict[str, Any]) -> dict[str, Any]:
        """One choice of a whole response, from the deployment's choice (index, text, finish, logprobs)."""

    def head(self, index: int) -> dict[str, Any] | None:
        """The first chunk's choice for ``index`` (chat: the assistant role), or None."""

    def delta(self, event: dict[str, Any]) -> dict[str, Any]:
        """One stream chunk's choice from a deployment event."""


async def generate(state: GatewayState, body: SamplingFields, payload: dict[str, Any], choices: int,
                   prefix: str, shape: Shape, request_id: str, caller=None):
    """Run one generation request: a JSON response, or SSE chunks ending with ``[DONE]``.

    Args:
        payload: ``prompts``/``messages`` (and ``echo``) for the LLM deployment, with ``sampling``.
        choices: how many choices the request makes (prompts x n), for the stream's first chunks.
        prefix: response id prefix (``cmpl``, ``chatcmpl``).
        request_id: the request's ``X-Request-Id`` (set by Serve/HAProxy, or by the proxy middleware when
            none came); the response id is ``<prefix>-<request id>``.
        caller: the request's API key (None with auth off): a model it may not call is not found.
    """
    route = state.route(body.model, "llm", caller)  # limits are checked by the model deployment, for SDK calls too
    request = {**payload, "n": body.n or 1}
    call = current_call()
    if call is not None and call.key is not None and call.key.limited:  # the token bound needs the context
        context = (await state.facts(route))["context_length"]
        await state.admit(call, reserve_tokens(request, context))
    rid, created = f"{prefix}-{request_id}", int(time.time())
    timeout, retry = state.args.gateway.request_timeout_s, state.args.gateway.retry_after_s
    base = {"id": rid, "created": created, "model": body.model}
    if not body.stream:
        async def whole(candidate) -> dict[str, Any]:
            return raise_if_error(await upstream(call_upstream(candidate.target.generate.remote(request), timeout,
                                                               candidate.args.name, retry)))

        result, answered = await state.call(route, whole)
        _count(call, result["usage"])
        return JSONResponse({**base, **_fingerprint(call, answered), "model": answered.args.name, "object": shape.object,
                             "choices": [shape.whole(c) for c in result["choices"]], "usage": result["usage"]})

    if call is not None:
        call.streamed = True

    def opener(request: dict[str, Any]):
        async def opened(candidate):
            """The stream and its first choice event: a failure until then (a lost replica included) can still
            be retried or sent to a fallback, since nothing has reached the client."""
            stream = candidate.target.options(stream=True).stream.remote(request)
            name = candidate.args.name
            try:  # the first event surfaces request errors (context overflow...) as a status, not a broken stream
                first = await upstream(call_upstream(stream.__anext__(), timeout, name, retry))
                raise_if_error(first)
                if "prompt_tokens" in first:  # the request was accepted: its prompt size, then the choices
                    if call is not None:
                        call.prompt_tokens = first["prompt_tokens"]
                    first = await upstream(call_upstream(stream.__anext__(), timeout, name, retry))
            except StopAsyncIteration:
                first = None
            except BaseException:
                stream.cancel()
                raise
            return stream, first
        return opened

    (stream, first), answered = await state.call(route, opener(request), record=False)
    base.update(_fingerprint(call, answered), model=answered.args.name, object=shape.chunk_object)

    async def events() -> AsyncIterator[str]:
        nonlocal stream
        failed, resumed = False, False
        progress = _Progress(choices, echo=bool(request.get("echo")))
        try:
            heads = [h for h in (shape.head(i) for i in range(choices)) if h is not None]
            if heads:
                yield _sse({**base, "choices": heads})
            event, usage = first, None
            while event is not None:
                if "usage" in event:
                    usage = event["usage"]
                    _count(call, usage)
                else:
                    if call is not None:  # a stream cut short is charged the tokens it produced
                        call.completion_tokens += len(event.get("token_ids") or ())
                    progress.saw(event)
                    if event["text"] or event["finish_reason"] or event["logprobs"]:
                        yield _sse({**base, "choices": [shape.delta(event)]})
                try:
                    event = await upstream(call_upstream(stream.__anext__(), timeout, answered.args.name, retry))
                except StopAsyncIteration:
                    event = None
                except Exception as exc:
                    if resumed or not replica_lost(exc):
                        raise
                    # its replica died mid-stream: the same model continues it on another replica from the tokens
                    # the client already has (not a fallback: another model's tokens would not fit)
                    resumed = True
                    log.warning("model %r lost a replica mid-stream; resuming %d choices on another replica",
                                answered.args.name, progress.unfinished())
                    answered.breaker.record(True)
                    stream.cancel()
                    (stream, event), _ = await state.call(answered, opener({**request, "resume": progress.resume()}),
                                                          record=False, fallbacks=False)
            if body.include_usage and usage is not None:
                yield _sse({**base, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        except Exception as exc:  # mid-stream failure (a lost replica: upstream_unavailable): an error event
            failed = is_upstream_failure(exc)
            yield _sse(json.loads(error_response(exc).body))
        finally:
            answered.breaker.record(failed)
            stream.cancel()  # no-op when finished; frees the engine slots when the client went away

    return StreamingResponse(events(), media_type="text/event-stream")


class _Progress:
    """What a stream's client has received per choice: the token ids, the characters of generated text and
    whether the choice finished, so a stream whose replica died can be resumed where it stopped."""

    def __init__(self, choices: int, echo: bool) -> None:
        self.ids: list[list[int]] = [[] for _ in range(choices)]
        self.sent = [0] * choices
        self.finished = [False] * choices
        self.echoed = [not echo] * choices  # with echo, each choice's first event is its prompt

    def saw(self, event: dict[str, Any]) -> None:
        """Account one choice event the client is sent (or that carried only held-back tokens)."""
        i = event["index"]
        if not self.echoed[i]:
            self.echoed[i] = True
            return
        self.ids[i] += event.get("token_ids") or []
        self.sent[i] += len(event["text"])
        self.finished[i] = self.finished[i] or event["finish_reason"] is not None

    def unfinished(self) -> int:
        """Choices still generating."""
        return self.finished.count(False)

    def resume(self) -> list[dict[str, Any]]:
        """The deployment's ``resume`` field: every choice's progress."""
        return [{"index": i, "token_ids": list(ids), "sent": sent, "finished": done, "echoed": echoed}
                for i, (ids, sent, done, echoed) in enumerate(zip(self.ids, self.sent, self.finished, self.echoed))]


def reserve_tokens(request: dict[str, Any], context: int) -> int:
    """An upper bound of the tokens a generation request can use, reserved against its key's limits before it
    runs (and settled to the real count after): per prompt, its tokens (a text's UTF-8 bytes + 2 — a byte-level
    or WordPiece token covers at least one byte —, a chat's messages plus a template allowance; at most the
    context) plus ``n`` x ``max_tokens`` (unset: the context)."""
    n = request.get("n") or 1
    max_tokens = (request.get("sampling") or {}).get("max_tokens") or context
    if "messages" in request:
        prompts = [sum(len(m.get("role", "").encode()) + len(str(m.get("content") or "").encode()) + 8
                       for m in request["messages"]) + 16]
    else:
        prompts = [len(p) if not isinstance(p, str) else len(p.encode()) + 2 for p in request["prompts"]]
    return sum(min(p, context) + n * min(max_tokens, context) for p in prompts)


def _count(call, usage: dict[str, int]) -> None:
    """Record a response's usage on its call (what its key is charged)."""
    if call is not None:
        call.prompt_tokens, call.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _fingerprint(call, answered) -> dict[str, str]:
    """``system_fingerprint`` naming the registered version that answered (managed models), else nothing."""
    if call is None or call.version is None:
        return {}
    return {"system_fingerprint": f"{answered.args.name}/v{call.version}"}
