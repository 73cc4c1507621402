"""The compression job that conversion, quantization, distillation and pruning share: children of a registered
encoder or causal LM made by one or more methods as parallel Ray tasks on one node, then measured one at a time
against the parent (whose rows are measured once), each on its own card, gated, and registered with its lineage only
if it passes."""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mass.compression.card import (Card, Row, Subject, agreement, causal_texts, eval_texts, measure_causal,
                                   measure_encoder)
from mass.compression.gate import Gate
from mass.errors import ConfigError, JobFailed, MassError, ParityError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """A way to make a child: what it does, the runtime and precision it runs in, whether it is made from the ONNX
    export (whose parity with the parent is checked first), which job options it reads, and the parents' tasks it
    compresses."""

    help: str
    runtime: str  # Subject.runtime: torch | onnx | torch-int8 | bnb
    precision: str  # what the card's row says (and bitsandbytes' kind)
    export: bool = False
    options: tuple[str, ...] = ()  # of per_channel, embeddings, float_layers
    tasks: tuple[str, ...] = ("embedding",)

    def params(self, tolerance: float, **chosen: Any) -> dict[str, Any]:
        """The parameters recorded in the child's lineage (``chosen``: every option's value)."""
        return {**{k: chosen[k] for k in self.options}, **({"tolerance": tolerance} if self.export else {})}


METHODS = {
    "onnx": Method("export to ONNX (float32), served by ONNX Runtime", "onnx", "float32", export=True),
    "onnx-int8": Method("export to ONNX, apply ONNX Runtime's transformer fusions, then its dynamic int8 (int8 "
                        "weights with per-channel scales, activations quantized on the fly; the embedding tables too "
                        "unless --keep-embeddings)", "onnx", "int8", export=True,
                        options=("per_channel", "embeddings")),
    "torch-int8": Method("PyTorch dynamic int8 (quantize_dynamic): int8 Linear weights, activations quantized per "
                         "call, a scale per output channel; the word embedding table too unless --keep-embeddings; "
                         "layers matching --float-layers stay float (default: the FFN output projections)",
                         "torch-int8", "int8", options=("embeddings", "float_layers")),
    "bnb-int8": Method("bitsandbytes LLM.int8 linear layers (memory; no speed promised)", "bnb", "int8",
                       tasks=("embedding", "text-generation")),
    "bnb-nf4": Method("bitsandbytes 4-bit NormalFloat linear layers (memory; no speed promised)", "bnb", "nf4",
                      tasks=("embedding", "text-generation")),
}


#: the methods a quantization job runs when none are named, by the parent's task
DEFAULT_METHODS = {"embedding": ("torch-int8", "onnx-int8"), "text-generation": ("bnb-nf4", "bnb-int8")}

#: how a distilled student is run and measured (it is made by ``mass.compression.distill``, not by a task here)
DISTILLED = Method("a smaller encoder trained to reproduce its teacher's embeddings (Ray Train)", "torch", "float32")


@dataclass
class CompressionResult:
    """What a compression job did for one method: the card, the gate's verdict and why, and the version it
    registered (None when the child was refused or could not be made: ``error`` then says why)."""

    parent: str
    method: str
    passed: bool
    gate: str
    why: str
    card: dict[str, Any]
    registered: str | None
    run_id: str | None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class Child:
    """One child a job makes: ``key`` is unique in the job (the default model name is ``<parent>-<key>``),
    ``method`` names how it is made (a ``METHODS`` key, or ``distill``), ``params`` go into its lineage, and
    ``label`` heads its row on the card (default: from the method's runtime and precision)."""

    key: str
    method: str
    params: dict[str, Any]
    label: str | None = None
    help: str | None = None  # what the version's description says it is (default: the method's help)


def unsupported(method: str) -> str | None:
    """None when ``method`` can run on this node, else why not."""
    runtime = METHODS[method].runtime
    if runtime == "torch-int8":
        from mass.compression.torch_int8 import supported
        return supported()
    if runtime == "bnb":
        from mass.compression.bnb import supported
        return supported()
    return None


