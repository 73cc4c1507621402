"""Service-proxy benchmark: what API keys, per-key limits (the Redis backend) and the usage ledger cost, and
how exact the shared limits are, measured side by side in one run on a local Ray Serve.

- throughput: the same load through the gateway with the proxy all on (auth, Redis limits on a key that has
  every limit — rpm, tpm, parallel, budget — so each admission runs every check —, the ledger) and all off
  (``auth: false``, ``ledger: false``, no Redis): MiniLM embeddings from 32 clients, and tiny-gpt chat (a
  random-weight 4-layer GPT-2 registered here) from 16 clients. Each variant is deployed alone while it runs,
  interleaved over ``--rounds`` rounds, each after a warm-up; the table reports medians and ranges.
- overhead: the gateway's own time per request (``x-mass-overhead-ms``: elapsed until the response starts
  minus the wait on the model), p50 and p99, at that load and with one client at a time. Under a load that
  saturates the two cores, a request waits somewhere for a CPU: before the proxy's Redis round trip it is
  counted as overhead, while the proxy-off path has no such await and its wait counts as the model's; the
  one-client rows have no queue, so they show the proxy's own work.
- gateway work: py-spy samples the gateway replica's busy threads (100 Hz) during each saturated run: its busy
  milliseconds per request with the proxy on and off, and which of MASS's parts the proxy-on samples were in
  (limits, keys, ledger, breakers); skipped with ``--no-profile`` or when py-spy is not beside the interpreter.
- accuracy: two gateway replicas sharing Redis; 64 concurrent clients on one key with ``rpm: 120`` for
  ``--accuracy-s`` seconds (admitted must be at most 120 + 1); 64 concurrent streams on one key with a budget
  of 400 tokens (tokens charged must equal tokens used, and never exceed the budget).

Prints a table and one JSON line; ``--json PATH`` saves the JSON and ``--readme README.md`` rewrites the
README's proxy table.  Run:  .venv/bin/python benchmarks/proxy.py --json benchmarks/results/proxy.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

APP = "mass-bench-proxy"


def register_models() -> None:
    """MiniLM and a random-weight 4-layer GPT-2 (over our tokenizer) in the private registry."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from mass.data.corpus import collect_documents
    from mass.data.tokenizer import train_tokenizer
    from mass.registry import ModelRegistry
    from mass.registry.imports import import_minilm

    registry = ModelRegistry()
    import_minilm(registry)
    tok = train_tokenizer([d["text"] for d in collect_documents(["json", "argparse"], progress=False)], 2048)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=256, n_layer=4, n_head=4,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    registry.register((GPT2LMHeadModel(cfg).eval(), tok), "bench-gpt", "text-generation", aliases=["production"],
                      lineage={"method": "benchmark", "source": "random weights"})


def app_args(proxy_on: bool, redis_url: str, replicas: int = 1) -> dict:
    """The served app: both models on one CPU each; the proxy on or off."""
    gateway = {"num_cpus": 0.5, "replicas": replicas, "max_ongoing_requests": 256}
    gateway.update({"redis_url": redis_url} if proxy_on else {"auth": False, "ledger": False})
    return {"gateway": gateway, "models": [
        {"name": "minilm", "ref": "minilm-l6@production", "engine": "embedding", "num_cpus": 1,
         "max_ongoing_requests": 64},
        {"name": "tiny-gpt", "ref": "bench-gpt@production", "engine": "llm", "num_cpus": 1, "max_tokens_limit": 64}]}


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def load(session, url: str, path: str, body: dict, requests: int, clients: int,
               overheads: list[float]) -> tuple[float, int]:
    """``requests`` POSTs of ``body`` from ``clients`` clients: (seconds, completion tokens); each response's
    ``x-mass-overhead-ms`` is appended to ``overheads``."""
    todo = iter(range(requests))
    tokens = 0

    async def client():
        nonlocal tokens
        for _ in todo:
            async with session.post(f"{url}{path}", json=body) as resp:
                assert resp.status == 200, (resp.status, await resp.text())
                out = await resp.json()
                overheads.append(float(resp.headers["x-mass-overhead-ms"]))
            tokens += out["usage"].get("completion_tokens", 0)

    start = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(clients)])
    return time.perf_counter() - start, tokens


