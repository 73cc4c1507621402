"""Serving benchmark: ratios measured side by side in one run on the same machine, model and inputs.

- continuous batching: 16 streaming requests arriving staggered (``--stagger-ms`` apart, so each joins a
  batch that is already decoding) with varied output lengths on a 4-layer,
  256-wide GPT-2 (random weights: throughput does not depend on them); our engine vs one-at-a-time HF
  ``generate`` vs one static HF batch of the same prompts; p50/p95 time to first token.
- gateway efficiency: MiniLM embeddings through the HTTP gateway on a local Ray Serve vs the same engine
  called in-process behind the same dynamic batching, 32 concurrent clients, one short text per request.
  Ray runs in the ingress mode MASS starts it in (``MASS_SERVE_INGRESS``, default HAProxy). The served
  deployment is two single-CPU replicas (one torch thread each); the in-process engine gets both cores as
  torch's two threads. A row for one two-CPU replica shows what that choice is worth.
- dynamic batching: the same load through the gateway, ``max_batch_size=32`` vs ``max_batch_size=1``.
  The same two deployments are also called through Serve handles (the SDK's in-cluster path), which
  shows how much of the gap is the HTTP path.

Every system runs ``--rounds`` times, interleaved; the table reports each one's median.
Prints a table and one JSON line.  Run:  .venv/bin/python benchmarks/serving.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import os
import statistics
import tempfile
import time


def build_model(vocab: int = 2048):
    """The benchmark GPT and a tokenizer trained on the docstring corpus."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from mass.data.corpus import collect_documents
    from mass.data.tokenizer import train_tokenizer

    tok = train_tokenizer([d["text"] for d in collect_documents(["json", "argparse"], progress=False)], vocab)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=256, n_layer=4, n_head=4,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    return GPT2LMHeadModel(cfg).eval(), tok


def workload(n: int, seed: int = 0, stagger_s: float = 0.005):
    """(prompt, new tokens, arrival offset in s) for ``n`` requests: varied lengths, staggered arrivals."""
    import random

    rng = random.Random(seed)
    words = "return the value of a parser that reads json text from files and streams".split()
    return [(" ".join(rng.choice(words) for _ in range(rng.randint(4, 24))), rng.choice([16, 32, 64, 96]),
             i * stagger_s) for i in range(n)]


def run_engine(model, tok, reqs) -> tuple[float, list[float], int]:
    """Our engine: (wall seconds, time to first token per request, tokens generated)."""
    from mass.serving.engines.llm import LLMEngine
    from mass.serving.engines.sampling import SamplingParams

    engine = LLMEngine(model, tok, max_running=16, max_batch_tokens=16 * 512)

    async def one(prompt, n, delay):
        await asyncio.sleep(delay)
        sent, first, count = time.perf_counter(), None, 0
        async for ev in engine.stream(prompt, SamplingParams(max_tokens=n, temperature=0)):
            if first is None:
                first = time.perf_counter() - sent
            count = ev.completion_tokens
        return first, count

    async def main():
        start = time.perf_counter()
        results = await asyncio.gather(*[one(p, n, d) for p, n, d in reqs])
        return time.perf_counter() - start, results

    wall, results = asyncio.run(main())
    engine.shutdown()
    return wall, [r[0] for r in results], sum(r[1] for r in results)


def in_fresh_thread(fn, *args):
    """``fn(*args)`` in a new thread that ends with it.

    torch's CPU kernels run on an OpenMP team owned by the thread that calls them, and the team lives
    as long as that thread. Once two threads own teams, libgomp (more OpenMP threads than cores) stops
    spinning between parallel regions, and every region pays a futex wake-up: the engine's decode loop
    ran markedly slower for the rest of the process after a single matmul on the main thread. So every system
    here computes on a thread of its own that exits when it is done, and one system's run cannot slow
    the next one down.
    """
    import threading

    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def run_sequential(model, tok, reqs) -> tuple[float, int]:
    """HF ``generate`` one request at a time."""
    import torch

    start, total = time.perf_counter(), 0
    with torch.inference_mode():
        for prompt, n, _ in reqs:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=tok.eos_token_id)
            total += out.shape[1] - ids.shape[1]
    return time.perf_counter() - start, total


def run_static(model, tok, reqs) -> tuple[float, int]:
    """One static HF batch: every prompt padded left, decoded to the longest output; counts useful tokens."""
    import torch

    tok.padding_side = "left"
    start = time.perf_counter()
    with torch.inference_mode():
        batch = tok([p for p, _, _ in reqs], return_tensors="pt", padding=True)
        longest = max(n for _, n, _ in reqs)
        model.generate(**batch, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                       pad_token_id=tok.eos_token_id)
    return time.perf_counter() - start, sum(n for _, n, _ in reqs)


