"""The routing contract the gateway and the SDK share: which answer a request for a model gets when the model
is not served, or is served by the other kind of engine (the gateway's routing table holds the rest)."""

from __future__ import annotations

from typing import Iterable

from mass.errors import InvalidRequest, ModelNotFound


def check_served(model: str, engine: str | None, wanted: str, served: Iterable[str]) -> None:
    """The gateway's and the SDK's answer for a model request: ModelNotFound (404) naming the served models
    when ``model`` is not served (``engine`` is None), InvalidRequest (400) when it is the wrong kind."""
    if engine is None:
        raise ModelNotFound(f"model {model!r} is not served here; served models: "
                            f"{', '.join(sorted(served)) or 'none'}", param="model")
    if engine != wanted:
        verb = "text generation" if wanted == "llm" else "embeddings"
        raise InvalidRequest(f"model {model!r} is a {engine} model and does not do {verb}", param="model")
