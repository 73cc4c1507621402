"""The composition root: the Serve application (gateway + one deployment per served model) built from
``AppArgs``, and ``serve_up``, which deploys it on a Ray cluster and waits until it answers. It sits above
``mass.gateway`` and ``mass.serving``, which do not import each other's app wiring."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mass.config import load_config
from mass.errors import MassError
from mass.serving.args import AppArgs

log = logging.getLogger(__name__)

APP_NAME = "mass"


def build_app(args: AppArgs | dict[str, Any]):
    """A bound Serve application for ``args`` (validated; ConfigError names the bad field)."""
    from mass.gateway.app import Gateway
    from mass.serving.deployments import actor_options, bind_app_models

    if not isinstance(args, AppArgs):
        args = load_config(AppArgs, data=args)
    handles = bind_app_models(args)
    gw = args.gateway
    options = actor_options(gw.num_cpus)
    # The gateway calls its models asynchronously only: its handles' router can run on the replica's own loop,
    # saving a thread hop per call and per streamed item (MASS keeps Ray's separate router loop elsewhere, where
    # synchronous handle calls need it; see SERVE_INGRESS_ENV).
    options["runtime_env"]["env_vars"]["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] = "0"
    return Gateway.options(ray_actor_options=options, num_replicas=gw.replicas,
                           max_ongoing_requests=gw.max_ongoing_requests).bind(handles, args.model_dump())


def load_app_args(path: str | Path, overrides: list[str] | None = None) -> AppArgs:
    """``AppArgs`` from a YAML file (either the args themselves or a Serve config's first app args)."""
    from mass.config import read_yaml

    data = read_yaml(path)
    if "applications" in data:
        data = (data["applications"] or [{}])[0].get("args", {})
    return load_config(AppArgs, data=data, overrides=overrides)


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

    need = args.gateway.num_cpus * args.gateway.replicas
    need += sum(m.num_cpus * start(m.autoscaling) for m in args.models if m.pool is None)
    used_pools = {m.pool for m in args.models if m.pool}
    need += sum(p.num_cpus * start(p.autoscaling) for p in args.pools if p.name in used_pools)
    return need


def check_app_resources(args: AppArgs) -> None:
    """Fail fast, naming the numbers, when the cluster cannot place the app's replicas."""
    from mass.cluster import require

    require("CPU", required_cpus(args), "the app (gateway.num_cpus x gateway.replicas + each model's num_cpus x "
            "its starting replicas)", "lower num_cpus in the config or add nodes", "num_cpus")


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


def running_serve() -> tuple[str, int] | None:
    """(host, port) of the HTTP ingress of the Serve running on the connected cluster, or None."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else (client.http_config.host, client.http_config.port)


def serve_up(args: AppArgs, address: str | None = None, host: str = "127.0.0.1", port: int | None = 8000,
             block: bool = True, name: str = APP_NAME, route_prefix: str = "/") -> str:
    """Deploy ``args`` as the Serve app ``name`` at ``route_prefix``; with ``block``, serve until interrupted
    (then delete the app). Returns the base URL.

    ``port=None`` takes the port of a Serve already running on the cluster, or a free one for a new Serve;
    a port other than the running Serve's is refused (ConfigError naming it)."""
    from ray import serve

    from mass.cluster import connect_ray, free_port

    connect_ray(address)
    check_app_resources(args)
    if port is None:
        host, port = running_serve() or (host, free_port())
    serve.start(http_options={"host": host, "port": port})
    check_http_options(host, port)
    serve.run(build_app(args), name=name, route_prefix=route_prefix)
    url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    wait_ready(url)
    log.info("serving %s at %s/v1", ", ".join(m.name for m in args.models), url)
    if block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(name)
    return url
