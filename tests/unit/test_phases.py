"""``Phases``, the pipeline's schedule of work: children are made side by side, a card is measured only while
nothing else is made or measured, and a waiting measurement is not starved by makings that keep arriving."""

from __future__ import annotations

import threading
import time

from mass.compression.job import Phases


def _overlap(a, b) -> bool:
    return a[2] < b[3] and b[2] < a[3]


def test_makings_overlap_and_measurements_run_alone():
    phases = Phases()

    def step(name: str, make_s: float) -> None:
        phases.label(name)
        with phases.making():
            time.sleep(make_s)
        with phases.measuring():
            time.sleep(0.05)

    threads = [threading.Thread(target=step, args=(f"s{i}", 0.1 + 0.05 * i)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    makes = [s for s in phases.spans if s[1] == "make"]
    measures = [s for s in phases.spans if s[1] == "measure"]
    assert len(makes) == 4 and len(measures) == 4
    assert _overlap(makes[0], makes[1])  # made side by side
    for m in measures:  # measured alone
        assert not any(_overlap(m, other) for other in phases.spans if other is not m), phases.spans
    assert {s[0] for s in phases.spans} == {"s0", "s1", "s2", "s3"}


def test_a_waiting_measurement_goes_before_makings_that_arrive_after_it():
    phases, order = Phases(), []
    holding = threading.Event()

    def long_making() -> None:
        with phases.making():
            holding.set()
            time.sleep(0.2)

    def measure() -> None:
        with phases.measuring():
            order.append("measure")

    def late_making() -> None:
        with phases.making():
            order.append("late make")

    first = threading.Thread(target=long_making)
    first.start()
    holding.wait()
    waiting = threading.Thread(target=measure)
    waiting.start()
    time.sleep(0.05)  # the measurement is waiting for the long making
    late = threading.Thread(target=late_making)
    late.start()
    for t in (first, waiting, late):
        t.join()
    assert order == ["measure", "late make"]


def test_a_pipeline_that_cannot_run_fails_before_any_work_with_its_step_named(tmp_path, capsys):
    """``jobs/compress.py``'s entry: a bad step is a one-line error naming it and a JSON error line, and exit 2
    (a config error) — no Ray is started (a gate that does not parse is caught before connecting)."""
    from mass.errors import ConfigError
    from mass.jobs import run_pipeline_job

    bad = tmp_path / "bad-pipeline.yaml"
    bad.write_text("parent: minilm-l6@production\nsteps:\n  - {id: a, kind: quantize, options: {methods: [onnx],"
                   " gate: 'quality >='}}\n  - {id: b, kind: distill, after: a, options: {layers: ['9']}}\n")
    code = run_pipeline_job(["--config", str(bad)])
    out, err = capsys.readouterr()
    assert code == ConfigError.exit_code and "does not parse" in err.strip().splitlines()[-1]
    assert '"error"' in out
    bad.write_text("parent: x\nsteps:\n  - {id: a, kind: shrink}\n")
    assert run_pipeline_job(["--config", str(bad)]) == ConfigError.exit_code
    assert "steps.0.kind: Value error, unknown kind 'shrink'" in capsys.readouterr().err


def test_threads_of_one_process_take_turns_with_mlflows_process_wide_uris(tmp_path):
    """A pipeline's steps are threads of one driver, and MLflow's fluent URIs are process-wide: while one
    registry's download runs under its URI, another thread's registry must not swap it (nor restore it)."""
    import mlflow

    from mass.registry import ModelRegistry

    a = ModelRegistry(tracking_uri=f"sqlite:///{tmp_path}/a.db")
    b = ModelRegistry(tracking_uri=f"sqlite:///{tmp_path}/b.db")
    inside, seen = threading.Event(), []

    def first() -> None:
        with a._fluent_uris():
            inside.set()
            time.sleep(0.3)  # the other thread tries to take over meanwhile
            seen.append(mlflow.get_tracking_uri())

    def second() -> None:
        inside.wait()
        with b._fluent_uris():
            seen.append(mlflow.get_tracking_uri())

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [a.tracking_uri, b.tracking_uri]
