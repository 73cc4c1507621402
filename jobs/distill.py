"""Distillation job entry: ``python jobs/distill.py minilm-l6@production --layers 3 --layers 2``.

Runs unchanged locally or through ``ray job submit``; each student is trained by a Ray Train job (DDP), then
measured against its teacher; prints one JSON line per student (the card, the gate's verdict, the registered
version); exits 1 when a student was refused or could not be trained, non-zero with a one-line error when the job
could not run.
"""

import sys

from mass.jobs import run_distill_job

if __name__ == "__main__":
    sys.exit(run_distill_job(sys.argv[1:]))
