"""``mass demo --tuning``: a 4-trial ASHA search over the smoke recipe (best trial registered, compute saved
reported), then one retrain started by an event: a dataset version is registered, ``dataset.updated`` reaches a
trigger rule, and the trigger engine starts the training as a Ray job that names the event it came from."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from mass.cli.demo import ROOT, step

RULE, DATASET, RETRAINED = "demo-retrain", "demo-chats", "tiny-gpt-retrained"
#: ``--quick``: trials on 20,000 tokens (still 4 epochs each, so ASHA has rungs to stop at), a one-epoch retrain
QUICK = ["data.max_train_tokens=20000"]
RETRAIN_QUICK = ["optim.epochs=1", "data.max_train_tokens=20000", "scaling.num_workers=1"]


def _dataset_folder(corpus_dir: Path, folder: Path, batch: int, rows: int = 600) -> Path:
    """A folder of one jsonl file: the ``batch``-th slice of ``rows`` training texts of the corpus (a team's new
    data; another slice on every run, so each run registers a new version)."""
    import pyarrow.parquet as pq

    texts = pq.read_table(corpus_dir / "train.parquet", columns=["text"]).column("text").to_pylist()
    start = batch * rows % max(1, len(texts) - rows)
    texts = texts[start:start + rows]
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / "part-0.jsonl"
    part.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return folder


def _job_address() -> str:
    """The Ray job server of the cluster this process joined (its dashboard)."""
    from ray._private.worker import get_dashboard_url

    url = get_dashboard_url()
    return url if url.startswith("http") else f"http://{url}"


def _wait_for_job(address: str, job_id: str, timeout_s: float = 900.0) -> str:
    """Wait until the Ray job ends, printing its state every 15 s; its final status."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client, started, shown = JobSubmissionClient(address), time.monotonic(), 0.0
    while True:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        waited = time.monotonic() - started
        if waited - shown >= 15:
            print(f"  job {job_id}: {status.value} ({waited:.0f}s)", flush=True)
            shown = waited
        if waited > timeout_s:
            raise TimeoutError(f"job {job_id} still {status.value} after {timeout_s:.0f}s; see `ray job logs "
                               f"{job_id}`")
        time.sleep(1.0)


def run_tuning_demo(quick: bool = False) -> int:
    """Search, then retrain on an event; 0 when the triggered job succeeded."""
    from mass.automation.rules import parse_rule
    from mass.automation.store import AutomationStore
    from mass.automation.triggers import run_engine
    from mass.cluster import connect_ray
    from mass.data.corpus import build_corpus
    from mass.data.datasets import DatasetStore
    from mass.registry import ModelRegistry
    from mass.settings import get_settings
    from mass.tuning.config import TuneConfig
    from mass.tuning.job import report_table, run_tuning

    settings = get_settings()
    started = time.perf_counter()
    print(f"MASS tuning demo  (MASS_HOME={settings.home}, registry {settings.tracking_uri})", flush=True)

    step("1/4 build the docstring corpus")
    corpus = build_corpus()
    print(f"corpus {corpus.path}: {corpus.counts}", flush=True)

    step("2/4 a 4-trial ASHA search over the smoke recipe (jobs/configs/tiny-gpt-tune.yaml; Ray Tune, each trial "
          "a Ray Train run)")
    connect_ray(settings=settings)
    plan = TuneConfig.load(ROOT / "jobs" / "configs" / "tiny-gpt-tune.yaml",
                           recipe_overrides=QUICK if quick else None)
    result = run_tuning(plan)
    print(report_table(result), flush=True)
    print(f"best trial registered as {result.model_ref} (val_loss {result.best['metric']:.3f}); the search is MLflow "
          f"run {result.run_id}, a child run per trial", flush=True)

    step(f"3/4 a trigger rule: a new version of dataset {DATASET!r} retrains tiny-gpt on it")
    store = AutomationStore()
    store.add_rule(parse_rule({
        "name": RULE, "on": "dataset.updated", "where": f"name == '{DATASET}'", "action": "train",
        "config": "jobs/configs/tiny-gpt-smoke.yaml",
        "set": [f"name={RETRAINED}", "data.dataset={name}@{version}", *(RETRAIN_QUICK if quick else [])]}),
        replace=True)  # replacing restarts its clock: only events from now on start runs
    print(f"rule {RULE}: on dataset.updated where name == '{DATASET}' -> train (tiny-gpt-smoke.yaml, "
          f"data.dataset=<the new version>)", flush=True)
    datasets = DatasetStore()
    folder = _dataset_folder(Path(corpus.path), Path(settings.home) / "demo" / DATASET, len(datasets.list(DATASET)))
    version, _ = datasets.register(DATASET, str(folder))
    print(f"registered dataset {version.ref} ({version.rows} rows): dataset.updated published", flush=True)

    step("4/4 the trigger engine starts the retrain as a Ray job (once per event, however often it arrives)")
    address = _job_address()
    run_engine(address, once=True)
    runs = [r for r in store.runs(RULE) if r.job_id and f"{DATASET}@{version.version}" in r.detail]
    if not runs:
        print(f"the rule started no job for {version.ref}: {[r.detail for r in store.runs(RULE)]}", file=sys.stderr)
        return 1
    run = runs[0]
    print(f"started Ray job {run.job_id} for event {run.event_type}@{run.event_offset}", flush=True)
    status = _wait_for_job(address, run.job_id)
    run_engine(address, once=True)  # records the job's end in the run history
    print(f"job {run.job_id}: {status}", flush=True)
    if status != "SUCCEEDED":
        print(f"see `ray job logs {run.job_id}`", file=sys.stderr)
        return 1
    registry = ModelRegistry(settings)
    info = registry.resolve(RETRAINED)
    tags: dict[str, Any] = registry.client.get_run(info.run_id).data.tags
    print(f"registered {info.ref}: trained on {info.lineage.get('datasets')}, val_loss "
          f"{info.metrics.get('val_loss', float('nan')):.3f}; its MLflow run names what started it: rule "
          f"{tags.get('mass.trigger.rule')}, event {tags.get('mass.trigger.event')}", flush=True)
    print(f"\ntuning demo finished in {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    return 0
