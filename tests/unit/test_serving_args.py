"""Serve app configs are validated up front; every error names the field."""

from pathlib import Path

import pytest

from mass.app import load_app_args
from mass.config import load_config
from mass.errors import ConfigError, InvalidModelRef
from mass.serving.args import AppArgs

ROOT = Path(__file__).resolve().parents[2]
GOOD = {"models": [{"name": "m", "ref": "tiny-gpt@production", "engine": "llm"}]}


@pytest.mark.parametrize("path", sorted((ROOT / "serve_apps" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_serve_configs_are_valid(path):
    args = load_app_args(path)
    assert args.models and all(m.ref for m in args.models)


@pytest.mark.parametrize("change,needle", [
    ({"engine": "vision"}, "models.0.engine: must be one of 'llm', 'vllm', 'embedding'"),
    ({"num_cpus": -1}, "models.0.num_cpus"),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 1}}, "min_replicas (3) > max_replicas (1)"),
    ({"autoscaling": {"look_back_period_s": 5}}, "look_back_period_s"),
    ({"max_ongoing": 3}, "models.0.max_ongoing: unknown key"),
    ({"engine": "embedding", "batch": {"max_batch_size": 0}}, "models.0.batch.max_batch_size"),
    ({"batch": {"max_batch_size": 8}}, "models.0.batch: unknown key"),  # an LLM has no embedding batching
    ({"engine": "embedding", "max_running": 4}, "models.0.max_running: unknown key"),
    ({"managed": True, "ref": "tiny-gpt/3"}, "a managed model follows its lifecycle aliases, so its ref must be "
                                             "tiny-gpt@production"),
    ({"managed": True, "pool": "p"}, "cannot join pool 'p'"),
    ({"engine": "vllm", "pool": "p"}, "a vLLM engine holds its KV cache for one model; it cannot join pool 'p'"),
    ({"engine": "vllm", "quantization": "nf4"}, "with `engine: vllm` serve a quantized checkpoint"),
    ({"vllm": {"kv_cache_gb": 2}}, "`vllm` settings apply to `engine: vllm` only"),
    ({"engine": "vllm", "vllm": {"kv_cache_gb": 0}}, "models.0.vllm.kv_cache_gb"),
    ({"engine": "vllm", "vllm": {"swap": 1}}, "models.0.vllm.swap: unknown key"),
])
def test_bad_model_args_name_the_field(change, needle):
    data = {"models": [{**GOOD["models"][0], **change}]}
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(AppArgs, data=data)


def test_duplicate_names_and_bad_refs():
    with pytest.raises(ConfigError, match="repeated: \\['m'\\]"):
        load_config(AppArgs, data={"models": GOOD["models"] * 2})
    with pytest.raises(InvalidModelRef):
        load_config(AppArgs, data={"models": [{**GOOD["models"][0], "ref": "bad ref"}]})
    with pytest.raises(ConfigError, match="models: List should have at least 1 item"):
        load_config(AppArgs, data={"models": []})


def test_serve_config_import_path_builds_the_application():
    """What `serve run serve_apps/configs/demo.yaml` imports and calls: one gateway bound to two models."""
    import importlib

    from mass.config import read_yaml

    config = read_yaml(ROOT / "serve_apps" / "configs" / "demo.yaml")
    app_config = config["applications"][0]
    module, attr = app_config["import_path"].split(":")
    app = getattr(importlib.import_module(module), attr)(app_config["args"])
    from ray.serve import Application

    assert isinstance(app, Application)
    assert config["http_options"]["port"] != 6379


def test_pools_are_checked():
    pool = {"name": "small", "engine": "llm"}
    model = {**GOOD["models"][0], "pool": "small"}
    args = load_config(AppArgs, data={"models": [model], "pools": [pool]})
    assert args.deployment_of(args.models[0]) == "pool-small"
    with pytest.raises(ConfigError, match="pool 'big' is not defined"):
        load_config(AppArgs, data={"models": [{**model, "pool": "big"}], "pools": [pool]})
    with pytest.raises(ConfigError, match="cannot join pool 'small'"):
        load_config(AppArgs, data={"models": [{**model, "engine": "embedding"}], "pools": [pool]})


def test_required_cpus_counts_starting_replicas():
    from mass.app import required_cpus

    data = {"gateway": {"num_cpus": 0.5},
            "pools": [{"name": "p", "engine": "llm", "num_cpus": 1, "autoscaling": {"min_replicas": 2,
                                                                                     "max_replicas": 3}},
                      {"name": "unused", "engine": "llm", "num_cpus": 8}],
            "models": [{**GOOD["models"][0], "num_cpus": 0.5, "autoscaling": {"min_replicas": 0, "max_replicas": 2}},
                       {**GOOD["models"][0], "name": "x", "pool": "p"}]}
    assert required_cpus(load_config(AppArgs, data=data)) == 0.5 + 0.5 * 1 + 1 * 2
    assert required_cpus(load_app_args(ROOT / "serve_apps" / "configs" / "demo.yaml")) <= 2  # fits a 2-core box


