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


def serve_up(args: AppArgs, address: str | None = None, host: str = "127.0.0.1", port: int = 8000,
             block: bool = True) -> str:
    """Deploy ``args`` as the ``mass`` app; with ``block``, serve until interrupted. Returns the base URL."""
    from ray import serve

    from mass.serving.app import build_app
    from mass.training.job import connect_ray

    connect_ray(address)
    serve.start(http_options={"host": host, "port": port})
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
