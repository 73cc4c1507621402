"""vLLM behind MASS's gateway (``engine: vllm``) against vLLM's own OpenAI server (``vllm serve``), side by side.

What a user gives up by putting vLLM behind MASS's gateway (API keys checked, usage ledger written, Ray Serve
routing, MASS's streaming) instead of running ``vllm serve`` alone. Both serve the same exported HF directory
(GPT-2s of ``--shapes``, random weights) with the same vLLM settings (dtype, ``max_num_seqs`` 16, KV cache
``--kv-cache-gb``, prefix caching off since the rounds repeat their prompts, OpenMP threads unpinned, ``--threads``
of them) from the same venv (``.venv-vllm``), and get the same HTTP requests from one client at the same arrival
times: ``/v1/completions``, prompt token ids, greedy, EOS biased away (``logit_bias``), streamed with usage. The
workloads are the engine benchmark's (``benchmarks/llm_engines.py``): ``staggered`` and ``long``. Both servers
stay up; rounds alternate, each after both servers' vLLM processes are idle. Figures: output tokens/s (first
arrival to last token), time to first token and time per output token after the first (per request) p50/p95.
Run:  make vllm && .venv/bin/python benchmarks/vllm_gateway.py --json benchmarks/results/vllm_gateway.json
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
sys.path.insert(0, str(ROOT / "benchmarks"))
from llm_engines import Tree, export, pct, workloads  # noqa: E402

SYSTEMS = {"gateway": "MASS gateway, engine: vllm", "vllm_serve": "vllm serve"}
GOAL = 0.9  # issue 13: through the gateway, at least 0.9x vLLM called directly


def vllm_env(threads: int, bind: str) -> dict[str, str]:
    """The environment MASS gives an ``engine: vllm`` replica (``mass.serving.vllm_env``), for ``vllm serve``."""
    return {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": bind, "OMP_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def start_vllm_serve(model_dir: str, dtype: str, threads: int, bind: str, kv_gb: float,
                     log: Path) -> tuple[subprocess.Popen, str]:
    """``vllm serve`` on a free port with the settings MASS gives its replica; the process and its base URL."""
    from mass.cluster import free_port

    port = free_port()
    # `vllm serve` is this module (the `vllm` script looks up a distribution named vllm; this one is vllm-cpu)
    cmd = [str(ROOT / ".venv-vllm/bin/python"), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "bench", "--dtype", dtype, "--max-num-seqs", "16", "--seed", "0",
           "--no-enable-prefix-caching", "--kv-cache-memory-bytes", str(int(kv_gb * (1 << 30))),
           "--uvicorn-log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=vllm_env(threads, bind), cwd=ROOT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        import httpx

        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited ({proc.returncode}); see {log}")
        try:
            return httpx.get(f"{url}/v1/models", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    deadline = time.monotonic() + 300
    while not up():
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"vllm serve did not answer within 300 s; see {log}")
        time.sleep(1)
    return proc, url


def replica_pid(app: str, deployment: str) -> int:
    """The pid of the Serve replica of ``deployment`` (its process title names it)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if f"ServeReplica:{app}:{deployment}" in (proc / "cmdline").read_text():
                    return int(proc.name)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
    raise RuntimeError(f"no replica process of {app}/{deployment}")


async def drive(http, url: str, headers: dict, reqs: list, no_eos: dict) -> dict:
    """Send ``reqs`` (prompt ids, new tokens, arrival offset) at their offsets as streamed completions; the round's
    figures."""
    start = time.perf_counter()
    results: list[tuple[float, float, int, float]] = []

    async def one(ids, n, delay):
        await asyncio.sleep(max(0.0, start + delay - time.perf_counter()))
        sent = time.perf_counter()
        body = {"model": "bench", "prompt": ids, "max_tokens": n, "temperature": 0, "logit_bias": no_eos,
                "stream": True, "stream_options": {"include_usage": True}}
        first = last = None
        tokens = 0
        async with http.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"{url}: {resp.status_code} {(await resp.aread())[:300]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    last = time.perf_counter()
                    first = first or last
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        results.append((first - sent, last, tokens, (last - first) / max(1, tokens - 1)))

    await asyncio.gather(*(one(ids, n, delay) for ids, n, delay in reqs))
    end = max(r[1] for r in results)
    total = sum(r[2] for r in results)
    return {"tokens": total, "tokens_per_s": total / (end - start), "ttft_ms": [r[0] * 1e3 for r in results],
            "tpot_ms": [r[3] * 1e3 for r in results]}


