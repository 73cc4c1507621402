"""`pip install mass-platform` (no extras) is the SDK and the CLI client: no torch, Ray or MLflow; it calls a
served model over HTTP, and a platform command names the extra it needs."""

from __future__ import annotations

import subprocess
import sys

from tests.integration.support import ROOT

SDK = """
import sys
import mass
out = mass.Client(base_url=sys.argv[1], via="http").complete("tiny-gpt", "Return the", max_tokens=4, temperature=0)
heavy = sorted(m for m in ("torch", "ray", "mlflow", "transformers", "numpy") if m in sys.modules)
print(out.completion_tokens, heavy)
"""


def test_the_base_install_is_a_light_client(gateway, tmp_path):
    venv = tmp_path / "light"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(ROOT)], capture_output=True,
                         text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    py = venv / "bin" / "python"
    absent = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True)
    assert absent.returncode != 0  # the base install brought no torch
    sdk = subprocess.run([str(py), "-c", SDK, gateway], capture_output=True, text=True, timeout=120)
    assert sdk.returncode == 0 and sdk.stdout.split(None, 1) == ["4", "[]\n"], sdk.stdout + sdk.stderr[-2000:]
    assert subprocess.run([str(venv / "bin" / "mass"), "--help"], capture_output=True).returncode == 0
    listing = subprocess.run([str(venv / "bin" / "mass"), "models", "list"], capture_output=True, text=True,
                             timeout=120)
    assert listing.returncode == 1 and "pip install 'mass-platform[all]'" in listing.stderr, listing.stderr
