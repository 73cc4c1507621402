"""The Ray cluster as training and serving both use it: connect (or start a local Ray), check that it can ever
hold what a job asks for, and pick free ports for servers started beside it."""

from __future__ import annotations

from mass.errors import InsufficientResources, MassError
from mass.settings import Settings, apply_ray_start_env, get_settings


def connect_ray(address: str | None = None, settings: Settings | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local Ray when neither is set."""
    import ray

    if ray.is_initialized():
        return
    settings = settings or get_settings()
    target = address or settings.ray_address or "local"
    if target == "local":  # the Ray started here inherits this process's environment
        apply_ray_start_env(settings)
        _interpreter_first_on_path()
    ray.init(address=target, configure_logging=False)


def _interpreter_first_on_path() -> None:
    """A Ray job's entrypoint runs ``python`` from the PATH of the Ray it goes to: for a local Ray started here,
    make that this interpreter (as activating its venv would), not whatever ``python`` the shell had."""
    import os
    import sys
    from pathlib import Path

    here = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != here:
        os.environ["PATH"] = os.pathsep.join([here, path]) if path else here


def require(resource: str, need: float, asks: str, fix: str, field: str) -> None:
    """InsufficientResources when the cluster has fewer than ``need`` of ``resource`` (``CPU``, ``GPU``) in all.

    ``asks`` says who needs them (``"scaling.num_workers=4 x ..."``), ``fix`` what to change; both are in the
    message, which names both numbers."""
    import ray

    have = ray.cluster_resources().get(resource, 0)
    if need > have:
        raise InsufficientResources(f"{asks} needs {need:g} {resource}s but the cluster has {have:g}; {fix}",
                                    field=field, need=need, have=have)


def free_port(low: int = 20000, high: int = 29999) -> int:
    """A TCP port nobody listens on, for a server started later.

    Picked from ``low..high`` rather than by binding port 0: the kernel hands out port-0 ports from its
    ephemeral range (32768-60999 here), where any outgoing connection made before the server starts can
    take the same port as its local end (seen: HAProxy failing to bind its port during ``serve.start``).
    The default range also stays clear of Ray's worker ports (10002-19999) and Serve's direct-ingress
    ports (30000-31000, 40000-41000), and of Redis's 6379.
    """
    import random
    import socket

    for port in random.sample(range(low, high + 1), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise MassError(f"no free TCP port between {low} and {high}")


def worker_error(exc: BaseException) -> str:
    """The error a Ray Train worker raised, out of the report Ray Train wraps it in (its last ``...Error: ...``
    line; Ray's own first line, "Training failed due to worker errors:", names nothing)."""
    import re

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt): ", line)]
    return raised[-1] if raised else (lines[0] if lines else type(exc).__name__)
