"""Training job entry: ``python jobs/train.py --config jobs/configs/<recipe>.yaml [--set k=v ...]``.

Runs unchanged locally or through ``ray job submit``; prints one JSON result line; exits non-zero
with a one-line error on failure.
"""

import sys

from mass.jobs import run_train_job

if __name__ == "__main__":
    sys.exit(run_train_job(sys.argv[1:]))