def _prepare(ref: str, export: bool) -> dict[str, str]:
    """Download the parent on this node into a work directory of its own, and export it to ONNX when a method
    needs it — a Ray task. Returns the node id and the paths: ``work``, ``parent``, ``tokenizer`` (``export``)."""
    import shutil

    import ray

    from mass.compression.onnx_export import export_encoder
    from mass.registry import ModelRegistry

    root = ModelRegistry().download(ref)
    work = tempfile.mkdtemp(prefix="mass-compress-")
    paths = {"node": ray.get_runtime_context().get_node_id(), "work": work, "parent": str(root / "model"),
             "tokenizer": str(root / "components" / "tokenizer")}
    if export:
        try:
            paths["export"] = str(export_encoder(Path(paths["parent"]), Path(work) / "onnx",
                                                 tokenizer_dir=Path(paths["tokenizer"])))
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return paths


def _make(method: str, paths: dict[str, str], options: dict[str, Any]) -> str:
    """Path of ``method``'s child, made from the files ``_prepare`` left on this node — a Ray task."""
    work = Path(paths["work"])
    if method == "onnx":
        return paths["export"]
    if method == "onnx-int8":
        from mass.compression.onnx_export import quantize_int8
        return str(quantize_int8(Path(paths["export"]), work / method, per_channel=options["per_channel"],
                                 embeddings=options["embeddings"]))
    if method == "torch-int8":
        from mass.compression.torch_int8 import quantize_dir
        return str(quantize_dir(Path(paths["parent"]), Path(paths["tokenizer"]), work / method,
                                options["embeddings"], options["float_layers"]))
    from mass.compression.bnb import quantize_dir
    return str(quantize_dir(Path(paths["parent"]), Path(paths["tokenizer"]), work / method,
                            METHODS[method].precision, options["task"]))


def _subject(child: Child, path: str) -> Subject:
    """How the card measures ``child``, whose files are at ``path`` (its tokenizer in ``tokenizer/``)."""
    m = METHODS.get(child.method, DISTILLED)
    label = {"onnx": "onnx", "torch-int8": "torch", "bnb": "bnb", "torch": "torch"}[m.runtime]
    tokenizer = path if m is DISTILLED else f"{path}/tokenizer"  # a student is a plain HF directory
    return Subject(child.label or f"{label} {'fp32' if m.precision == 'float32' else m.precision}", path,
                   tokenizer, runtime=m.runtime, dtype=m.precision)


def _register(path: str, name: str, task: str, run_id: str, metrics: dict[str, float], lineage: dict[str, str],
              config: dict[str, Any], aliases: list[str], description: str) -> str:
    """Register the child, a ``task`` model (its files are on this node) — a Ray task; its ``name/version``."""
    from mass.registry import ModelRegistry

    return ModelRegistry().register(path, name, task, metrics=metrics, lineage=lineage, config=config,
                                    run_id=run_id, aliases=aliases, description=description).ref


def _cleanup(work: str) -> None:
    import shutil

    shutil.rmtree(work, ignore_errors=True)