def run(args) -> dict:
    """Every (shape, workload) on both systems, ``args.rounds`` alternating rounds after a warm-up."""
    import ray
    from ray import serve

    from mass.access.keys import KeyStore
    from mass.app import APP_NAME, build_app, wait_ready
    from mass.cluster import free_port
    from mass.registry import ModelRegistry
    from mass.serving.args import AppArgs
    from mass.settings import apply_ray_start_env, get_settings

    work = Path(tempfile.mkdtemp(prefix="mass-vllm-gateway-"))
    apply_ray_start_env(get_settings())  # as `mass serve up` starts a local Ray
    ray.init(address="local", num_cpus=args.threads + 1, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    gateway = f"http://127.0.0.1:{port}"
    _, secret = KeyStore().create({"name": "bench-vllm-gateway"})  # the gateway as deployed: auth and ledger on
    cells = []
    try:
        for shape in args.shapes:
            model_dir, tok = export(shape, work)
            info = ModelRegistry().register(model_dir, f"bench-{shape.replace('x', '-')}", "text-generation")
            loads = workloads(tok, len(tok), args.long_requests, args.long_gap_ms / 1e3, args.stagger_ms / 1e3)
            no_eos = {str(tok.eos_token_id): -100}
            print(f"{shape} {args.dtype}: starting vllm serve and the MASS app", flush=True)
            proc, direct = start_vllm_serve(model_dir, args.dtype, args.threads, args.bind, args.kv_cache_gb,
                                            work / f"vllm-serve-{shape}.log")
            model = {"name": "bench", "ref": info.ref, "engine": "vllm", "dtype": args.dtype, "num_cpus": args.threads,
                     "max_running": 16, "max_tokens_limit": 512, "max_ongoing_requests": 64,
                     "vllm": {"kv_cache_gb": args.kv_cache_gb, "engine_args": {"enable_prefix_caching": False},
                              "env": {"VLLM_CPU_OMP_THREADS_BIND": args.bind}}}
            try:
                serve.run(build_app(AppArgs.model_validate({"gateway": {"num_cpus": 0.5}, "models": [model]})),
                          name=APP_NAME, route_prefix="/", logging_config={"enable_access_log": False,
                                                                           "log_level": "WARNING"})
                wait_ready(gateway, timeout=300)
                trees = [Tree(proc.pid), Tree(replica_pid(APP_NAME, "vllm-bench"))]
                targets = {"gateway": (gateway, {"Authorization": f"Bearer {secret}"}), "vllm_serve": (direct, {})}
                for name in args.workloads:
                    rounds: dict[str, list[dict]] = {s: [] for s in targets}
                    for r in range(args.rounds + 1):  # round 0 warms up and is not counted
                        for system, (url, headers) in targets.items():
                            for tree in trees:
                                tree.quiet()
                            out = asyncio.run(_round(url, headers, loads[name], no_eos))
                            if r:
                                rounds[system].append(out)
                    cells.append(summarize(shape, args.dtype, name, rounds))
                    print(render_cell(cells[-1]), flush=True)
            finally:
                serve.delete(APP_NAME)
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"threads": args.threads, "bind": args.bind, "kv_cache_gb": args.kv_cache_gb, "cells": cells, "goal": GOAL,
            "workloads": {"staggered": f"16 requests {args.stagger_ms:g} ms apart, 16-96 new tokens",
                          "long": f"{args.long_requests} prompts of 256-384 tokens, 64 new tokens, "
                                  f"{args.long_gap_ms:g} ms apart"}}


async def _round(url: str, headers: dict, reqs: list, no_eos: dict) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        return await drive(http, url, headers, reqs, no_eos)