def test_a_managed_model_is_deployed_per_version_by_the_controller_not_by_the_app():
    from mass.serving.args import version_app, version_of_app
    from mass.serving.deployments import bind_app_models

    args = load_config(AppArgs, data={"models": [
        {"name": "m", "ref": "tiny-gpt@production", "engine": "llm", "managed": True},
        {"name": "e", "ref": "minilm@production", "engine": "embedding"}]})
    assert [m.name for m in args.managed] == ["m"] and sorted(bind_app_models(args)) == ["e"]
    pinned = args.models[0].pinned(7)
    assert (pinned.ref, pinned.managed, pinned.engine) == ("tiny-gpt/7", False, "llm")
    assert version_app("mass", "m", 7) == "mass--m--v7" and version_app("mass", "m", 7, deploy=2) == "mass--m--v7.2"
    assert [version_of_app("mass", "m", n) for n in ("mass--m--v7", "mass--m--v7.2", "mass--m--v", "mass--m--v7x",
                                                     "mass--mm--v7", "other--m--v7")] == [7, 7, None, None, None, None]


def test_a_vllm_model_is_an_llm_for_routing_and_fallbacks():
    """``engine: vllm`` does what ``llm`` does: the gateway routes completions to it, and the two may fall back to
    each other; an embedding model may not."""
    from mass.errors import InvalidRequest
    from mass.routing import check_served

    args = load_config(AppArgs, data={"models": [
        {"name": "v", "ref": "tiny-gpt/1", "engine": "vllm", "fallbacks": ["m"], "vllm": {"kv_cache_gb": 0.5}},
        {"name": "m", "ref": "tiny-gpt/1", "engine": "llm", "fallbacks": ["v"]}]})
    v = args.models[0]
    assert (v.kind, v.vllm.kv_cache_gb, args.deployment_of(v)) == ("llm", 0.5, "vllm-v")
    check_served("v", "vllm", "llm", ["v", "m"])
    with pytest.raises(InvalidRequest, match="model 'v' is a llm model and does not do embeddings"):
        check_served("v", "vllm", "embedding", ["v", "m"])
    with pytest.raises(ConfigError, match=r"model 'v' \(llm\) cannot fall back to 'e' \(embedding\)"):
        load_config(AppArgs, data={"models": [
            {"name": "v", "ref": "tiny-gpt/1", "engine": "vllm", "fallbacks": ["e"]},
            {"name": "e", "ref": "minilm-l6/1", "engine": "embedding"}]})


def test_vllm_replicas_run_on_vllms_venv_or_the_error_says_how_to_build_it(tmp_path, monkeypatch):
    from mass.serving.vllm_env import vllm_runtime_env
    from mass.settings import get_settings

    monkeypatch.setenv("MASS_VLLM_PYTHON", str(tmp_path / "missing" / "python"))
    with pytest.raises(ConfigError, match=r"engine: vllm runs its replicas on vLLM's own venv, and .*missing/python "
                                          r"does not exist: fix MASS_VLLM_PYTHON"):
        vllm_runtime_env({}, 1, get_settings())
    monkeypatch.delenv("MASS_VLLM_PYTHON")
    monkeypatch.setattr("mass.__file__", str(tmp_path / "mass" / "__init__.py"))  # a source tree without the venv
    with pytest.raises(ConfigError, match=r"run `make vllm` in MASS's checkout \(or set MASS_VLLM_PYTHON\)"):
        vllm_runtime_env({}, 1, get_settings())
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.touch()
    monkeypatch.setenv("MASS_VLLM_PYTHON", str(python))
    env = vllm_runtime_env({"env_vars": {"MASS_HOME": "/h", "OMP_NUM_THREADS": "3"}}, 2.0, get_settings())
    assert env["py_executable"] == str(python)
    assert env["env_vars"]["MASS_HOME"] == "/h" and env["env_vars"]["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert env["env_vars"]["OMP_NUM_THREADS"] == "3"  # a value the deployer set wins
    assert vllm_runtime_env({}, 2.0, get_settings())["env_vars"]["OMP_NUM_THREADS"] == "2"
    pinned = vllm_runtime_env({}, 1.0, get_settings(), env={"VLLM_CPU_OMP_THREADS_BIND": "1"})["env_vars"]
    assert pinned["VLLM_CPU_OMP_THREADS_BIND"] == "1"  # the model's vllm.env wins
