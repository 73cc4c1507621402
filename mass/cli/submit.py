"""``mass train|tune --address``: submit ``jobs/train.py`` (or ``tune.py``) to a Ray cluster, stream its logs, show
progress."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from pathlib import Path

from mass.errors import ConfigError, JobFailed, MassError
from mass.settings import get_settings, settings_env
from mass.training.progress import parse_step

EXCLUDES = [".venv", ".git", "*.egg-info", ".mass", "mlruns", "__pycache__", ".pytest_cache", "notebooks"]


def project_root() -> Path:
    """The directory holding ``jobs/train.py`` and ``mass/`` (uploaded as the job's working dir)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "jobs" / "train.py").is_file():
        raise ConfigError(f"jobs/train.py not found under {root}; run from a MASS checkout", field="address")
    return root


def submit_train(config: str, overrides: list[str], address: str, follow: bool = True, script: str = "jobs/train.py",
                 extra: list[str] | tuple[str, ...] = ()) -> dict:
    """Submit a training job (or the tuning job: ``script`` ``jobs/tune.py``, its other arguments in ``extra``);
    with ``follow``, stream its logs to stderr and return its result dict.

    Raises:
        JobFailed (or the job's own error class): when the job ends in failure.
    """
    client, url = job_client(address)
    job_id = submit_job(client, script, str(Path(config).resolve()), overrides, extra)  # (relative to the cwd)
    print(f"submitted job {job_id} to {url}", file=sys.stderr, flush=True)
    if not follow:
        return {"job_id": job_id}
    lines = asyncio.run(_follow(client, job_id))
    status = str(client.get_job_status(job_id)).split(".")[-1]
    result = _last_json(lines)
    if status != "SUCCEEDED" or result is None or "error" in result:
        if result and "error" in result:
            raise MassError.from_dict({**result["error"], "job_id": job_id})
        raise JobFailed(f"job {job_id} ended {status}; see `ray job logs {job_id}`", job_id=job_id)
    result["job_id"] = job_id
    return result


def job_client(address: str):
    """(JobSubmissionClient, its URL) for the Ray job server at ``address`` (``http://HOST:8265``, or HOST:PORT);
    MassError naming the address when it cannot be reached."""
    import logging

    from ray.job_submission import JobSubmissionClient

    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # per-connection chatter
    url = address if "://" in address else f"http://{address}"
    try:
        return JobSubmissionClient(url), url
    except Exception as exc:
        raise MassError(f"cannot reach the Ray job server at {url}: {str(exc).splitlines()[0]}; check the "
                        "dashboard port (default 8265) and RAY_AUTH_MODE/token", address=url) from exc


def submit_job(client, script: str, config: str, overrides: list[str], extra: list[str] | tuple[str, ...] = (),
               submission_id: str | None = None, env: dict[str, str] | None = None,
               metadata: dict[str, str] | None = None) -> str:
    """Submit ``python SCRIPT --config CONFIG [--set ...] [extra]`` (``config``: absolute, or relative to the
    project) with the project as its working directory and
    the ``MASS_*`` settings (plus ``env``) in its environment; its job id (``submission_id`` when given: Ray refuses
    a second job with the same id)."""
    root = project_root()
    cfg_path = (root / config).resolve() if not Path(config).is_absolute() else Path(config).resolve()
    try:
        rel = cfg_path.relative_to(root)
    except ValueError as exc:
        raise ConfigError(f"{config} is outside the project directory {root}; the job's working dir is the "
                          "project, so put the recipe under jobs/configs/", field="config") from exc
    entry = ["python", script, "--config", str(rel)]
    for item in overrides:
        entry += ["--set", item]
    entry += list(extra)
    job_env = {**{k: v for k, v in settings_env(get_settings()).items() if v}, **(env or {})}
    return client.submit_job(entrypoint=shlex.join(entry), submission_id=submission_id, metadata=metadata,
                             runtime_env={"working_dir": str(root), "excludes": EXCLUDES, "env_vars": job_env})


async def _follow(client, job_id: str) -> list[str]:
    from tqdm import tqdm

    lines: list[str] = []
    bar = None
    async for chunk in client.tail_job_logs(job_id):
        for line in chunk.splitlines():
            lines.append(line)
            progress = parse_step(line)
            if progress:
                if bar is None or bar.total != progress.steps:
                    if bar is not None:
                        bar.close()
                    bar = tqdm(total=progress.steps, file=sys.stderr, unit="step")
                bar.set_description(f"epoch {progress.epoch}/{progress.epochs}")
                bar.n = progress.step
                bar.set_postfix(loss=f"{progress.loss:.4f}")
                bar.refresh()
            elif not line.startswith("{"):
                (bar.write if bar else print)(line, file=sys.stderr)
    if bar is not None:
        bar.close()
    return lines


def _last_json(lines: list[str]) -> dict | None:
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None