class InProcessBatcher:
    """The in-process baseline: callers' texts merged into one ``embed`` call, as ``@serve.batch`` does."""

    def __init__(self, engine, max_batch_size: int = 32, wait_s: float = 0.01) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.engine, self.max_batch_size, self.wait_s = engine, max_batch_size, wait_s
        self.queue: asyncio.Queue | None = None
        # One compute thread, like a replica's: asyncio.to_thread would spread forwards over the default
        # executor's threads, each with its own OpenMP team (see in_fresh_thread), slowing this baseline.
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="in-process-embed")

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """Vectors for ``texts``, computed in a batch with other callers' texts."""
        if self.queue is None:
            self.queue = asyncio.Queue()
            self._task = asyncio.create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((texts, future))
        return await future

    async def _run(self) -> None:
        while True:
            items = [await self.queue.get()]
            deadline = time.monotonic() + self.wait_s
            while len(items) < self.max_batch_size:
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - time.monotonic())))
                except asyncio.TimeoutError:
                    break
            vectors, _ = await asyncio.get_running_loop().run_in_executor(
                self.pool, self.engine.embed, [t for texts, _ in items for t in texts])
            start = 0
            for texts, future in items:
                future.set_result(vectors[start:start + len(texts)])
                start += len(texts)


async def drive(call, texts: list[str], requests: int, concurrency: int = 32) -> float:
    """``requests`` calls of one text each from ``concurrency`` clients; returns texts per second."""
    todo = iter(range(requests))

    async def client():
        for i in todo:
            out = await call([texts[i % len(texts)]])
            assert len(out) == 1 and len(out[0]) == 384, out

    start = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    return requests / (time.perf_counter() - start)


def http_embedder(session, url: str, model: str):
    """A call that embeds texts through the gateway, the way the official client does (base64).

    The load generator is aiohttp: httpx (the openai client's transport) spends so much CPU per request
    that, on a 2-core machine, it would measure itself rather than the gateway.
    """
    import base64

    async def call(texts: list[str]) -> list[bytes]:
        async with session.post(f"{url}/v1/embeddings", json={"model": model, "input": texts,
                                                               "encoding_format": "base64"}) as resp:
            resp.raise_for_status()
            body = await resp.json()
        return [base64.b64decode(d["embedding"])[::4] for d in body["data"]]  # 384 floats -> 384 items

    return call


def run_gateway_parts(rounds: int, requests: int) -> dict[str, list[float]]:
    """Embeddings in-process vs through the gateway (batched, and with max_batch_size=1): texts/s per round."""
    import aiohttp
    import ray
    from ray import serve

    from mass.data.corpus import collect_documents
    from mass.registry import ModelRegistry
    from mass.registry.imports import import_minilm
    from mass.serving.app import build_app
    from mass.serving.args import AppArgs
    from mass.serving.engines.embedding import EmbeddingEngine
    from mass.serving.launch import APP_NAME, free_port, wait_ready
    from mass.settings import apply_ray_start_env, get_settings

    import_minilm(ModelRegistry())
    texts = [d["text"].strip().splitlines()[0] for d in collect_documents(["json", "argparse", "textwrap"],
                                                                         progress=False)]
    model, tokenizer, _ = ModelRegistry().load("minilm-l6@production")
    batcher = InProcessBatcher(EmbeddingEngine(model, tokenizer), max_batch_size=32, wait_s=0.01)

    apply_ray_start_env(get_settings())  # as `mass serve up` starts a local Ray
    ray.init(address="local", num_cpus=8, include_dashboard=False, configure_logging=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    minilm = {"ref": "minilm-l6@production", "engine": "embedding", "max_ongoing_requests": 64}
    per_core = {"num_cpus": 1, "autoscaling": {"min_replicas": 2, "max_replicas": 2}}
    batched = {"max_batch_size": 32, "batch_wait_timeout_s": 0.01}
    serve.run(build_app(AppArgs.model_validate({"gateway": {"num_cpus": 0.5}, "models": [
        {"name": "minilm", **minilm, **per_core, "batch": batched},
        {"name": "minilm-unbatched", **minilm, **per_core, "batch": {"max_batch_size": 1}},
        {"name": "minilm-1x2", **minilm, "num_cpus": 2, "batch": batched}]})), name=APP_NAME, route_prefix="/",
        logging_config={"enable_access_log": False, "log_level": "WARNING"})
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, timeout=300)

    async def measure() -> dict[str, list[float]]:
        def handle_embedder(deployment: str):
            handle = serve.get_deployment_handle(deployment, APP_NAME)

            async def call(batch: list[str]) -> list[list[float]]:
                return (await handle.embed.remote(batch))["data"]
            return call

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
            systems = {"in_process": batcher.embed, "gateway": http_embedder(http, url, "minilm"),
                       "gateway_unbatched": http_embedder(http, url, "minilm-unbatched"),
                       "gateway_one_2cpu_replica": http_embedder(http, url, "minilm-1x2"),
                       "handle": handle_embedder("embedding-minilm"),
                       "handle_unbatched": handle_embedder("embedding-minilm-unbatched")}
            results: dict[str, list[float]] = {name: [] for name in systems}
            for call in systems.values():  # warm-up: loads, first batches, connections
                await drive(call, texts, 64)
            for _ in range(rounds):
                for name, call in systems.items():
                    results[name].append(await drive(call, texts, requests))
        return results

    # One loop for the measurement and the shutdown: with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 the handles'
    # router lives on the caller's loop, and shutting them down needs that loop still open.
    with asyncio.Runner() as runner:
        try:
            return runner.run(measure())
        finally:
            batcher.pool.shutdown()
            serve.shutdown()
            ray.shutdown()


