"""The gateway in-process: ``create_app`` over the real deployment classes, engines and models, with Ray
Serve's handle (a third-party boundary) replaced by a direct call in this process.

Used by the unit tier's gateway tests (error table, SSE framing, OpenAI fields, the fuzzer), so most
gateway cases run in seconds without a cluster. The live Serve path is covered by tests/integration.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any


class LocalHandle:
    """What the gateway uses of a ``DeploymentHandle``: ``options(...)`` and ``method.remote(...)``."""

    def __init__(self, target: Any, stream: bool = False) -> None:
        self._target, self._stream = target, stream  # private: the deployment's methods share this namespace

    def options(self, stream: bool = False, **_: Any) -> "LocalHandle":
        """Serve's options; ``stream`` is the only one that changes the call."""
        return LocalHandle(self._target, stream)

    def __getattr__(self, name: str) -> "_Method":
        return _Method(getattr(self._target, name), self._stream)


class _Method:
    def __init__(self, fn, stream: bool) -> None:
        self.fn, self.stream = fn, stream

    def remote(self, *args: Any):
        if self.stream:
            return _Stream(self.fn(*args))

        async def call():
            out = self.fn(*args)
            return await out if inspect.isawaitable(out) else out

        return asyncio.get_running_loop().create_task(call())  # awaitable, with cancel()


class _Stream:
    """A ``DeploymentResponseGenerator``: ``__anext__`` and a synchronous ``cancel``."""

    def __init__(self, agen) -> None:
        self.agen = agen

    def __aiter__(self):
        return self

    def __anext__(self):
        return self.agen.__anext__()

    def cancel(self) -> None:
        asyncio.get_running_loop().create_task(self.agen.aclose())


def _unbatched(server) -> None:
    """``@serve.batch`` needs a Serve replica context; in-process each call is its own batch (the gateway's
    coalescer still merges concurrent requests before they reach the deployment)."""
    async def embed_batch(texts):
        return server._run_batch([texts])[0]

    server._embed_batch = embed_batch


def build_state(app_args: dict[str, Any], models: dict[str, tuple[Any, Any]], keys: Any = None,
                app: str = "mass"):
    """A GatewayState for ``app_args`` whose handles call real deployment objects built over ``models``
    (served name -> (model, tokenizer)); ``keys``: its API key store; ``app``: the Serve app name it plays."""
    from mass.gateway.state import GatewayState
    from mass.serving.args import AppArgs
    from mass.serving.deployments import EmbeddingServer, LLMServer, Served

    args = AppArgs.model_validate(app_args)
    handles = {}
    for m in args.models:
        cls = (LLMServer if m.engine == "llm" else EmbeddingServer).func_or_class
        server = cls(m.model_dump(), Served(m, loaded=(*models[m.name], f"{m.name}/1")))
        if m.engine == "embedding":
            _unbatched(server)
        handles[m.name] = LocalHandle(server)
    return GatewayState(handles, args, keys=keys, app=app)


def served(state, name: str):
    """The ``Served`` model behind ``name`` in an in-process state (its engine, tokenizer)."""
    return state.routes[name].handle._target.served
