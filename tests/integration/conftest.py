"""One real Ray cluster (``ray start --head``) and one MASS_HOME for the whole integration session."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import pytest

from tests.integration.support import SMOKE, VENV_BIN, free_port, wait_for


@dataclass(frozen=True)
class Cluster:
    gcs_address: str
    dashboard_url: str
    env: dict


@pytest.fixture(scope="session")
def session_home(tmp_path_factory):
    """MASS_HOME for the session, exported so Ray (started later) and subprocesses inherit it."""
    home = tmp_path_factory.mktemp("mass-session")
    saved = {k: os.environ.get(k) for k in ("MASS_HOME", "MASS_TRACKING_URI", "MASS_ARTIFACT_ROOT",
                                             "MASS_STORAGE_PATH", "MASS_DATABASE_URL", "MASS_EVENTS_URL", "RAY_ADDRESS")}
    os.environ["MASS_HOME"] = str(home)
    for key in saved:
        if key != "MASS_HOME":
            os.environ.pop(key, None)
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_cluster(session_home):
    """A head node started the way the README shows (own ports, MASS_SERVE_INGRESS's Serve switches; token
    auth off for the tests). A stopped gateway replica drains for 3 s, not Ray's 30 (HAProxy is on this node:
    nothing slower has to deregister it), so deleting an app with a gateway does not cost every test 30 s."""
    port, dash = free_port(), free_port()
    from mass.settings import get_settings, ray_start_env

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{VENV_BIN}:{os.environ['PATH']}", **ray_start_env(get_settings()),
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3"}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    cmd = [str(VENV_BIN / "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
           "--dashboard-host=127.0.0.1", "--num-cpus=4", "--include-dashboard=true", "--disable-usage-stats"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=180)
    cluster = Cluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", env)

    def dashboard_up():
        import urllib.request

        try:
            with urllib.request.urlopen(f"{cluster.dashboard_url}/api/version", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    wait_for(dashboard_up, 120, "the Ray dashboard / job server")
    import ray

    ray.init(address=cluster.gcs_address, configure_logging=False, log_to_driver=False)
    yield cluster
    ray.shutdown()
    subprocess.run([str(VENV_BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def corpus(session_home):
    """The docstring corpus in the session MASS_HOME."""
    from mass.data.corpus import build_corpus

    return build_corpus(progress=False)


@pytest.fixture(scope="session")
def trained(ray_cluster, corpus):
    """The smoke recipe trained once on the session cluster (tiny-gpt/1)."""
    from mass.training.config import TrainConfig
    from mass.training.job import run_training

    return run_training(TrainConfig.load(SMOKE), address=ray_cluster.gcs_address)


@pytest.fixture(scope="session")
def api_key(session_home):
    """An admin API key in the session's platform database, exported as ``MASS_API_KEY``."""
    from mass.access.keys import KeyStore

    saved = os.environ.get("MASS_API_KEY")
    _, secret = KeyStore().create({"name": "integration", "admin": True})
    os.environ["MASS_API_KEY"] = secret
    yield secret
    if saved is None:
        os.environ.pop("MASS_API_KEY", None)
    else:
        os.environ["MASS_API_KEY"] = saved


@pytest.fixture(scope="session")
def gateway(trained, ray_cluster, api_key):
    """demo.yaml (tiny-gpt + MiniLM behind the gateway) served on the session cluster; its base URL."""
    from ray import serve

    from mass.app import APP_NAME, build_app, load_app_args, wait_ready
    from mass.registry import ModelRegistry
    from mass.registry.imports import import_minilm
    from tests.integration.support import ROOT

    import_minilm(ModelRegistry())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = load_app_args(ROOT / "serve_apps" / "configs" / "demo.yaml")
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, timeout=240)
    yield url
    serve.delete(APP_NAME)
    serve.shutdown()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A real HF directory: a 1-layer GPT-2 and a BPE tokenizer trained on the json module's docs."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from mass.data.corpus import collect_documents
    from mass.data.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tiny-hf")
    tok = train_tokenizer([d["text"] for d in collect_documents(["json"], progress=False)], vocab_size=320)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
