"""Tuning job entry: ``python jobs/tune.py --config jobs/configs/<name>-tune.yaml [--set k=v ...] [--resume RUN]``.

Runs unchanged locally or through ``ray job submit``; prints one JSON result line; exits non-zero
with a one-line error on failure.
"""

import sys

from mass.jobs import run_tune_job

if __name__ == "__main__":
    sys.exit(run_tune_job(sys.argv[1:]))
