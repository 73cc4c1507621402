"""``connect_ray``'s local start: the Ray it starts runs jobs whose ``python`` is this interpreter."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def test_a_local_ray_starts_with_this_interpreter_first_on_path(monkeypatch):
    """A job's entrypoint runs ``python`` from the Ray's PATH; without the venv activated that was the shell's
    (no transformers). The PATH ``ray.init`` starts the local Ray with begins with this interpreter's folder, and
    connecting again does not add it twice."""
    import ray

    from mass.cluster import connect_ray

    here = str(Path(sys.executable).parent)
    # connect_ray writes the Ray start switches and PATH into os.environ: give it a copy to write into
    monkeypatch.setattr(os, "environ", dict(os.environ))
    os.environ["PATH"] = os.pathsep.join(["/usr/local/bin", "/usr/bin"])
    os.environ.pop("RAY_ADDRESS", None)
    seen = []
    # in the suite another test may already have a Ray up in this process: connect_ray must not see it
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address, **kw: seen.append((address, os.environ["PATH"])))
    connect_ray()
    connect_ray()
    assert seen == [("local", os.pathsep.join([here, "/usr/local/bin", "/usr/bin"]))] * 2
