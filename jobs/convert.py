"""Conversion job entry: ``python jobs/convert.py minilm-l6@production --method onnx-int8 [--gate ...]``.

Runs unchanged locally or through ``ray job submit``; prints one JSON result line (the card, the gate's verdict,
the registered version); exits 1 when the child was refused, and non-zero with a one-line error when the job could
not run.
"""

import sys

from mass.jobs import run_convert_job

if __name__ == "__main__":
    sys.exit(run_convert_job(sys.argv[1:]))
