"""A stand-in for Ray's job server (a third-party service, not our code) for the automation unit tests: it
records submissions as the real one would (one job per submission id, RUNNING until told). The integration
tests submit to the real one."""

from __future__ import annotations

from types import SimpleNamespace


class JobServer:
    """Records submissions as Ray's job server would: one job per submission id, RUNNING until told."""

    def __init__(self):
        self.jobs = {}

    def submit_job(self, entrypoint, submission_id, metadata, runtime_env):
        if submission_id in self.jobs:
            raise RuntimeError(f"Job with submission_id {submission_id} already exists. Please use a different one.")
        self.jobs[submission_id] = {"entrypoint": entrypoint, "status": "RUNNING", "env": runtime_env["env_vars"]}
        return submission_id

    def get_job_info(self, job_id):
        return SimpleNamespace(status=self.jobs[job_id]["status"], message="exit 1" if self.jobs[job_id]["status"]
                               == "FAILED" else "")
