"""Deploy a MASS Serve application on a Ray cluster and wait until it is ready."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request

from mass.errors import MassError
from mass.serving.args import AppArgs

APP_NAME = "mass"


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


def wait_ready(url: str, timeout: float = 300.0) -> dict:
    """Poll ``/readyz`` until every model answers; MassError naming the laggards on timeout."""
    deadline, last = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            last = json.loads(exc.read() or b"{}")
        except OSError:
            pass
        time.sleep(0.5)
    raise MassError(f"app not ready after {timeout:.0f}s: {last.get('models', 'gateway not answering')}")


def required_cpus(args: AppArgs) -> float:
    """CPUs the app needs at its starting replica counts (gateway, dedicated models, used pools)."""
    def start(scaling) -> int:
        return scaling.initial_replicas if scaling.initial_replicas is not None else max(1, scaling.min_replicas)

    need = args.gateway.num_cpus
    need += sum(m.num_cpus * start(m.autoscaling) for m in args.models if m.pool is None)
    used_pools = {m.pool for m in args.models if m.pool}
    need += sum(p.num_cpus * start(p.autoscaling) for p in args.pools if p.name in used_pools)
    return need


def check_resources(args: AppArgs) -> None:
    """Fail fast, naming the numbers, when the cluster cannot place the app's replicas."""
    import ray

    from mass.errors import InsufficientResources

    have = ray.cluster_resources().get("CPU", 0)
    need = required_cpus(args)
    if need > have:
        raise InsufficientResources(
            f"the app needs {need:g} CPUs (gateway.num_cpus + each model's num_cpus x its starting replicas) "
            f"but the cluster has {have:g}; lower num_cpus in the config or add nodes", need=need, have=have)


def check_http_options(host: str, port: int) -> None:
    """Serve keeps the HTTP options it first started with and ignores later ones: refuse up front, naming
    the address the cluster's Serve really listens on, instead of waiting on a port nobody opens."""
    from ray.serve.context import _get_global_client

    from mass.errors import ConfigError

    running = _get_global_client().http_config
    if (running.host, running.port) != (host, port):
        raise ConfigError(f"Serve on this cluster already listens on {running.host}:{running.port} and keeps it; "
                          f"--host/--port {host}:{port} cannot change it. Use --port {running.port} (and --host "
                          f"{running.host}), or stop Serve first (`serve shutdown -y`)", field="port",
                          running=f"{running.host}:{running.port}")


def serve_up(args: AppArgs, address: str | None = None, host: str = "127.0.0.1", port: int = 8000,
             block: bool = True) -> str:
    """Deploy ``args`` as the ``mass`` app; with ``block``, serve until interrupted. Returns the base URL."""
    from ray import serve

    from mass.serving.app import build_app
    from mass.training.job import connect_ray

    connect_ray(address)
    check_resources(args)
    serve.start(http_options={"host": host, "port": port})
    check_http_options(host, port)
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    wait_ready(url)
    print(f"serving {', '.join(m.name for m in args.models)} at {url}/v1", file=sys.stderr, flush=True)
    if block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(APP_NAME)
    return url
