"""Starting and following the jobs automation runs (triggers and schedules alike): claim the run row first (a
duplicate claims nothing), check the recipe, submit through the Ray job API under an id derived from the run's
key, and record each job's end."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, field_validator

from mass.config import MassConfig
from mass.errors import ConfigError, MassError
from mass.settings import RUN_TAGS_ENV

if TYPE_CHECKING:  # (the store imports the rules, which import ACTIONS from here)
    from mass.automation.store import AutomationRun, AutomationStore

log = logging.getLogger(__name__)

#: what a rule or schedule can start: the job script (run through the Ray job API) per action
ACTIONS = {"train": "jobs/train.py", "tune": "jobs/tune.py", "compress": "jobs/compress.py"}
#: JSON object of MLflow tags a job's runs carry (set on the jobs automation submits)
_RAY_STATUS = {"PENDING": "submitted", "RUNNING": "running", "SUCCEEDED": "succeeded", "FAILED": "failed",
               "STOPPED": "stopped"}


class JobSpec(MassConfig):
    """What a trigger rule and a schedule share: a unique name and the job they start (its kind, recipe and
    ``--set`` overrides)."""

    name: str = Field(..., description="Unique name.")
    action: str = Field("train", description="train, tune or compress (a pipeline).")
    config: str = Field(..., description="The job's recipe, relative to the project (jobs/configs/...).")
    set: list[str] = Field(default_factory=list, description="--set overrides passed to the job.")

    @field_validator("name")
    @classmethod
    def _legal_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
            raise ValueError(f"illegal name {value!r}: letters, digits, '.', '_' or '-', starting with a letter or "
                             "digit, at most 64")
        return value

    @field_validator("action")
    @classmethod
    def _known_action(cls, value: str) -> str:
        if value not in ACTIONS:
            raise ValueError(f"unknown action {value!r}; use one of {', '.join(ACTIONS)}")
        return value

    @field_validator("set")
    @classmethod
    def _key_values(cls, value: list[str]) -> list[str]:
        for item in value:
            if "=" not in item:
                raise ValueError(f"set {item!r} is not KEY=VALUE")
        return value


def check_recipe(config: str, owner: str, root: Path | None = None) -> None:
    """ConfigError unless ``config`` is a file under the project ``root`` (the job's working directory)."""
    from mass.cli.submit import project_root

    root = (root or project_root()).resolve()
    path = (root / config).resolve()
    if not path.is_file() or root not in path.parents:
        raise ConfigError(f"{owner}: config {config!r} is not a file under {root}; give a path relative to the "
                          "project, e.g. jobs/configs/tiny-gpt-smoke.yaml", field="config")


def launch(store: AutomationStore, client, *, kind: str, name: str, key: str, action: str, config: str,
           overrides: list[str], job_id: str, tags: dict[str, str], event=None,
           skip: str | None = None) -> AutomationRun | None:
    """Start one job for (``kind``, ``name``, ``key``): None when that run exists already (nothing is started).
    ``skip``: record the run as skipped with this reason instead of starting it. A recipe that is gone is
    recorded as a failed run. A submission the job server refuses is forgotten and raised (the caller retries);
    one it already holds (same job id) counts as made."""
    from mass.cli.submit import submit_job

    run = store.claim(kind, name, key, action, event, status="skipped" if skip else "submitting",
                      detail=skip or "")
    if run is None or skip:
        return run
    try:
        check_recipe(config, f"{kind} {name}")
    except ConfigError as exc:
        store.update(run.id, status="failed", detail=exc.message)
        log.warning("%s %s: %s", kind, name, exc.message)
        return replace(run, status="failed", detail=exc.message)
    try:
        submit_job(client, ACTIONS[action], config, overrides, submission_id=job_id,
                   env={RUN_TAGS_ENV: json.dumps(tags)}, metadata={k: v[:64] for k, v in tags.items()})
    except Exception as exc:  # noqa: BLE001 - anything the job server says
        if "already exists" not in str(exc):  # (Ray takes a submission id once)
            store.forget(run.id)
            raise MassError(f"{kind} {name}: the Ray job server refused job {job_id}: {str(exc).splitlines()[0]}"
                            ) from exc
    detail = f"{action} {config}" + "".join(f" --set {o}" for o in overrides)
    store.update(run.id, status="submitted", job_id=job_id, detail=detail)
    log.info("%s %s started job %s (%s)", kind, name, job_id, detail)
    return replace(run, status="submitted", job_id=job_id, detail=detail)


def follow(store: AutomationStore, client, kind: str | None = None) -> int:
    """Record the state of every unfinished job automation started (running, succeeded, failed with Ray's
    message); the number that changed."""
    changed = 0
    for run in store.runs(kind=kind, unfinished=True, limit=1000):
        if run.status == "submitting" or not run.job_id:
            continue
        try:
            info = client.get_job_info(run.job_id)
        except Exception as exc:  # noqa: BLE001 - a job the server no longer knows
            log.warning("job %s of %s %s: %s", run.job_id, run.kind, run.name, str(exc).splitlines()[0])
            continue
        status = _RAY_STATUS.get(str(info.status).split(".")[-1], run.status)
        if status != run.status:
            detail = run.detail if status != "failed" else f"{run.detail}: {(info.message or '').strip()}"
            store.update(run.id, status=status, detail=detail)
            changed += 1
    return changed
