"""Running torch work on a thread of its own that ends with it (so its OpenMP team ends too)."""

from __future__ import annotations

import threading


def on_fresh_thread(fn, *args):
    """``fn(*args)`` in a new thread that ends with it.

    torch's CPU kernels run on an OpenMP team owned by the thread that calls them, and the team lives
    as long as that thread. Once two threads own teams, libgomp (more OpenMP threads than cores) stops
    spinning between parallel regions, and every region pays a futex wake-up: the engine's decode loop
    ran markedly slower for the rest of the process after a single matmul on the main thread. So one-off torch
    work beside an engine (a parity check at load) runs here, and the benchmarks run each system here, so that
    one system's run cannot slow the next one down.
    """
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=run, name="fresh-thread")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