def run_compression(ref: str, methods: list[str] | tuple[str, ...] | None, name: str | None = None,
                    gate: str | None = None, tolerance: float = 1e-4, per_channel: bool = True,
                    embeddings: bool = True, float_layers: str | None = None, aliases: tuple[str, ...] = (),
                    threads: int | None = None, rounds: int = 3, address: str | None = None,
                    phases: "Phases | None" = None) -> list[CompressionResult]:
    """Make a child of the registered encoder or causal LM ``ref`` by each of ``methods`` (``METHODS``) and register each that
    passes ``gate`` (``mass.compression.gate``) as a new version of ``name`` (default: ``<parent>-<method>``).
    ``methods`` None: ``DEFAULT_METHODS`` of the parent's task.

    Everything that can be refused is checked before any work: the methods (known, runnable on this node), the
    gate expression, the tolerance, the ``float_layers`` pattern (torch-int8; default
    ``torch_int8.FLOAT_LAYERS``), the parent (an HF directory of a task every method compresses: bitsandbytes
    compresses causal LMs too, the others encoders only). Children are made in
    parallel (one task each); measurements then run one at a time, each in a fresh worker, so none shares the
    CPUs with another. An ONNX export must match the parent within ``tolerance`` (max absolute difference of the
    embeddings on held-out texts), or its methods are refused; when every method is, this raises
    ``ParityError`` right after the check. A method whose task fails (or whose worker dies) is reported with its
    ``error`` and the others go on; when none could be made this raises ``JobFailed`` before measuring anything.
    ``threads`` (default: the node's CPUs) is what every measurement runs with. ``phases``: shared with jobs that
    run beside this one (a pipeline's steps), so none measures while another makes.
    """
    from mass.cluster import connect_ray
    from mass.registry import ModelRegistry

    registry = ModelRegistry()
    parent = None  # resolved once: first when the methods follow its task, else after the options are checked
    if methods is None:
        parent = check_parent(registry, ref, tasks=("embedding", "text-generation"))
        methods = DEFAULT_METHODS.get(parent.task, DEFAULT_METHODS["embedding"])
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise ConfigError("no method given; methods: " + ", ".join(METHODS), field="methods")
    for method in methods:
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; methods: {', '.join(METHODS)}", field="methods")
        reason = unsupported(method)
        if reason:
            raise ConfigError(f"method {method!r} cannot run on this machine: {reason}", field="methods")
    if aliases and len(methods) > 1:
        raise ConfigError("--alias needs a single method (each method registers a child of its own)", field="alias")
    checked = Gate.parse(gate)
    from mass.compression.torch_int8 import FLOAT_LAYERS, check_float_layers

    float_layers = FLOAT_LAYERS if float_layers is None else float_layers
    check_float_layers(float_layers)
    if not 0 < tolerance < 1:
        raise ConfigError(f"tolerance must be in (0, 1), got {tolerance!r}", field="tolerance")
    parent = parent or check_parent(registry, ref, tasks=("embedding", "text-generation"))
    wrong = [m for m in methods if parent.task not in METHODS[m].tasks]
    if wrong:
        fits = [m for m, method in METHODS.items() if parent.task in method.tasks]
        raise ConfigError(f"{parent.ref} is a {parent.task} model, which {', '.join(wrong)} cannot compress (ONNX "
                          f"export and PyTorch dynamic int8 serve encoders only); methods for it: {', '.join(fits)}",
                          field="methods")
    connect_ray(address)
    job = _Job(registry, parent, checked, threads or os.cpu_count() or 1, rounds, phases)
    options = {"per_channel": per_channel, "embeddings": embeddings, "float_layers": float_layers,
               "task": parent.task}
    children = [Child(m, m, METHODS[m].params(tolerance, **options)) for m in methods]
    return job.run(children, name, aliases, lambda paths: _make_in_tasks(job, children, paths, options),
                   tolerance)


def check_parent(registry, ref: str, tasks: tuple[str, ...] = ("embedding",), what: str = "this job"):
    """The parent's version, when it is a model of one of ``tasks`` stored as an HF directory (not already
    compressed); ``ConfigError`` naming what to compress instead otherwise (``what``: the job, for the message)."""
    parent = registry.resolve(ref)
    if parent.task not in tasks:
        raise ConfigError(f"{parent.ref} is a {parent.task} model; {what} compresses "
                          f"{' and '.join(t + ' models' for t in tasks)} only", field="ref")
    if parent.format != "transformers" or parent.lineage.get("method") in METHODS:
        raise ConfigError(f"{parent.ref} is already a compressed model ({parent.lineage.get('method', parent.format)})"
                          f"; compress its source "
                          f"({parent.lineage.get('parent', 'the float model it came from')}) instead", field="ref")
    return parent