def main(argv=None) -> int:
    """Run the benchmark and print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "continuous", "gateway"], default="all")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every system (medians reported)")
    parser.add_argument("--requests", type=int, default=16, help="continuous batching: requests")
    parser.add_argument("--stagger-ms", type=float, default=5.0,
                        help="continuous batching: gap between arrivals (each joins a batch mid-decode)")
    parser.add_argument("--embed-requests", type=int, default=512, help="gateway parts: requests per run")
    args = parser.parse_args(argv)
    import torch

    os.environ.setdefault("MASS_HOME", tempfile.mkdtemp(prefix="mass-bench-"))  # a private registry
    result: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                               f"{torch.get_num_threads()} threads", "rounds": args.rounds}
    rows: list[tuple[str, str, float]] = []
    if args.part in ("all", "continuous"):
        model, tok = build_model()
        reqs = workload(args.requests, stagger_s=args.stagger_ms / 1000)
        result["stagger_ms"] = args.stagger_ms
        run_engine(model, tok, reqs[:2])  # warm-up
        runs: dict[str, list[float]] = {"engine": [], "one_by_one": [], "static_batch": []}
        ttfts: list[list[float]] = []
        for _ in range(args.rounds):
            wall, ttft, tokens = run_engine(model, tok, reqs)
            runs["engine"].append(tokens / wall)
            ttfts.append(ttft)
            wall, tokens = in_fresh_thread(run_sequential, model, tok, reqs)
            runs["one_by_one"].append(tokens / wall)
            wall, tokens = in_fresh_thread(run_static, model, tok, reqs)
            runs["static_batch"].append(tokens / wall)
        rates = {k: statistics.median(v) for k, v in runs.items()}
        ttft = [t for run in ttfts for t in run]
        result["tokens_per_s"] = {k: round(v, 1) for k, v in rates.items()}
        result["engine_vs_one_by_one"] = round(rates["engine"] / rates["one_by_one"], 2)
        result["engine_vs_static_batch"] = round(rates["engine"] / rates["static_batch"], 2)
        result["ttft_ms_p50"] = round(statistics.median(ttft) * 1000, 1)
        result["ttft_ms_p95"] = round(statistics.quantiles(ttft, n=20)[18] * 1000, 1)
        rows += [(f"LLM {k}", "tokens/s", v) for k, v in rates.items()]
    if args.part in ("all", "gateway"):
        from mass.settings import get_settings

        result["serve_ingress"] = get_settings().serve_ingress
        runs = run_gateway_parts(args.rounds, args.embed_requests)
        rates = {k: statistics.median(v) for k, v in runs.items()}
        result["texts_per_s"] = {k: round(v, 1) for k, v in rates.items()}
        result["gateway_vs_in_process"] = round(rates["gateway"] / rates["in_process"], 2)
        result["batched_vs_unbatched"] = round(rates["gateway"] / rates["gateway_unbatched"], 2)
        rows += [(f"MiniLM {k}", "texts/s", v) for k, v in rates.items()]

    print(f"{'system':<26} {'unit':<9} {'median':>9}")
    for name, unit, rate in rows:
        print(f"{name:<26} {unit:<9} {rate:>9.1f}")
    goals = [("engine_vs_one_by_one", 5.0, "continuous batching: engine / one-by-one HF generate"),
             ("engine_vs_static_batch", 0.8, "continuous batching: engine / static HF batch"),
             ("gateway_vs_in_process", 0.8, "gateway efficiency: HTTP gateway / in-process"),
             ("batched_vs_unbatched", 2.0, "dynamic batching: max_batch_size=32 / max_batch_size=1")]
    for key, goal, label in goals:
        if key in result:
            print(f"{label} = {result[key]}x (goal >= {goal}x){'' if result[key] >= goal else '  NOT MET'}")
    if "ttft_ms_p50" in result:
        print(f"time to first token: p50 {result['ttft_ms_p50']} ms, p95 {result['ttft_ms_p95']} ms")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