#: the proxy's parts, by the source files of their frames (a sample counts for a part when any frame is in it)
PARTS = {"limits": ("mass/access/limits.py", "mass/access/redis_limits.py"),
         "keys": ("mass/access/keys.py", "mass/access/resolver.py"), "ledger": ("mass/access/ledger.py",),
         "breakers": ("mass/gateway/breaker.py", "mass/gateway/shared_breaker.py")}
RATE_HZ = 100


class GatewayProfile:
    """py-spy recording the gateway replica's busy threads while a load runs (``with`` it around the load)."""

    def __init__(self, enabled: bool) -> None:
        self.spy = Path(sys.executable).parent / "py-spy"
        self.enabled = enabled and self.spy.exists()
        self.samples: collections.Counter = collections.Counter()  # part ("all" too) -> samples
        self._proc: subprocess.Popen | None = None

    def __enter__(self):
        if self.enabled:
            pid = subprocess.run(["pgrep", "-f", f"ServeReplica:{APP}:Gateway"], capture_output=True, text=True)
            self._out = Path(tempfile.mkdtemp()) / "gateway.txt"
            self._proc = subprocess.Popen([str(self.spy), "record", "-p", pid.stdout.split()[0], "-r", str(RATE_HZ),
                                           "-f", "raw", "-o", str(self._out), "--nonblocking"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)  # py-spy attached
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        self._proc.wait(timeout=60)
        self._proc = None
        for line in self._out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            self.samples["all"] += int(count)
            for part, files in PARTS.items():
                self.samples[part] += int(count) * any(f in stack for f in files)


EMBED = ("/v1/embeddings", {"model": "minilm", "input": ["the json module reads and writes json text"],
                            "encoding_format": "base64"})
CHAT = ("/v1/chat/completions", {"model": "tiny-gpt", "messages": [{"role": "user", "content": "hello"}],
                                 "max_tokens": 16, "temperature": 0, "logit_bias": {"0": -100}})


def run(args) -> dict:
    """Deploy each variant alone, round after round, and measure; then the accuracy part."""
    import aiohttp
    import ray
    import redis
    from ray import serve

    from mass.access.keys import KeyStore
    from mass.app import build_app, wait_ready
    from mass.cluster import free_port
    from mass.serving.args import AppArgs
    from mass.settings import apply_ray_start_env, get_settings

    register_models()
    store = KeyStore()
    key, secret = store.create({"name": f"bench-{uuid.uuid4().hex[:6]}", "rpm": 10**7, "tpm": 10**9,
                                "max_parallel": 10**4, "budget": f"{10**12}/day"})
    apply_ray_start_env(get_settings())
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    quiet = {"enable_access_log": False, "log_level": "WARNING"}

    def deploy(proxy_on: bool, replicas: int = 1) -> None:
        serve.run(build_app(AppArgs.model_validate(app_args(proxy_on, args.redis_url, replicas))), name=APP,
                  route_prefix="/", logging_config=quiet)
        wait_ready(url, timeout=300)

    rates = {f"{part}_{variant}": [] for part in ("embed", "chat") for variant in ("on", "off")}
    overheads: dict[str, list[float]] = {f"{part}_{variant}{load}": [] for part in ("embed", "chat")
                                         for variant in ("on", "off") for load in ("", "_light")}
    # the gateway's busy samples and requests, by part and variant (summed over rounds)
    work = {f"{part}_{variant}": [collections.Counter(), 0] for part in ("embed", "chat") for variant in ("on", "off")}

    async def measure():
        headers = {"Authorization": f"Bearer {secret}"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64), headers=headers) as http:
            for _ in range(args.rounds):
                for variant in ("on", "off"):
                    await asyncio.to_thread(deploy, variant == "on")
                    for part, (path, body), clients, n in (("embed", EMBED, 32, args.embed_requests),
                                                           ("chat", CHAT, 16, args.chat_requests)):
                        await load(http, url, path, body, max(16, n // 8), clients, [])  # warm-up
                        seen: list[float] = []
                        with GatewayProfile(args.profile) as profile:
                            seconds, tokens = await load(http, url, path, body, n, clients, seen)
                        work[f"{part}_{variant}"][0].update(profile.samples)
                        work[f"{part}_{variant}"][1] += n
                        rates[f"{part}_{variant}"].append(n / seconds if part == "embed" else tokens / seconds)
                        overheads[f"{part}_{variant}"] += seen
                        # one client at a time: no queue anywhere, so the header is the proxy's own work
                        await load(http, url, path, body, max(8, n // 8), 1, overheads[f"{part}_{variant}_light"])
                    await asyncio.to_thread(serve.delete, APP)

    async def accuracy() -> dict:
        await asyncio.to_thread(deploy, True, 2)
        rpm_key, rpm_secret = store.create({"name": f"bench-rpm-{uuid.uuid4().hex[:6]}", "rpm": 120})
        budget_key, budget_secret = store.create({"name": f"bench-budget-{uuid.uuid4().hex[:6]}",
                                                  "budget": "400/day"})
        admitted = refused = 0
        stop = time.monotonic() + args.accuracy_s
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64),
                                         headers={"Authorization": f"Bearer {rpm_secret}"}) as http:
            async def hammer():
                nonlocal admitted, refused
                while time.monotonic() < stop:
                    async with http.post(f"{url}/v1/embeddings", json=EMBED[1]) as resp:
                        await resp.read()
                        admitted += resp.status == 200
                        refused += resp.status == 429
            await asyncio.gather(*[hammer() for _ in range(64)])
        used = 0
        body = {**CHAT[1], "stream": True, "stream_options": {"include_usage": True}}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64),
                                         headers={"Authorization": f"Bearer {budget_secret}"}) as http:
            async def stream():
                nonlocal used
                async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
                    async for line in resp.content:
                        text = line.decode().strip()
                        if text.startswith("data: {") and json.loads(text[6:]).get("usage"):
                            used += json.loads(text[6:])["usage"]["total_tokens"]
            await asyncio.gather(*[stream() for _ in range(64)])
        day = time.strftime("%Y-%m-%d", time.gmtime())
        charged = int(redis.Redis.from_url(args.redis_url).get(f"mass:limits:{{{budget_key.id}}}:budget:{day}") or 0)
        await asyncio.to_thread(serve.delete, APP)
        for k in (key, rpm_key, budget_key):
            store.revoke(k.id)
        return {"rpm_limit": 120, "rpm_window_s": args.accuracy_s, "rpm_admitted": admitted, "rpm_refused": refused,
                "budget_tokens": 400, "budget_used": used, "budget_charged": charged}

    with asyncio.Runner() as runner:
        try:
            runner.run(measure())
            acc = runner.run(accuracy())
        finally:
            serve.shutdown()
            ray.shutdown()
            r = redis.Redis.from_url(args.redis_url)
            for name in r.scan_iter("mass:limits:*"):
                if key.id in name.decode() or "bench" in name.decode():
                    r.delete(name)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"rates": {k: [round(x, 1) for x in v] for k, v in rates.items()},
            "embed_on_vs_off": round(med["embed_on"] / med["embed_off"], 3),
            "chat_on_vs_off": round(med["chat_on"] / med["chat_off"], 3),
            "overhead_ms": {k: {"p50": round(percentile(v, 0.5), 2), "p99": round(percentile(v, 0.99), 2),
                                "n": len(v)} for k, v in overheads.items()},
            "gateway_work": gateway_work(work) if args.profile else None,
            "accuracy": acc}


