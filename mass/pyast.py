"""Thread-safe ``ast.parse`` for the corpus builder, compression gates and trigger conditions, which may parse
in several threads of one process at once."""

from __future__ import annotations

import ast
import logging
import random
import threading
import time

log = logging.getLogger(__name__)

# CPython 3.11's AST constructor is not thread-safe ("AST constructor recursion depth mismatch" when threads parse
# at once, as a pipeline's steps do): one parse at a time per process. The lock cannot cover other libraries'
# threads (3.11's traceback module parses the source lines it prints), so parse_python also retries that error.
AST_LOCK = threading.Lock()
PARSE_TRIES = 10


def parse_python(source: str, mode: str = "exec") -> ast.AST:
    """``ast.parse`` under ``AST_LOCK``, tried again (up to ``PARSE_TRIES`` times, after a short random pause that
    grows) when CPython 3.11's shared AST-constructor state was disturbed by another thread's parse
    (cpython#106905): that SystemError says nothing about the source. A thread that logs tracebacks in a loop
    (Ray Data's metrics thread does, when no Prometheus answers) can disturb several parses in a row, so one
    immediate retry is not enough. SyntaxError and ValueError pass through."""
    for attempt in range(PARSE_TRIES):
        try:
            with AST_LOCK:
                return ast.parse(source, mode=mode)
        except SystemError as exc:
            if "recursion depth mismatch" not in str(exc) or attempt == PARSE_TRIES - 1:
                raise
            log.debug("ast.parse disturbed by another thread's parse (%s); parsing again", exc)
            time.sleep(random.uniform(0.005, 0.02) * (attempt + 1))
    raise AssertionError("unreachable")
