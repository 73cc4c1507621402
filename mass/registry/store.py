"""``ModelRegistry``: register, resolve, load, list, alias and delete model versions over MLflow.

A version is an MLflow registered-model version whose artifacts are an ``mlflow.transformers`` model
(HF layout: safetensors + config under ``model/``, tokenizer under ``components/tokenizer/``) and whose
``mass.*`` tags carry the task, metrics, size, resolved config and lineage.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from mass.errors import ConfigError, MassError, ModelNotFound, RegistryError
from mass.models import (ONNX_FILE, TOKENIZER_DIR, load_bnb_dir, load_hf_dir, load_onnx_dir, load_torch_int8_dir,
                         onnx_bytes, quantized_format, weights_bytes)
from mass.refs import ModelRef, validate_alias, validate_name
from mass.registry.versions import (
    CONFIG_ARTIFACT,
    TASKS,
    ModelVersionInfo,
    RegisteredModelInfo,
    aliases_by_version,
    encode_tags,
    version_info,
)
from mass.settings import Settings, get_settings

log = logging.getLogger(__name__)

_PIP_REQUIREMENTS = ["torch", "transformers", "safetensors", "tokenizers"]
# MLflow's fluent URIs are process-wide: threads of one process (a pipeline's steps) take turns setting them
_FLUENT = threading.RLock()


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
        self._bus = None

    def announce(self, event_type: str, data: dict[str, Any], source: str = "registry") -> None:
        """Publish an event about a change that already happened in the registry. A bus failure is logged, not
        raised: the registry stays the source of truth, and the lifecycle controller's periodic reconcile
        reads it whatever the bus delivered."""
        from mass.events import open_bus

        try:
            if self._bus is None:
                self._bus = open_bus(self.settings.events_url)
            self._bus.publish(event_type, data, source=source)
        except MassError as exc:
            log.warning("%s not announced on the event bus (%s); the controller's reconcile still sees the change",
                        event_type, exc.message)

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
        except (MassError, ModuleNotFoundError):  # a missing platform module is an install problem, said as such
            raise
        except Exception as exc:  # MlflowException, requests errors, sqlalchemy errors
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RegistryError(f"model repository at {self._safe_uri()} failed to {action}: {text}",
                                uri=self._safe_uri()) from exc

    @contextlib.contextmanager
    def _fluent_uris(self) -> Iterator[None]:
        """This registry's URI for MLflow's fluent API (``mlflow.transformers.log_model`` has no client form, and
        ``models:/`` sources resolve through the process's URIs), and the process's own URIs back exactly as
        they were afterwards (unset stays unset): library code leaves no process-wide state behind. One thread of
        the process at a time: another's restore would otherwise pull the URIs from under this one's download."""
        from mlflow.environment_variables import MLFLOW_REGISTRY_URI
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        with _FLUENT:
            registry_before, registry_env = registry_utils._registry_uri, MLFLOW_REGISTRY_URI.get_raw()
            with _use_tracking_uri(self.tracking_uri):  # MLflow's own save-and-restore of the tracking URI
                registry_utils.set_registry_uri(self.tracking_uri)
                try:
                    yield
                finally:
                    registry_utils._registry_uri = registry_before
                    if registry_env is None:
                        MLFLOW_REGISTRY_URI.unset()
                    else:
                        MLFLOW_REGISTRY_URI.set(registry_env)

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
            except Exception:  # noqa: BLE001 - created concurrently by another process? (re-read decides)
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
                return exp.experiment_id

    @contextlib.contextmanager
    def tracked_run(self, run_name: str, tags: dict[str, str], resume: str | None = None,
                    close: bool = True) -> Iterator[str]:
        """An MLflow run for a piece of work: yields its id; FINISHED when the block ends, FAILED (and the
        error re-raised) when it raises. Training, tuning and registration share this lifecycle. ``resume``: the
        id of an earlier run to go on with instead (RUNNING again; a tuning search whose driver died). A job
        started by a trigger adds the tags in ``MASS_RUN_TAGS`` (the rule and the event). ``close=False``: the
        block leaves the run RUNNING either way and someone else closes it (a tuning trial's run is closed by
        the search's driver with the trial's outcome: a trial ASHA stopped raises in its dying actor, and that
        must not mark the run FAILED after the driver marked it KILLED)."""
        with self._translate("start a run"):
            if resume:
                self.client.update_run(resume, status="RUNNING")
                run_id = resume
            else:
                from mass.settings import run_tags

                tags = {**run_tags(), **tags}  # a triggered job's runs name the rule and event that started it
                run_id = self.client.create_run(self.experiment_id(), run_name=run_name, tags=tags).info.run_id
        if not close:
            yield run_id
            return
        try:
            yield run_id
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.set_terminated(run_id, "FAILED")
            raise
        with self._translate("finish the run"):
            self.client.set_terminated(run_id, "FINISHED")

    def model_names(self) -> list[str]:
        """Names of every registered model, sorted."""
        with self._translate("list models"):
            return sorted(m.name for m in self.client.search_registered_models(max_results=1000))

    # ---------------------------------------------------------------- register
    def register(self, source: str | Path | tuple[Any, Any], name: str, task: str, *,
                 metrics: dict[str, float] | None = None,
                 config: dict[str, Any] | None = None, lineage: dict[str, str] | None = None,
                 run_id: str | None = None, aliases: list[str] | tuple[str, ...] = (),
                 description: str = "") -> ModelVersionInfo:
        """Register a model as a new version: an HF directory (safetensors + config + tokenizer), or the
        ``(model, tokenizer)`` pair already in memory (a training job's result: no save and reload).

        Args:
            source: a directory written by ``save_pretrained`` for both model and tokenizer, or the pair.
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
        if isinstance(source, tuple):
            log_model, size, fmt = self._transformers_logger(task, *source), weights_bytes(source[0]), "transformers"
        elif (Path(source) / ONNX_FILE).is_file():
            log_model, size, fmt = self._onnx_logger(task, Path(source)), onnx_bytes(Path(source)), "onnx"
        elif fmt := quantized_format(Path(source)):
            size = sum(f.stat().st_size for f in Path(source).iterdir() if f.suffix in (".pt", ".safetensors"))
            log_model = self._files_logger(task, Path(source), fmt)
        else:
            model_dir = Path(source)
            if not (model_dir / "config.json").is_file():
                raise ConfigError(f"{model_dir} is not an HF model directory (no config.json) nor an ONNX export "
                                  f"(no {ONNX_FILE})", field="model_dir")
            model, tokenizer = load_hf_dir(model_dir, task)
            log_model, size, fmt = self._transformers_logger(task, model, tokenizer), weights_bytes(model), \
                "transformers"
        tags = encode_tags(task, metrics, config, lineage, size, fmt)
        previous = self._aliases(name) if aliases else {}
        if run_id is not None:
            created = self._log_and_register(name, task, log_model, tags, run_id, aliases, description,
                                             metrics=None, config=None)  # the caller's run logged its own
        else:
            with self.tracked_run(f"register-{name}", {"mass.kind": "register"}) as own:
                created = self._log_and_register(name, task, log_model, tags, own, aliases, description,
                                                 metrics=metrics, config=config)
        log.info("registered %s/%s (%s)", name, created, task)
        info = self.resolve(ModelRef(name, version=created))
        self.announce("model.version.registered", {"model": name, "version": str(created), "task": task,
                                                   "run_id": info.run_id})
        for alias in aliases:
            self.announce("model.alias.changed", {"model": name, "alias": alias, "version": str(created),
                                                  "previous": previous.get(alias)})
        return info

    @staticmethod
    def _transformers_logger(task: str, model, tokenizer) -> Callable[[], Any]:
        """Logs an HF model and tokenizer with MLflow's transformers flavour (inside an active run)."""
        def log_model():
            import mlflow

            # mlflow.transformers looks for a hub model card and license; we are offline by design
            logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
            return mlflow.transformers.log_model(transformers_model={"model": model, "tokenizer": tokenizer},
                                                 name="model", task=TASKS[task], pip_requirements=_PIP_REQUIREMENTS)
        return log_model

    def _onnx_logger(self, task: str, directory: Path) -> Callable[[], Any]:
        """Logs an ONNX export (``model.onnx`` + ``tokenizer/``) with MLflow's onnx flavour, the tokenizer under
        ``components/tokenizer`` as the transformers flavour keeps it (inside an active run)."""
        if task != "embedding":
            raise ConfigError(f"an ONNX model serves as an embedding model only (got task {task!r})", field="task")
        if not (directory / TOKENIZER_DIR).is_dir():
            raise ConfigError(f"{directory} has {ONNX_FILE} but no {TOKENIZER_DIR}/ beside it", field="model_dir")

        def log_model():
            import mlflow
            import onnx

            logged = mlflow.onnx.log_model(onnx.load(str(directory / ONNX_FILE)), name="model",
                                           pip_requirements=["onnxruntime", "tokenizers", "transformers"],
                                           save_as_external_data=False)
            self.client.log_model_artifacts(logged.model_id, str(directory / TOKENIZER_DIR), "components/tokenizer")
            return logged
        return log_model

    def _files_logger(self, task: str, directory: Path, fmt: str) -> Callable[[], Any]:
        """Logs a quantized copy as its files (a PyTorch dynamic-int8 copy: config, quantized state dict; a
        bitsandbytes one: its HF directory; both with ``quantization.json`` and ``tokenizer/``) as a logged model
        whose MLmodel names the MASS format; the tokenizer goes under ``components/tokenizer`` as the other flavours
        keep it (inside an active run). A bitsandbytes copy may be of a causal LM; a torch-int8 one is of an encoder."""
        if task != "embedding" and fmt != "bnb":
            raise ConfigError(f"a {fmt} model serves as an embedding model only (got task {task!r})", field="task")
        if not (directory / TOKENIZER_DIR).is_dir():
            raise ConfigError(f"{directory} has no {TOKENIZER_DIR}/", field="model_dir")

        def save_model(path, mlflow_model, **_):
            shutil.copytree(directory, path, ignore=shutil.ignore_patterns(TOKENIZER_DIR))
            shutil.copytree(directory / TOKENIZER_DIR, Path(path) / "components" / "tokenizer")
            mlflow_model.add_flavor("mass", format=fmt)
            mlflow_model.save(str(Path(path) / "MLmodel"))

        def log_model():
            from types import SimpleNamespace

            from mlflow.models import Model

            return Model.log(artifact_path=None, name="model", flavor=SimpleNamespace(save_model=save_model,
                                                                                      __name__="mass"))
        return log_model

    def _log_and_register(self, name: str, task: str, log_model: Callable[[], Any], tags: dict[str, str],
                          run_id: str, aliases, description: str, metrics: dict[str, float] | None,
                          config: dict[str, Any] | None) -> int:
        """Log the model into ``run_id`` (``log_model`` runs inside it) and register it as a new version of
        ``name``; all or nothing (a failure deletes the version, and the model when this made it). Returns the
        version number."""
        import mlflow

        created: int | None = None
        new_model = False
        try:  # MLflow resolves a logged model's ``models:/`` source through the process's URIs: ours, scoped
            with self._fluent_uris(), self._translate("log the model"), mlflow.start_run(run_id=run_id):
                logged = log_model()
                if metrics:
                    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
                if config is not None:
                    mlflow.log_dict(config, CONFIG_ARTIFACT)
            with self._fluent_uris(), self._translate("register the version"):
                try:
                    self.client.get_registered_model(name)
                except Exception as exc:
                    if not _not_found(exc):
                        raise
                    self.client.create_registered_model(name, tags={"mass.task": task})
                    new_model = True
                # MLflow waits for READY itself (await_creation_for) and raises on a failed registration
                mv = self.client.create_model_version(name, logged.model_uri, run_id=run_id, tags=tags,
                                                      model_id=logged.model_id, description=description or None,
                                                      await_creation_for=300)
                created = int(mv.version)
                if str(mv.status) != "READY":
                    raise RegistryError(f"version {name}/{created} did not become READY (status {mv.status})")
                for alias in aliases:
                    self.client.set_registered_model_alias(name, alias, str(created))
        except BaseException:
            self._rollback(name, created, new_model)
            raise
        return created

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
                if not _not_found(exc):
                    raise
                known = ", ".join(str(v) for v in sorted(self._version_numbers(ref.name))) or "none"
                raise ModelNotFound(f"model {ref.name!r} has no version {version}; versions: {known}",
                                    name=ref.name, version=version) from exc
        return version_info(mv, aliases_by_version(aliases).get(version, ()))

    def _get_registered(self, name: str):
        validate_name(name)
        with self._translate(f"look up model {name!r}"):
            try:
                return self.client.get_registered_model(name)
            except Exception as exc:
                if not _not_found(exc):
                    raise
                known = self.model_names()
                raise ModelNotFound(
                    f"no registered model {name!r}; registered models: {', '.join(known) or 'none'}",
                    name=name, available=known) from exc

    def _aliases(self, name: str) -> dict[str, str]:
        """``name``'s aliases -> version (as text); {} for a model not registered yet."""
        with self._translate(f"look up model {name!r}"):
            try:
                model = self.client.get_registered_model(name)
            except Exception as exc:
                if not _not_found(exc):
                    raise
                return {}
        return {a: str(v) for a, v in (model.aliases or {}).items()}

    def _version_numbers(self, name: str) -> list[int]:
        return [int(mv.version) for mv in self.client.search_model_versions(f"name='{name}'", max_results=10000)]

    # ---------------------------------------------------------------- read
    def get_model(self, name: str) -> RegisteredModelInfo:
        """One registered model with all its versions (newest first) and aliases."""
        model = self._get_registered(name)
        aliases = {a: int(v) for a, v in (model.aliases or {}).items()}
        by_version = aliases_by_version(aliases)
        with self._translate(f"list versions of {name!r}"):
            mvs = self.client.search_model_versions(f"name='{name}'", max_results=10000)
        versions = sorted((version_info(mv, by_version.get(int(mv.version), ())) for mv in mvs),
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
            with self._fluent_uris(), self._translate(f"download {info.ref}"):  # resolves ``models:/`` sources
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
        loaders = {"onnx": load_onnx_dir, "torch-int8": load_torch_int8_dir, "bnb": load_bnb_dir}
        if info.format in loaders:
            return loaders[info.format](path, path / "components" / "tokenizer", info.ref, dtype, quantization,
                                        device, task=info.task) + (info,)
        model, tokenizer = load_hf_dir(path / "model", info.task, tokenizer_dir=path / "components" / "tokenizer",
                                       dtype=dtype, quantization=quantization, device=device)
        return model, tokenizer, info

    # ---------------------------------------------------------------- change
    def set_alias(self, name: str, alias: str, version: int) -> ModelVersionInfo:
        """Point ``name@alias`` at ``version`` (which must exist)."""
        validate_alias(alias)
        self.resolve(ModelRef(name, version=int(version)))
        previous = self._aliases(name).get(alias)
        with self._translate(f"set alias {name}@{alias}"):
            self.client.set_registered_model_alias(name, alias, str(int(version)))
        self.announce("model.alias.changed", {"model": name, "alias": alias, "version": str(int(version)),
                                              "previous": previous})
        return self.resolve(ModelRef(name, version=int(version)))

    def remove_alias(self, name: str, alias: str) -> None:
        """Remove ``name@alias``; ModelNotFound when it does not exist."""
        info = self.resolve(ModelRef(name, alias=alias))
        with self._translate(f"remove alias {name}@{alias}"):
            self.client.delete_registered_model_alias(name, alias)
        self.announce("model.alias.changed", {"model": name, "alias": alias, "version": None,
                                              "previous": str(info.version)})

    def model_meta(self, name: str) -> tuple[dict[str, int], dict[str, str]]:
        """The registered model's aliases (alias -> version) and its own tags (not its versions'), in one
        lookup; ModelNotFound naming the models."""
        model = self._get_registered(name)
        return {a: int(v) for a, v in (model.aliases or {}).items()}, dict(model.tags or {})

    def set_model_tags(self, name: str, tags: dict[str, str | None]) -> None:
        """Set the model's tags in order (None deletes one)."""
        with self._translate(f"tag model {name!r}"):
            for key, value in tags.items():
                if value is None:
                    with contextlib.suppress(Exception):  # deleting a tag that is not there
                        self.client.delete_registered_model_tag(name, key)
                else:
                    self.client.set_registered_model_tag(name, key, value)

    def create_webhook(self, url: str, events: tuple[str, ...], secret: str) -> str:
        """Register an MLflow webhook (an ``mlflow server`` with a SQL backend) posting ``events`` to ``url``,
        signed with ``secret``; its id."""
        with self._translate("create the webhook"):
            hook = self.client.create_webhook(name="mass-events", url=url, events=list(events), secret=secret,
                                              description="MASS: registry changes -> the MASS event bus")
        return hook.webhook_id

    def delete_version(self, name: str, version: int) -> None:
        """Delete one version (its aliases go with it); the model is removed when none remain."""
        self.resolve(ModelRef(name, version=int(version)))
        with self._translate(f"delete {name}/{version}"):
            self.client.delete_model_version(name, str(int(version)))
            if not self._version_numbers(name):
                self.client.delete_registered_model(name)


def _not_found(exc: BaseException) -> bool:
    """MLflow's own "does not exist" (its error code, as MLflow's client checks it)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    return isinstance(exc, MlflowException) and exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)