def _make_in_tasks(job: "_Job", children: list[Child], paths: dict[str, str],
                   options: dict[str, Any]) -> dict[str, str | Exception]:
    """Each child made by a Ray task of its own on the parent's node, all in parallel; a failed one is its error."""
    import ray

    make = ray.remote(_make).options(num_cpus=1, max_retries=0, **job.pinned)
    pending = {c.key: make.remote(c.method, paths, options) for c in children}  # in parallel
    made: dict[str, str | Exception] = {}
    for key, task in pending.items():
        try:
            made[key] = ray.get(task)
        except Exception as exc:  # one method failing does not lose the others' children
            made[key] = exc
    return made


class Phases:
    """When a job may make children and when it may measure them. Alone, a job is never in two phases at once;
    jobs running side by side (a pipeline's independent steps) share one ``Phases`` that lets any number make
    children together but measures only while nothing else is being made or measured, so each card keeps the
    CPUs to itself. Each phase's start and end go into ``spans`` (label, phase, start, end). ``parents`` keeps the
    parent rows measured in this run, so the steps of one pipeline over one parent measure it once."""

    def __init__(self) -> None:
        import threading

        self._cond = threading.Condition()
        self._making = 0
        self._measuring = False
        self._waiting = 0  # measurements waiting: new makings wait behind them, so measuring is not starved
        self.spans: list[tuple[str, str, float, float]] = []
        self.parents: dict[tuple, tuple] = {}  # (version, threads, rounds) -> (fp32 row, its outputs, bf16 row)
        self._local = threading.local()

    def label(self, text: str) -> None:
        """Name this thread's spans (a pipeline step)."""
        self._local.label = text

    def making(self):
        """Context: a child is being made (shared with other makings)."""
        return self._phase("make")

    def measuring(self):
        """Context: children are being measured (exclusive)."""
        return self._phase("measure")

    def _phase(self, phase: str):
        import contextlib
        import time

        @contextlib.contextmanager
        def held():
            with self._cond:
                if phase == "make":
                    self._cond.wait_for(lambda: not self._measuring and not self._waiting)
                    self._making += 1
                else:
                    self._waiting += 1
                    self._cond.wait_for(lambda: not self._measuring and not self._making)
                    self._waiting -= 1
                    self._measuring = True
            start = time.time()
            try:
                yield
            finally:
                with self._cond:
                    self.spans.append((getattr(self._local, "label", ""), phase, start, time.time()))
                    if phase == "make":
                        self._making -= 1
                    else:
                        self._measuring = False
                    self._cond.notify_all()
        return held()


