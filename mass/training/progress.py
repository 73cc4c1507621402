"""The training job's progress line: written by rank 0 on the worker's stdout, parsed by ``mass train
--address`` from the job's logs into a progress bar. One formatter and its parser, side by side."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

PREFIX = "[mass] "
_STEP = re.compile(r"\[mass\] epoch (\d+)/(\d+) step (\d+)/(\d+) loss ([\d.]+)")


@dataclass(frozen=True)
class StepProgress:
    """Where a training run is."""

    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float


def say(message: str) -> None:
    """One progress line on the worker's stdout. Not ``print``: Ray Train V2 patches print and, with a
    wrapped stdout, emits every line twice."""
    sys.stdout.write(f"{PREFIX}{message}\n")
    sys.stdout.flush()


def step_line(p: StepProgress, lr: float, steps_per_s: float) -> str:
    """The progress message of one logged step (``say`` adds the prefix)."""
    return f"epoch {p.epoch}/{p.epochs} step {p.step}/{p.steps} loss {p.loss:.4f} lr {lr:.2e} {steps_per_s:.1f} steps/s"


def parse_step(line: str) -> StepProgress | None:
    """The progress in a log line written by ``say(step_line(...))``, or None for any other line."""
    match = _STEP.search(line)
    if match is None:
        return None
    epoch, epochs, step, steps, loss = match.groups()
    return StepProgress(int(epoch), int(epochs), int(step), int(steps), float(loss))