def gateway_work(work: dict) -> dict:
    """Per variant: the gateway's busy ms per request (py-spy samples / rate / requests) and, per part of the
    proxy, its share of the samples."""
    out = {}
    for name, (samples, requests) in work.items():
        if samples["all"]:
            out[name] = {"busy_ms_per_request": round(1000 * samples["all"] / RATE_HZ / requests, 3),
                         "samples": samples["all"],
                         "share": {part: round(samples[part] / samples["all"], 4) for part in PARTS}}
    return out


def _cell(values: list[float], unit: str) -> str:
    return f"{statistics.median(values):.1f} {unit} ({min(values):.0f}–{max(values):.0f})"


def render_table(result: dict) -> str:
    """The README's proxy table (markdown) from one run's JSON; the README test checks they agree."""
    r, o, a = result["rates"], result["overhead_ms"], result["accuracy"]

    def met(ok: bool) -> str:
        return "" if ok else " (not met)"

    p99 = max(o["embed_on"]["p99"], o["chat_on"]["p99"])
    light = max(o["embed_on_light"]["p99"], o["chat_on_light"]["p99"])
    lines = [f"Run of {result['date']} on {result['machine']}; {result['rounds']} rounds, median (range over "
             "rounds).", "",
             "| part | proxy on (auth + Redis limits + ledger) | proxy off | ratio | goal |", "|---|---|---|---|---|",
             f"| MiniLM embeddings, 32 clients | {_cell(r['embed_on'], 'texts/s')} | {_cell(r['embed_off'], 'texts/s')} "
             f"| **{result['embed_on_vs_off']}x** | ≥ 0.95x{met(result['embed_on_vs_off'] >= 0.95)} |",
             f"| tiny-gpt chat, 16 clients | {_cell(r['chat_on'], 'tokens/s')} | {_cell(r['chat_off'], 'tokens/s')} "
             f"| **{result['chat_on_vs_off']}x** | ≥ 0.95x{met(result['chat_on_vs_off'] >= 0.95)} |",
             f"| gateway overhead, embeddings | p50 {o['embed_on']['p50']} / p99 {o['embed_on']['p99']} ms | "
             f"p50 {o['embed_off']['p50']} / p99 {o['embed_off']['p99']} ms | | p99 ≤ 5 ms{met(p99 <= 5)} |",
             f"| gateway overhead, chat | p50 {o['chat_on']['p50']} / p99 {o['chat_on']['p99']} ms | "
             f"p50 {o['chat_off']['p50']} / p99 {o['chat_off']['p99']} ms | | |",
             f"| gateway overhead, one client at a time (embeddings / chat) | p50 {o['embed_on_light']['p50']} / "
             f"p99 {o['embed_on_light']['p99']} ms; p50 {o['chat_on_light']['p50']} / p99 {o['chat_on_light']['p99']} "
             f"ms | p50 {o['embed_off_light']['p50']} / p99 {o['embed_off_light']['p99']} ms; p50 "
             f"{o['chat_off_light']['p50']} / p99 {o['chat_off_light']['p99']} ms | | p99 ≤ 5 ms{met(light <= 5)} |",
             f"| rpm 120, 64 clients, 2 gateway replicas, {a['rpm_window_s']:g} s | {a['rpm_admitted']} admitted, "
             f"{a['rpm_refused']} refused | | | ≤ 121{met(a['rpm_admitted'] <= 121)} |",
             f"| budget 400 tokens, 64 concurrent streams | {a['budget_used']} used, {a['budget_charged']} charged | | | "
             f"0 over{met(a['budget_charged'] <= 400 and a['budget_used'] <= 400)} |"]
    w = result.get("gateway_work")
    if w and all(f"{p}_{v}" in w for p in ("embed", "chat") for v in ("on", "off")):
        for part, label in (("embed", "embeddings"), ("chat", "chat")):
            on, off = w[f"{part}_on"], w[f"{part}_off"]
            shares = ", ".join(f"{name} {100 * share:.1f} %" for name, share in on["share"].items())
            lines.append(f"| gateway busy time per request, {label} (py-spy) | {on['busy_ms_per_request']} ms "
                         f"({shares} of it) | {off['busy_ms_per_request']} ms | "
                         f"{on['busy_ms_per_request'] / off['busy_ms_per_request']:.2f}x | |")
    return "\n".join(lines)


README_START, README_END = "<!-- benchmark:proxy -->", "<!-- /benchmark:proxy -->"


def main(argv=None) -> int:
    """Run the benchmark, print the table and the JSON line (and save / render them when asked)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of every variant (medians reported)")
    parser.add_argument("--embed-requests", type=int, default=512, help="embedding requests per run")
    parser.add_argument("--chat-requests", type=int, default=256, help="chat requests per run")
    parser.add_argument("--accuracy-s", type=float, default=60.0, help="length of the rpm accuracy run")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="the Redis the limits share")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="do not sample the gateway with py-spy")
    parser.add_argument("--json", help="also write the JSON result to this file")
    parser.add_argument("--readme", help="rewrite this README's proxy table from the result")
    args = parser.parse_args(argv)
    from serving import run_and_save  # this directory's serving benchmark (a script dir on sys.path)

    return run_and_save(args, run, render_table, (README_START, README_END))


if __name__ == "__main__":
    raise SystemExit(main())