class _Job:
    """One compression job on the cluster (state shared by its steps): prepare the parent on one node, make the
    children (a function of the job's kind), measure the parent once and each child after it, settle each."""

    def __init__(self, registry, parent, gate: Gate, threads: int, rounds: int, phases=None) -> None:
        self.registry, self.parent, self.gate = registry, parent, gate
        self.phases = phases or Phases()
        self.causal = parent.task == "text-generation"
        # encoders: (queries, documents); causal LMs: (the test split's documents,)
        self.texts = (causal_texts(),) if self.causal else eval_texts()
        self.threads, self.rounds = threads, rounds

    def run(self, children: list[Child], name: str | None, aliases: tuple[str, ...], make,
            tolerance: float = 1e-4, history: dict[str, dict[str, list[float]]] | None = None
            ) -> list[CompressionResult]:
        """Make (``make(paths)``: child key -> the child's directory on the pinned node, or the error that stopped
        it), measure, gate and register every child (see ``run_compression``). ``history``: per child key, metric
        series (e.g. a training loss by epoch) logged into its run."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from mass.settings import get_settings, settings_env

        # every task sees this process's settings (registry, home, database), as serving's replicas do
        env = {"runtime_env": {"env_vars": {k: v for k, v in settings_env(get_settings()).items() if v}}}
        export = any(METHODS.get(c.method, DISTILLED).export for c in children)
        with self.phases.making():
            paths = ray.get(ray.remote(_prepare).options(num_cpus=1, max_retries=0, **env).remote(self.parent.ref,
                                                                                                   export))
        self.pinned = {"scheduling_strategy": NodeAffinitySchedulingStrategy(paths["node"], soft=False), **env}
        try:
            free = ray.available_resources().get("CPU", 0.0)
            with self.phases.making():
                made = make(paths)
            with self.phases.measuring():  # never while a child is being made (pipelines)
                if history is not None:  # children trained by Ray Train runs, whose workers may still be exiting
                    _released(free)
                for key, child in made.items():
                    if isinstance(child, Exception):
                        log.error("%s of %s failed: %s", key, self.parent.ref, _cause(child))
                if all(isinstance(child, Exception) for child in made.values()):  # nothing to measure or register
                    raise JobFailed("no child could be made: " + "; ".join(f"{k}: {_cause(e)}" for k, e in made.items())
                                    + "; nothing was measured or registered", methods=[c.key for c in children])
                # the measurements, one at a time (a fresh worker each: memory is measured from a clean start); the
                # parent's once per run (a pipeline's steps over one parent share its rows)
                key = (self.parent.ref, self.threads, self.rounds)
                measured = self.phases.parents.get(key)
                if measured is None:
                    base, self.parent_out = self._measure(Subject("parent fp32", paths["parent"], paths["tokenizer"]))
                    if self.causal:
                        base.quality = 1.0
                else:
                    log.info("%s: its rows measured earlier in this run are reused", self.parent.ref)
                    base, self.parent_out, bf16 = copy.deepcopy(measured)
                self.parent_perplexity = base.perplexity  # causal LMs
                parity: str | None = None
                if export:  # checked before anything else is spent on the export's children
                    onnx, self.worst = self._compare(_subject(Child("onnx", "onnx", {}), paths["export"]), worst=True)
                    if self.worst > tolerance:
                        parity = (f"the ONNX export of {self.parent.ref} differs from it by up to {self.worst:.3g} "
                                  f"(tolerance {tolerance:g}) on {sum(map(len, self.texts))} held-out texts")
                        if all(METHODS.get(c.method, DISTILLED).export for c in children):
                            raise ParityError(f"{parity}; nothing was registered", max_abs_diff=self.worst,
                                              tolerance=tolerance)
                if measured is None:
                    bf16 = self._compare(Subject("parent bf16", paths["parent"], paths["tokenizer"], dtype="bfloat16"))
                    self.phases.parents[key] = copy.deepcopy((base, self.parent_out, bf16))
                shared = [base, bf16] + ([onnx] if export else [])
                results = []
                for child in children:
                    m = METHODS.get(child.method, DISTILLED)
                    if isinstance(made[child.key], Exception):
                        error = _cause(made[child.key])
                        results.append(CompressionResult(self.parent.ref, child.method, False, self.gate.text,
                                                         f"not made: {error}", {}, None, None, error))
                        continue
                    rows = shared[:2] + ([shared[2]] if child.method == "onnx-int8" else [])
                    rows.append(shared[2] if child.method == "onnx"
                                else self._compare(_subject(child, made[child.key])))
                    card = Card(self.parent.ref, child.method, child.params, rows,
                                {"documents": len(self.texts[0])} if self.causal else
                                {"queries": len(self.texts[0]), "documents": len(self.texts[1])})
                    refusal = parity if m.export else None
                    results.append(self._settle(child, name or f"{self.parent.name}-{child.key}", made[child.key], card,
                                                refusal, aliases, (history or {}).get(child.key, {})))
        finally:
            ray.get(ray.remote(_cleanup).options(num_cpus=0, **self.pinned).remote(paths["work"]))
        return results

    def _measure(self, subject: Subject) -> tuple[Row, Any]:
        """(``subject``'s row, its outputs on the held-out texts: an encoder's vectors, None for a causal LM)."""
        import ray

        log.info("measuring %s", subject.label)
        measure = ray.remote(max_calls=1)(measure_causal if self.causal else measure_encoder).options(
            num_cpus=1, max_retries=0, **self.pinned)
        return ray.get(measure.remote(subject, *self.texts, self.threads, self.rounds))

    def _compare(self, subject: Subject, worst: bool = False):
        """``subject``'s row with its quality against the parent (encoders, ``worst``: and the largest
        difference of its vectors from the parent's)."""
        row, vectors = self._measure(subject)
        if self.causal:
            row.quality = round(self.parent_perplexity / row.perplexity, 4)
            return row
        row.quality, row.top10 = agreement(self.parent_out, vectors)
        if worst:
            return row, max(float(abs(p - c).max()) for p, c in zip(self.parent_out, vectors))
        return row

    def _settle(self, child: Child, name: str, path: str, card: Card, refusal: str | None,
                aliases: tuple[str, ...], history: dict[str, list[float]]) -> CompressionResult:
        """Gate one child, log its card into a run of its own, register it if it passed, announce the outcome."""
        import ray

        figures = card.figures
        passed, why = (False, f"refused: {refusal}") if refusal else self.gate.check(figures)
        log.info("%s of %s: %s (%s)", child.key, self.parent.ref, "passed" if passed else "refused", why)
        registered = None
        with self.registry.tracked_run(f"compress-{self.parent.name}-{child.key}",
                                       {"mass.kind": "compress", "mass.parent": self.parent.ref}) as run_id:
            _log_card(self.registry, run_id, card, passed)
            for key, series in history.items():
                for step, value in enumerate(series, 1):
                    self.registry.client.log_metric(run_id, key, float(value), step=step)
            if passed:
                lineage = {"parent": self.parent.ref, "method": child.method,
                           "params": json.dumps(child.params, sort_keys=True), "source_run": run_id}
                registered = ray.get(ray.remote(_register).options(num_cpus=0, max_retries=0, **self.pinned).remote(
                    path, name, self.parent.task, run_id, {k: v for k, v in figures.items() if v is not None}, lineage,
                    {"card": card.to_dict(), "gate": self.gate.text}, list(aliases),
                    f"{child.help or METHODS.get(child.method, DISTILLED).help} of {self.parent.ref}; {why}"))
        self.registry.announce("compression.completed", {
            "model": name, "version": registered.split("/")[1] if registered else None, "parent": self.parent.ref,
            "method": child.method, "metrics": {k: v for k, v in figures.items() if v is not None}})
        return CompressionResult(self.parent.ref, child.method, passed, self.gate.text, why, card.to_dict(),
                                 registered, run_id)


