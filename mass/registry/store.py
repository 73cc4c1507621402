"""``ModelRegistry``: register, resolve, load, list, alias and delete model versions over MLflow.

A version is an MLflow registered-model version whose artifacts are an ``mlflow.transformers`` model
(HF layout: safetensors + config under ``model/``, tokenizer under ``components/tokenizer/``) and whose
``mass.*`` tags carry the task, metrics, size, resolved config and lineage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mass.errors import ConfigError, MassError, ModelNotFound, RegistryError
from mass.refs import ModelRef, validate_alias, validate_name
from mass.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: our task name -> the transformers pipeline task mlflow.transformers records.
TASKS = {"text-generation": "text-generation", "embedding": "feature-extraction"}
TAG = "mass."
_TAG_LIMIT = 5000  # MLflow's limit on a model-version tag value
_PIP_REQUIREMENTS = ["torch", "transformers", "safetensors", "tokenizers"]


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered model version, as MASS sees it."""

    name: str
    version: int
    status: str
    task: str
    source: str
    run_id: str | None
    created_at: float
    aliases: tuple[str, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    size_bytes: int = 0
    lineage: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    description: str = ""

    @property
    def ref(self) -> str:
        """The fixed ``name/version`` reference of this version."""
        return f"{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of this version."""
        return {"name": self.name, "version": self.version, "ref": self.ref, "status": self.status,
                "task": self.task, "aliases": list(self.aliases), "metrics": self.metrics,
                "size_bytes": self.size_bytes, "lineage": self.lineage, "run_id": self.run_id,
                "source": self.source, "created_at": self.created_at, "description": self.description,
                "config": self.config}


@dataclass(frozen=True)
class RegisteredModelInfo:
    """A registered model with its versions (newest first) and aliases."""

    name: str
    aliases: dict[str, int]
    versions: tuple[ModelVersionInfo, ...]
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of this model and its versions."""
        return {"name": self.name, "aliases": self.aliases, "description": self.description,
                "versions": [v.to_dict() for v in self.versions]}


def dir_size(path: Path) -> int:
    """Total size in bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class ModelRegistry:
    """The model repository over any MLflow tracking URI (embedded sqlite by default).

    Args:
        settings: deployment settings; read from the environment when omitted.
        tracking_uri: overrides ``settings.tracking_uri`` (e.g. an ``http://`` mlflow server).
    """

    def __init__(self, settings: Settings | None = None, tracking_uri: str | None = None) -> None:
        self.settings = settings or get_settings()
        self.tracking_uri = tracking_uri or self.settings.tracking_uri
        self._client = None

    # ---------------------------------------------------------------- plumbing
    @property
    def client(self):
        """The MlflowClient bound to this registry's URI (created on first use)."""
        if self._client is None:
            from mlflow import MlflowClient

            with self._translate("connect"), self._schema_lock():
                client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
                client.search_experiments(max_results=1)  # creates/upgrades the schema now, under the lock
                self._client = client
        return self._client

    @contextlib.contextmanager
    def _schema_lock(self) -> Iterator[None]:
        """Serialise first connections to an embedded sqlite store: MLflow creates its schema on
        connect, and two processes doing that at once (e.g. two replicas starting) collide."""
        if not self.tracking_uri.startswith("sqlite:"):
            yield
            return
        import fcntl

        self.settings.home.mkdir(parents=True, exist_ok=True)
        with open(self.settings.home / ".registry.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _translate(self, action: str) -> Iterator[None]:
        """Turn MLflow and connection failures into RegistryError naming the URI."""
        try:
            yield
        except MassError:
            raise
        except Exception as exc:  # MlflowException, requests errors, sqlalchemy errors
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RegistryError(f"model repository at {self._safe_uri()} failed to {action}: {text}",
                                uri=self._safe_uri()) from exc

    def _safe_uri(self) -> str:
        # never leak a password embedded in a database URI
        uri = self.tracking_uri
        if "@" in uri and "://" in uri:
            scheme, rest = uri.split("://", 1)
            creds, host = rest.rsplit("@", 1)
            uri = f"{scheme}://{creds.split(':')[0]}:***@{host}" if ":" in creds else uri
        return uri

    def experiment_id(self) -> str:
        """Id of the MASS experiment, created (with the configured artifact root) if missing."""
        name = self.settings.experiment
        with self._translate("open the experiment"):
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            location = None
            if self.settings.artifact_root:
                location = f"{self.settings.artifact_root.rstrip('/')}/{name}"
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except Exception:  # created concurrently by another process
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
                return exp.experiment_id

    def model_names(self) -> list[str]:
        """Names of every registered model, sorted."""
        with self._translate("list models"):
            return sorted(m.name for m in self.client.search_registered_models(max_results=1000))

    # ---------------------------------------------------------------- register
    def register(self, model_dir: str | Path, name: str, task: str, *, metrics: dict[str, float] | None = None,
                 config: dict[str, Any] | None = None, lineage: dict[str, str] | None = None,
                 run_id: str | None = None, aliases: list[str] | tuple[str, ...] = (),
                 description: str = "") -> ModelVersionInfo:
        """Register an HF model directory (safetensors + config + tokenizer) as a new version.

        Args:
            model_dir: directory written by ``save_pretrained`` for both model and tokenizer.
            name: registered model name (created if new).
            task: ``text-generation`` or ``embedding``.
            metrics: evaluation metrics stored with the version.
            config: the resolved config that produced the model.
            lineage: ``source_run``, ``parent`` (a model ref) and ``method`` (train, finetune, import...).
            run_id: an existing MLflow run to log the model into; a new run is made (and finished)
                otherwise.
            aliases: aliases to point at the new version.
            description: free text shown by ``mass models show``.

        Returns:
            The new version. On any failure no version is left behind and a run made here is
            marked FAILED.
        """
        validate_name(name)
        for alias in aliases:
            validate_alias(alias)
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r}; expected one of {sorted(TASKS)}", field="task")
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"{model_dir} is not an HF model directory (no config.json)", field="model_dir")
        model, tokenizer = load_hf_dir(model_dir, task)
        import mlflow

        # mlflow.transformers looks for a hub model card and license; we are offline by design
        logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)

        tags = self._version_tags(task, metrics, config, lineage, dir_size(model_dir))
        own_run = run_id is None
        with self._translate("start a registration run"):
            if own_run:
                run_id = self.client.create_run(self.experiment_id(), run_name=f"register-{name}",
                                                tags={"mass.kind": "register"}).info.run_id
        created: int | None = None
        new_model = False
        try:
            with self._translate("log the model"):
                mlflow.set_tracking_uri(self.tracking_uri)
                mlflow.set_registry_uri(self.tracking_uri)
                with mlflow.start_run(run_id=run_id):
                    logged = mlflow.transformers.log_model(
                        transformers_model={"model": model, "tokenizer": tokenizer}, name="model",
                        task=TASKS[task], pip_requirements=_PIP_REQUIREMENTS)
                    if metrics and own_run:  # a training run already logged its own metrics
                        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
                    if config is not None:
                        mlflow.log_dict(config, "resolved_config.json")
            with self._translate("register the version"):
                try:
                    self.client.get_registered_model(name)
                except Exception:
                    self.client.create_registered_model(name, tags={"mass.task": task})
                    new_model = True
                mv = self.client.create_model_version(name, logged.model_uri, run_id=run_id, tags=tags,
                                                      model_id=logged.model_id,
                                                      description=description or None)
                created = int(mv.version)
                self._wait_ready(name, created)
                for alias in aliases:
                    self.client.set_registered_model_alias(name, alias, str(created))
            if own_run:
                self.client.set_terminated(run_id, "FINISHED")
        except BaseException:
            self._rollback(name, created, new_model)
            if own_run:
                with contextlib.suppress(Exception):
                    self.client.set_terminated(run_id, "FAILED")
            raise
        log.info("registered %s/%s (%s)", name, created, task)
        return self.resolve(ModelRef(name, version=created))

    def _version_tags(self, task: str, metrics: dict[str, float] | None, config: dict[str, Any] | None,
                      lineage: dict[str, str] | None, size: int) -> dict[str, str]:
        tags = {TAG + "task": task, TAG + "size_bytes": str(size)}
        for key, value in (metrics or {}).items():
            tags[f"{TAG}metric.{key}"] = repr(float(value))
        for key, value in (lineage or {}).items():
            if value is not None:
                tags[f"{TAG}lineage.{key}"] = str(value)
        if config is not None:
            text = json.dumps(config, sort_keys=True, default=str)
            tags[TAG + "config"] = text if len(text) <= _TAG_LIMIT else json.dumps({"truncated": True})
        return tags

    def _wait_ready(self, name: str, version: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            mv = self.client.get_model_version(name, str(version))
            if mv.status == "READY":
                return
            if mv.status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
                raise RegistryError(f"version {name}/{version} did not become READY (status {mv.status})")
            time.sleep(0.2)

    def _rollback(self, name: str, version: int | None, new_model: bool) -> None:
        with contextlib.suppress(Exception):
            if version is not None:
                self.client.delete_model_version(name, str(version))
            if new_model:
                self.client.delete_registered_model(name)

    # ---------------------------------------------------------------- resolve
    def resolve(self, ref: str | ModelRef) -> ModelVersionInfo:
        """Resolve a ModelRef (latest, fixed version or alias) to one version.

        Raises:
            ModelNotFound: naming the models, versions or aliases that do exist.
        """
        ref = ModelRef.parse(ref)
        model = self._get_registered(ref.name)
        aliases = dict(model.aliases or {})
        with self._translate(f"resolve {ref}"):
            if ref.alias is not None:
                if ref.alias not in aliases:
                    known = ", ".join(f"@{a}" for a in sorted(aliases)) or "none"
                    raise ModelNotFound(f"model {ref.name!r} has no alias {ref.alias!r}; aliases: {known}",
                                        name=ref.name, alias=ref.alias, available=sorted(aliases))
                version = int(aliases[ref.alias])
            elif ref.version is not None:
                version = ref.version
            else:
                versions = self._version_numbers(ref.name)
                if not versions:
                    raise ModelNotFound(f"model {ref.name!r} has no versions", name=ref.name)
                version = max(versions)
            try:
                mv = self.client.get_model_version(ref.name, str(version))
            except Exception as exc:
                if "RESOURCE_DOES_NOT_EXIST" not in str(exc) and "not found" not in str(exc).lower():
                    raise
                known = ", ".join(str(v) for v in sorted(self._version_numbers(ref.name))) or "none"
                raise ModelNotFound(f"model {ref.name!r} has no version {version}; versions: {known}",
                                    name=ref.name, version=version) from exc
        by_version: dict[int, list[str]] = {}
        for alias, v in aliases.items():
            by_version.setdefault(int(v), []).append(alias)
        return _version_info(mv, tuple(sorted(by_version.get(version, []))))

    def _get_registered(self, name: str):
        validate_name(name)
        with self._translate(f"look up model {name!r}"):
            try:
                return self.client.get_registered_model(name)
            except Exception as exc:
                if "RESOURCE_DOES_NOT_EXIST" not in str(exc) and "not found" not in str(exc).lower():
                    raise
                known = self.model_names()
                raise ModelNotFound(
                    f"no registered model {name!r}; registered models: {', '.join(known) or 'none'}",
                    name=name, available=known) from exc

    def _version_numbers(self, name: str) -> list[int]:
        return [int(mv.version) for mv in self.client.search_model_versions(f"name='{name}'", max_results=10000)]

    # ---------------------------------------------------------------- read
    def get_model(self, name: str) -> RegisteredModelInfo:
        """One registered model with all its versions (newest first) and aliases."""
        model = self._get_registered(name)
        aliases = {a: int(v) for a, v in (model.aliases or {}).items()}
        by_version: dict[int, list[str]] = {}
        for alias, v in aliases.items():
            by_version.setdefault(v, []).append(alias)
        with self._translate(f"list versions of {name!r}"):
            mvs = self.client.search_model_versions(f"name='{name}'", max_results=10000)
        versions = sorted((_version_info(mv, tuple(sorted(by_version.get(int(mv.version), [])))) for mv in mvs),
                          key=lambda v: -v.version)
        return RegisteredModelInfo(name=name, aliases=aliases, versions=tuple(versions),
                                   description=model.description or "")

    def list_models(self) -> list[RegisteredModelInfo]:
        """Every registered model with versions, aliases, status, size and metrics."""
        return [self.get_model(name) for name in self.model_names()]

    def download(self, ref: str | ModelRef) -> Path:
        """Return a local directory holding the version's artifacts (cached; versions are immutable)."""
        info = self.resolve(ref)
        key = hashlib.sha256(info.source.encode()).hexdigest()[:16]
        target = self.settings.home / "cache" / "models" / f"{info.name}-{info.version}-{key}"
        if (target / "MLmodel").is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        import mlflow

        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
        try:
            with self._translate(f"download {info.ref}"):
                mlflow.set_tracking_uri(self.tracking_uri)
                mlflow.artifacts.download_artifacts(artifact_uri=info.source, dst_path=str(staging),
                                                    tracking_uri=self.tracking_uri)
            root = staging if (staging / "MLmodel").is_file() else next(staging.rglob("MLmodel")).parent
            try:
                root.rename(target)
            except OSError:  # another process finished the same download first
                if not (target / "MLmodel").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def load(self, ref: str | ModelRef, device: str | None = None, dtype: str = "auto", quantization: str = "none"):
        """Load a version back as ``(model, tokenizer, info)``; the model class follows the task.

        ``dtype`` (auto/float32/bfloat16/float16) and ``quantization`` (none/int8/nf4, bitsandbytes) apply
        at load time.
        """
        info = self.resolve(ref)
        path = self.download(info.ref)
        model, tokenizer = load_hf_dir(path / "model", info.task, tokenizer_dir=path / "components" / "tokenizer",
                                       dtype=dtype, quantization=quantization, device=device)
        return model, tokenizer, info

    # ---------------------------------------------------------------- change
    def set_alias(self, name: str, alias: str, version: int) -> ModelVersionInfo:
        """Point ``name@alias`` at ``version`` (which must exist)."""
        validate_alias(alias)
        self.resolve(ModelRef(name, version=int(version)))
        with self._translate(f"set alias {name}@{alias}"):
            self.client.set_registered_model_alias(name, alias, str(int(version)))
        return self.resolve(ModelRef(name, version=int(version)))

    def remove_alias(self, name: str, alias: str) -> None:
        """Remove ``name@alias``; ModelNotFound when it does not exist."""
        self.resolve(ModelRef(name, alias=alias))
        with self._translate(f"remove alias {name}@{alias}"):
            self.client.delete_registered_model_alias(name, alias)

    def delete_version(self, name: str, version: int) -> None:
        """Delete one version (its aliases go with it); the model is removed when none remain."""
        self.resolve(ModelRef(name, version=int(version)))
        with self._translate(f"delete {name}/{version}"):
            self.client.delete_model_version(name, str(int(version)))
            if not self._version_numbers(name):
                self.client.delete_registered_model(name)


def _version_info(mv, aliases: tuple[str, ...]) -> ModelVersionInfo:
    tags = dict(mv.tags or {})
    metrics = {k[len(TAG + "metric."):]: float(v) for k, v in tags.items() if k.startswith(TAG + "metric.")}
    lineage = {k[len(TAG + "lineage."):]: v for k, v in tags.items() if k.startswith(TAG + "lineage.")}
    config = json.loads(tags[TAG + "config"]) if TAG + "config" in tags else None
    return ModelVersionInfo(
        name=mv.name, version=int(mv.version), status=str(mv.status), task=tags.get(TAG + "task", "unknown"),
        source=mv.source, run_id=mv.run_id, created_at=(mv.creation_timestamp or 0) / 1000.0,
        aliases=aliases, metrics=metrics, size_bytes=int(tags.get(TAG + "size_bytes", 0)), lineage=lineage,
        config=config, description=mv.description or "")


def load_hf_dir(model_dir: Path, task: str, tokenizer_dir: Path | None = None, dtype: str = "auto",
                quantization: str = "none", device: str | None = None):
    """Load model + tokenizer from an HF directory with the Auto class for ``task`` (offline only).

    ``dtype`` picks the weight dtype ("auto" keeps the saved one); ``quantization`` "int8"/"nf4" loads the
    linear layers through bitsandbytes (CPU or GPU); ``device`` moves (or, quantized, places) the model.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tokenizer_dir = tokenizer_dir or model_dir
    if not any((tokenizer_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        raise ConfigError(f"no tokenizer in {tokenizer_dir}: save it beside the model with "
                          "tokenizer.save_pretrained(dir)", field="tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot load the tokenizer in {tokenizer_dir}: {str(exc).splitlines()[0]}",
                          field="tokenizer") from exc
    auto = AutoModelForCausalLM if task == "text-generation" else AutoModel
    kwargs = _load_kwargs(dtype, quantization, device)
    try:
        model = auto.from_pretrained(str(model_dir), local_files_only=True, **kwargs)
    except Exception as exc:
        raise ConfigError(f"cannot load a {task} model from {model_dir}: {str(exc).splitlines()[0]}",
                          field="model_dir") from exc
    if device and "device_map" not in kwargs:
        model.to(device)
    model.eval()
    return model, tokenizer


def _load_kwargs(dtype: str, quantization: str, device: str | None) -> dict:
    """``from_pretrained`` keyword arguments for a dtype and a bitsandbytes quantization."""
    import torch

    kwargs: dict = {}
    if dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    if quantization == "none":
        return kwargs
    try:
        import bitsandbytes  # noqa: F401  (transformers needs it; fail here with the fix)
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ConfigError(f"quantization={quantization!r} needs bitsandbytes: pip install 'mass[serve]'",
                          field="quantization") from exc
    if quantization == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif quantization == "nf4":
        compute = getattr(torch, dtype) if dtype != "auto" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=compute)
    else:
        raise ConfigError(f"unknown quantization {quantization!r}; use none, int8 or nf4", field="quantization")
    kwargs["device_map"] = {"": device or "cpu"}  # quantized models cannot be moved after loading
    return kwargs
