"""Helpers shared by integration tests: ports, polling, CLI subprocesses, JSON result lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SMOKE = ROOT / "jobs" / "configs" / "tiny-gpt-smoke.yaml"


def api_key() -> str:
    """The session's admin API key (created by the ``api_key`` fixture, exported as ``MASS_API_KEY`` so the SDK
    and the ``mass`` CLI send it too)."""
    return os.environ["MASS_API_KEY"]


def auth() -> dict[str, str]:
    """The session key as an ``Authorization`` header."""
    return {"Authorization": f"Bearer {api_key()}"}


def free_port() -> int:
    """A TCP port nobody listens on right now, outside the kernel's ephemeral range and Ray's own ranges."""
    from mass.cluster import free_port as pick

    return pick()


def wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def run_cli(args: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed ``mass`` console script in a subprocess."""
    return subprocess.run([str(VENV_BIN / "mass"), *args], capture_output=True, text=True, timeout=timeout,
                          env=env or os.environ.copy(), cwd=ROOT)


def last_json(stdout: str) -> dict:
    """The last JSON object line a job or CLI printed."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in output:\n{stdout[-2000:]}")