def _released(cpus: float, timeout: float = 15.0) -> None:
    """Wait (up to ``timeout`` seconds) until the cluster has ``cpus`` CPUs free again, as before the children were
    made: a Ray Train run's workers give theirs back only as they exit, and a card measured beside exiting workers
    reads slow."""
    import time

    import ray

    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0.0) < cpus and time.monotonic() < deadline:
        time.sleep(0.5)


def _cause(exc: Exception) -> str:
    """The first line of the error a task raised (Ray wraps it)."""
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, MassError):
        return str(cause)
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"


def _log_card(registry, run_id: str, card: Card, passed: bool) -> None:
    """The card into the job's MLflow run: JSON, markdown table, PNG chart, the figures as metrics."""
    client = registry.client
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "card.json").write_text(json.dumps(card.to_dict(), indent=2))
        (Path(tmp) / "card.md").write_text(card.table() + "\n")
        card.plot(Path(tmp) / "card.png")
        client.log_artifacts(run_id, tmp, "card")
    for key, value in card.figures.items():
        if value is not None:
            client.log_metric(run_id, key, float(value))
    client.set_tag(run_id, "mass.gate", "passed" if passed else "refused")


def result_text(result: CompressionResult) -> str:
    """What the CLI prints for one method: the card, the gate's verdict and the registered version."""
    if result.error:
        return f"{result.method} of {result.parent}: not made: {result.error}"
    card = Card.from_dict(result.card)
    verdict = f"registered {result.registered}" if result.registered else "refused: not registered"
    return f"{result.method} of {result.parent}\n\n{card.table()}\n\ngate: {result.why}\n{verdict} " \
           f"(card in MLflow run {result.run_id})"
