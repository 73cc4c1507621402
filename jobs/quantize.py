"""Quantization job entry: ``python jobs/quantize.py minilm-l6@production --methods torch-int8,onnx-int8,bnb-nf4``.

Runs unchanged locally or through ``ray job submit``; the methods' children are made as parallel Ray tasks; prints
one JSON line per method (the card, the gate's verdict, the registered version); exits 1 when a child was refused
or could not be made, and non-zero with a one-line error when the job could not run.
"""

import sys

from mass.jobs import run_quantize_job

if __name__ == "__main__":
    sys.exit(run_quantize_job(sys.argv[1:]))