def summarize(shape: str, dtype: str, workload: str, rounds: dict[str, list[dict]]) -> dict:
    """One (shape, workload) cell: per system the median and range of tokens/s over rounds, TTFT and time per
    output token percentiles over every round's requests, and gateway / vllm serve."""
    out = {"shape": shape, "dtype": dtype, "workload": workload, "systems": {}}
    for s, rs in rounds.items():
        ttft = [x for r in rs for x in r["ttft_ms"]]
        tpot = [x for r in rs for x in r["tpot_ms"]]
        out["systems"][s] = {"tokens_per_s": [round(r["tokens_per_s"], 1) for r in rs],
                             "tokens": rs[-1]["tokens"],
                             "ttft_ms_p50": round(pct(ttft, 50), 1), "ttft_ms_p95": round(pct(ttft, 95), 1),
                             "tpot_ms_p50": round(pct(tpot, 50), 2), "tpot_ms_p95": round(pct(tpot, 95), 2)}
    g, v = (statistics.median(out["systems"][s]["tokens_per_s"]) for s in ("gateway", "vllm_serve"))
    out["gateway_vs_vllm_serve"] = round(g / v, 3)
    return out


def render_cell(cell: dict) -> str:
    """One line of progress."""
    parts = [f"{s} {statistics.median(f['tokens_per_s']):.1f} tok/s ttft p95 {f['ttft_ms_p95']} ms"
             for s, f in cell["systems"].items()]
    return f"  {cell['shape']} {cell['workload']}: " + "; ".join(parts) + f"; {cell['gateway_vs_vllm_serve']}x"


README_START, README_END = "<!-- benchmark:vllm_gateway -->", "<!-- /benchmark:vllm_gateway -->"


def render_table(result: dict) -> str:
    """The README's table (markdown) from one run's JSON; the README test checks they agree."""
    lines = [f"Run of {result['date']} on {result['machine']}; vLLM 0.32.0 (CPU), {result['threads']} OpenMP threads "
             f"and a {result['kv_cache_gb']:g} GiB KV cache in both systems; {result['rounds']} alternating rounds "
             "after a warm-up, median tokens/s (range over rounds); TTFT and time per output token over every "
             "round's requests. Workloads: " + "; ".join(f"{k}: {v}" for k, v in result["workloads"].items()) + ".",
             "", "| shape | dtype | workload | system | tokens/s | TTFT p50 / p95 ms | TPOT p50 / p95 ms | "
             f"gateway / vllm serve (goal ≥ {result['goal']}) |", "|---|---|---|---|---|---|---|---|"]
    for cell in result["cells"]:
        for i, (s, f) in enumerate(cell["systems"].items()):
            tps = f["tokens_per_s"]
            ratio = ""
            if i == 0:
                ratio = f"**{cell['gateway_vs_vllm_serve']}x**" + \
                    (" (met)" if cell["gateway_vs_vllm_serve"] >= result["goal"] else " (not met)")
            head = (cell["shape"], cell["dtype"], cell["workload"]) if i == 0 else ("", "", "")
            lines.append(f"| {' | '.join(head)} | {SYSTEMS[s]} | {statistics.median(tps):.1f} "
                         f"({min(tps):.0f}–{max(tps):.0f}) | {f['ttft_ms_p50']} / {f['ttft_ms_p95']} | "
                         f"{f['tpot_ms_p50']} / {f['tpot_ms_p95']} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4x256", "12x768"], help="GPTs as layers x width")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--workloads", nargs="+", default=["staggered", "long"], choices=["staggered", "long"])
    parser.add_argument("--rounds", type=int, default=3, help="counted rounds of each system (after a warm-up)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="vLLM's OpenMP threads in each system")
    parser.add_argument("--kv-cache-gb", type=float, default=2.0)
    parser.add_argument("--bind", default="nobind", help="VLLM_CPU_OMP_THREADS_BIND in both systems: nobind (MASS's "
                        "default) or the cores vLLM's threads are pinned to (e.g. 1: the other core serves HTTP)")
    parser.add_argument("--stagger-ms", type=float, default=5.0, help="staggered: gap between arrivals")
    parser.add_argument("--long-requests", type=int, default=12, help="long: requests")
    parser.add_argument("--long-gap-ms", type=float, default=150.0, help="long: gap between arrivals")
    parser.add_argument("--json", help="also write the JSON result to this file")
    parser.add_argument("--readme", help="rewrite this README's table from the result")
    args = parser.parse_args(argv)
    if not (ROOT / ".venv-vllm/bin/python").exists():
        raise SystemExit("vLLM's venv is missing: run `make vllm` first")
    sys.path.insert(0, str(ROOT))
    from serving import run_and_save

    return run_and_save(args, run, render_table, (README_START, README_END))


if __name__ == "__main__":
    raise SystemExit(main())
