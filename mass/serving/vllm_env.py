"""What the deployer of an ``engine: vllm`` model prepares, in MASS's own venv: the registered version's HF files on
local disk (vLLM's venv has no MLflow) and the Ray ``runtime_env`` that starts its replicas on vLLM's venv."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mass.errors import ConfigError
from mass.settings import Settings, get_settings


def vllm_python(settings: Settings | None = None) -> Path:
    """The Python of vLLM's venv: ``MASS_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` beside MASS's source.

    Raises:
        ConfigError: it does not exist, with the command that builds it.
    """
    import mass

    configured = (settings or get_settings()).vllm_python
    path = Path(configured).expanduser() if configured else Path(mass.__file__).resolve().parents[1] / ".venv-vllm" \
        / "bin" / "python"
    if not path.exists():
        how = "fix MASS_VLLM_PYTHON" if configured else "run `make vllm` in MASS's checkout (or set MASS_VLLM_PYTHON)"
        raise ConfigError(f"engine: vllm runs its replicas on vLLM's own venv, and {path} does not exist: {how}",
                          field="MASS_VLLM_PYTHON")
    return path


def vllm_source(ref: str) -> dict[str, str]:
    """The registered version ``ref`` as vLLM loads it: ``{"ref", "model_dir"}`` (a local path;
    a multi-node cluster needs ``MASS_HOME`` on storage every node shares).

    Raises:
        ConfigError: the version is not an HF causal LM (vLLM cannot serve an ONNX or int8-dynamic export).
    """
    from mass.registry import ModelRegistry

    registry = ModelRegistry()
    info = registry.resolve(ref)
    if info.task != "text-generation" or info.format != "transformers":
        raise ConfigError(f"engine: vllm serves causal LMs saved as HF transformers directories; {info.ref} has task "
                          f"{info.task!r} and format {info.format!r}: serve it with engine: "
                          f"{'llm' if info.task == 'text-generation' else 'embedding'}", field="engine")
    return {"ref": info.ref, "model_dir": str(_one_dir(registry.download(info.ref)))}


def _one_dir(path: Path) -> Path:
    """The version's model and tokenizer files in one directory (links into the download, made once), as vLLM
    wants them: a tokenizer directory without the model's config.json costs it retries at every start."""
    import shutil
    import tempfile

    target = path / "vllm"
    if target.is_dir():
        return target
    staging = Path(tempfile.mkdtemp(dir=path, prefix=".vllm-"))
    try:
        for part in (path / "components" / "tokenizer", path / "model"):  # the model's files win a clash
            for file in part.iterdir():
                link = staging / file.name
                if link.is_symlink():
                    link.unlink()
                link.symlink_to(file.resolve())
        try:
            staging.rename(target)
        except OSError:  # another deployer made it first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def vllm_runtime_env(runtime_env: dict[str, Any], num_cpus: float, settings: Settings | None = None,
                     env: dict[str, str] | None = None) -> dict[str, Any]:
    """``runtime_env`` (MASS's settings for a replica) made to run on vLLM's venv: its Python, one OpenMP thread
    per CPU the replica reserves (no core pinning: replicas share the node), vLLM's telemetry off, then ``env``
    (the model's ``vllm.env``) over all of it."""
    env = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(max(1, int(num_cpus))),
           "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           **runtime_env.get("env_vars", {}), **(env or {})}
    return {**runtime_env, "py_executable": str(vllm_python(settings)), "env_vars": env}
