"""Pruning job entry: ``python jobs/prune.py minilm-l6@production --ffn 0.25 --recover-epochs 1``.

Runs unchanged locally or through ``ray job submit``: structured pruning in a Ray task, the recovery run on Ray
Train, then the card; prints one JSON line (the card, the gate's verdict, the registered version); exits 1 when the
child was refused or could not be made, non-zero with a one-line error when the job could not run.
"""

import sys

from mass.jobs import run_prune_job

if __name__ == "__main__":
    sys.exit(run_prune_job(sys.argv[1:]))
