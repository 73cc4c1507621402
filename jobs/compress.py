"""Compression pipeline entry: ``python jobs/compress.py --config jobs/configs/minilm-pipeline.yaml``.

Runs unchanged locally or through ``ray job submit``: the steps (quantize, distill, prune) chained by ``after``,
independent ones side by side, every child measured against its parent and gated; prints one JSON line per step;
exits 1 when a step failed, did not run or had a child refused, non-zero with a one-line error when the pipeline
could not start.
"""

import sys

from mass.jobs import run_pipeline_job

if __name__ == "__main__":
    sys.exit(run_pipeline_job(sys.argv[1:]))
