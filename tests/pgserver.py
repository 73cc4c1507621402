"""A PostgreSQL server of a test's own (``initdb`` + ``pg_ctl`` on a free port, as the ``postgres`` user when the
tests run as root): fault tests stop and restart it, never the machine's server."""

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


def available() -> bool:
    """initdb and pg_ctl are installed."""
    return shutil.which("initdb") is not None and shutil.which("pg_ctl") is not None
