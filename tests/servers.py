"""Servers of a test's own, on free ports — a PostgreSQL (``initdb`` + ``pg_ctl``, as the ``postgres`` user when the
tests run as root) and a Redis (``redis-server``): fault tests stop and restart these, never the machine's."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path


class PrivatePostgres:
    """``start()``/``stop()``; ``url`` is a SQLAlchemy URL to its ``postgres`` database."""

    def __init__(self, port: int) -> None:
        # its own directory under /tmp: pytest's tmp_path is private to root, which the postgres user cannot enter
        self.root = Path(tempfile.mkdtemp(prefix="mass-pg-"))
        self.data, self.port = self.root / "pgdata", port
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        self._run(["initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])

    def _run(self, cmd: list[str]) -> None:
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        """Start and wait until it accepts connections."""
        self._run(["pg_ctl", "-D", str(self.data), "-w", "-l", str(self.data / "log"), "-o",
                   f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1", "start"])

    def stop(self) -> None:
        """Stop at once (as a crash would)."""
        self._run(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"])

    def remove(self) -> None:
        """Stop if running, and delete its files."""
        subprocess.run(["pg_ctl", "-D", str(self.data), "-m", "immediate", "stop"] if os.geteuid() else
                       ["runuser", "-u", "postgres", "--", "pg_ctl", "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def postgres_available() -> bool:
    """initdb and pg_ctl are installed."""
    return shutil.which("initdb") is not None and shutil.which("pg_ctl") is not None


class PrivateRedis:
    """``start()``/``stop()`` a redis-server; ``url`` points at it. Without persistence, or ``durable``: an
    append-only file synced on every write (what survives a restart is exactly what was acknowledged)."""

    def __init__(self, port: int, durable: bool = False) -> None:
        self.port, self.url, self.proc = port, f"redis://127.0.0.1:{port}/0", None
        self.durable = durable
        self.dir = tempfile.mkdtemp(prefix="mass-redis-")

    def up(self) -> bool:
        """It answers PING."""
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def start(self) -> None:
        """Start and wait until it answers."""
        import time

        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      *persistence, "--dir", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.up():
            if time.monotonic() > deadline:
                raise RuntimeError(f"private redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill it (as a crash would)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def remove(self) -> None:
        """Stop and delete its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_available() -> bool:
    """redis-server is installed."""
    return shutil.which("redis-server") is not None
