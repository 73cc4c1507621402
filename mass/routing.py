"""The routing contract the gateway and the SDK share: which answer a request for a model gets when the model
is not served, or is served by the other kind of engine (the gateway's routing table holds the rest), and
which failures mean its replica was lost (retried, or resumed)."""

from __future__ import annotations

from typing import Iterable

from mass.errors import InvalidRequest, ModelNotFound, ModelOffline


#: what a model of each engine does: ``llm`` (text generation) or ``embedding``
KINDS = {"llm": "llm", "vllm": "llm", "embedding": "embedding"}


def check_served(model: str, engine: str | None, wanted: str, served: Iterable[str]) -> None:
    """The gateway's and the SDK's answer for a model request: ModelNotFound (404) naming the served models
    when ``model`` is not served (``engine`` is None), InvalidRequest (400) when its engine is of the other kind
    than ``wanted`` (``llm`` or ``embedding``)."""
    if engine is None:
        raise ModelNotFound(f"model {model!r} is not served here; served models: "
                            f"{', '.join(sorted(served)) or 'none'}", param="model")
    engine = KINDS.get(engine, engine)
    if engine != wanted:
        verb = "text generation" if wanted == "llm" else "embeddings"
        raise InvalidRequest(f"model {model!r} is a {engine} model and does not do {verb}", param="model")


def check_online(model: str, offline: dict | None) -> None:
    """ModelOffline (404) naming who took ``model`` offline, when and why (``offline``: the lifecycle's record,
    None while it is served)."""
    if offline is None:
        return
    reason = offline.get("reason")
    raise ModelOffline(f"model {model!r} was taken offline by {offline.get('actor', 'an operator')} at "
                       f"{str(offline.get('at', '?'))[:19]}{': ' + reason if reason else ''}; "
                       f"`mass models online {model}` serves it again", param="model")


def replica_lost(exc: BaseException) -> bool:
    """True when ``exc`` says the model replica (its actor, worker or node) died or cannot be reached."""
    import ray.exceptions as rex
    from ray.serve import exceptions as sex

    lost = (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, sex.ReplicaUnavailableError,
            sex.DeploymentUnavailableError)
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, lost):
            return True
        exc, seen = exc.__cause__ or getattr(exc, "cause", None), seen + 1
    return False
