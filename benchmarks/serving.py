"""Serving benchmark: ratios measured side by side in one run on the same machine, model and inputs.

- continuous batching: 16 streaming requests arriving staggered (``--stagger-ms`` apart, so each joins a
  batch that is already decoding) with varied output lengths on a 4-layer,
  256-wide GPT-2 (random weights: throughput does not depend on them); our engine (lean GPT-2 runner, and
  the generic HF-forward runner, which separates what scheduling gives from what the lean forward gives)
  vs one-at-a-time HF ``generate`` vs one static HF batch of the same prompts; p50/p95 time to first token.
  Every system is warmed up and produces exactly the requested tokens (EOS is biased away in the engine,
  ``min_new_tokens`` in HF); the counts are asserted.
- gateway efficiency: MiniLM embeddings through the HTTP gateway on a local Ray Serve (two single-CPU
  replicas) vs the best layout a user could run in-process on the same cores behind the same dynamic
  batching: one process with torch's two threads, or two single-thread worker processes with a batcher
  each (requests spread round-robin); the faster is the baseline. Nothing else is deployed while a system
  runs: each served variant is deployed alone, and the in-process layouts run with no app deployed.
  Ray runs in the ingress mode MASS starts it in (``MASS_SERVE_INGRESS``, default HAProxy). A row for one
  two-CPU replica shows what the deployment choice is worth.
- dynamic batching: the same load through the gateway, ``max_batch_size=32`` vs ``max_batch_size=1``.
  The same two deployments are also called through Serve handles (the SDK's in-cluster path), which
  shows how much of the gap is the HTTP path.

Every system runs ``--rounds`` times, interleaved; the table reports each one's median and the range over
rounds. Prints a table and one JSON line; ``--json PATH`` saves the JSON and ``--readme README.md`` rewrites
the README's table from it.  Run:  .venv/bin/python benchmarks/serving.py --json benchmarks/results/serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from mass.threads import on_fresh_thread as in_fresh_thread  # every system computes on a thread of its own


def build_model(vocab: int = 2048, shape: str = "4x256", device: str = "cpu"):
    """The benchmark GPT (``shape``: layers x width, 64-wide heads from width 512 up, 4 heads below) on
    ``device``, and a tokenizer trained on the docstring corpus."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from mass.data.corpus import collect_documents
    from mass.data.tokenizer import train_tokenizer

    tok = train_tokenizer([d["text"] for d in collect_documents(["json", "argparse"], progress=False)], vocab)
    layers, width = (int(x) for x in shape.split("x"))
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=width, n_layer=layers,
                     n_head=width // 64 if width >= 512 else 4,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    return GPT2LMHeadModel(cfg).eval().to(device), tok


def workload(n: int, seed: int = 0, stagger_s: float = 0.005):
    """(prompt, new tokens, arrival offset in s) for ``n`` requests: varied lengths, staggered arrivals."""
    import random

    rng = random.Random(seed)
    words = "return the value of a parser that reads json text from files and streams".split()
    return [(" ".join(rng.choice(words) for _ in range(rng.randint(4, 24))), rng.choice([16, 32, 64, 96]),
             i * stagger_s) for i in range(n)]


def run_engine(model, tok, reqs, fast: bool = True) -> tuple[float, list[float], int]:
    """Our engine (``fast``: the lean GPT-2 runner; else HF's forward): (wall seconds, time to first token
    per request, tokens generated). EOS is biased away so every request makes its n tokens, as
    ``min_new_tokens`` makes the HF baselines do."""
    from mass.serving.engines.llm import LLMEngine
    from mass.serving.engines.sampling import SamplingParams

    engine = LLMEngine(model, tok, max_running=16, max_batch_tokens=16 * 512, fast=fast)
    no_eos = {tok.eos_token_id: -100.0}

    async def one(prompt, n, delay):
        await asyncio.sleep(delay)
        sent, first, count = time.perf_counter(), None, 0
        async for ev in engine.stream(prompt, SamplingParams(max_tokens=n, temperature=0, logit_bias=no_eos)):
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


def run_sequential(model, tok, reqs) -> tuple[float, int]:
    """HF ``generate`` one request at a time."""
    import torch

    start, total = time.perf_counter(), 0
    with torch.inference_mode():
        for prompt, n, _ in reqs:
            ids = tok(prompt, return_tensors="pt")["input_ids"].to(model.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=tok.eos_token_id)
            total += out.shape[1] - ids.shape[1]
    return time.perf_counter() - start, total


def run_static(model, tok, reqs) -> tuple[float, int]:
    """One static HF batch: every prompt padded left, decoded to the longest output; counts useful tokens
    (each request's own n: the padding steps past it are the waste continuous batching removes)."""
    import torch

    tok.padding_side = "left"
    start = time.perf_counter()
    with torch.inference_mode():
        batch = tok([p for p, _, _ in reqs], return_tensors="pt", padding=True).to(model.device)
        longest = max(n for _, n, _ in reqs)
        out = model.generate(**batch, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    assert out.shape[1] - batch["input_ids"].shape[1] == longest, "the static batch stopped early"
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


class WorkerPoolEmbedder:
    """The other in-process layout: ``workers`` single-thread processes, each an ``EmbeddingEngine`` behind its
    own batcher (up to ``max_batch_size`` texts, ``wait_s``), requests spread round-robin over pipes. On two
    cores this is the served shape (one compute thread per core) without a serving system."""

    def __init__(self, model_dir: str, workers: int = 2, max_batch_size: int = 32, wait_s: float = 0.01,
                 dtype: str = "float32") -> None:
        import itertools
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_embed_worker, args=(child, model_dir, max_batch_size, wait_s, dtype),
                               daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            assert conn.recv() == "ready"
        self.futures: dict[int, asyncio.Future] = {}
        self.ids, self.turn = itertools.count(), itertools.cycle(range(workers))
        self.loop: asyncio.AbstractEventLoop | None = None

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """Vectors for ``texts``, batched in the next worker with other callers' texts."""
        import threading

        if self.loop is None:
            self.loop = asyncio.get_running_loop()
            for conn in self.conns:
                threading.Thread(target=self._read, args=(conn,), daemon=True).start()
        rid = next(self.ids)
        self.futures[rid] = future = self.loop.create_future()
        self.conns[next(self.turn)].send((rid, texts))
        return await future

    def _read(self, conn) -> None:
        while True:
            try:
                answers = conn.recv()
            except (EOFError, OSError):
                return
            for rid, vectors in answers:
                self.loop.call_soon_threadsafe(self.futures.pop(rid).set_result, vectors)

    def close(self) -> None:
        """Stop the workers."""
        for conn in self.conns:
            conn.send(None)
        for proc in self.procs:
            proc.join(timeout=30)


def _embed_worker(conn, model_dir: str, max_batch_size: int, wait_s: float, dtype: str = "float32") -> None:
    """One worker process: one torch thread, one engine (MiniLM in ``dtype``), a batcher over its pipe."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from mass.serving.engines.embedding import EmbeddingEngine

    torch.set_num_threads(1)
    engine = EmbeddingEngine(AutoModel.from_pretrained(model_dir).to(getattr(torch, dtype)),
                             AutoTokenizer.from_pretrained(model_dir))
    conn.send("ready")
    while True:
        item = conn.recv()
        if item is None:
            return
        items, size, deadline = [item], len(item[1]), time.monotonic() + wait_s
        while size < max_batch_size and conn.poll(max(0.0, deadline - time.monotonic())):
            item = conn.recv()
            if item is None:
                return
            items.append(item)
            size += len(item[1])
        vectors, _ = engine.embed([text for _, texts in items for text in texts])
        out, start = [], 0
        for rid, texts in items:
            out.append((rid, vectors[start:start + len(texts)]))
            start += len(texts)
        conn.send(out)


#: the served variants; each is deployed alone while it is measured (nothing idle shares the cores)
SERVED = {"gateway": {"num_cpus": 1, "autoscaling": {"min_replicas": 2, "max_replicas": 2},
                      "batch": {"max_batch_size": 32, "batch_wait_timeout_s": 0.01}},
          "gateway_unbatched": {"num_cpus": 1, "autoscaling": {"min_replicas": 2, "max_replicas": 2},
                                "batch": {"max_batch_size": 1}},
          "gateway_one_2cpu_replica": {"num_cpus": 2, "batch": {"max_batch_size": 32, "batch_wait_timeout_s": 0.01}}}
HANDLE_ROWS = {"gateway": "handle", "gateway_unbatched": "handle_unbatched"}  # the same deployment via handles


def run_gateway_parts(rounds: int, requests: int) -> tuple[dict[str, list[float]], str]:
    """Embeddings in-process (both layouts) vs through the gateway (per-core replicas batched and with
    max_batch_size=1, one 2-CPU replica) and through Serve handles: texts/s per round (after a warm-up
    round that is not counted); and the dtype every system ran MiniLM in (``dtype: auto``'s choice here)."""
    import aiohttp
    import ray
    from ray import serve

    from mass.access.keys import KeyStore
    from mass.app import APP_NAME, build_app, wait_ready
    from mass.cluster import free_port
    from mass.data.corpus import collect_documents
    from mass.registry import ModelRegistry
    from mass.registry.imports import import_minilm, minilm_dir
    from mass.serving.args import AppArgs
    from mass.serving.engines.embedding import EmbeddingEngine
    from mass.settings import apply_ray_start_env, get_settings

    import_minilm(ModelRegistry())
    texts = [d["text"].strip().splitlines()[0] for d in collect_documents(["json", "argparse", "textwrap"],
                                                                         progress=False)]
    from mass.serving.precision import choose

    model, tokenizer, _ = ModelRegistry().load("minilm-l6@production")
    # the served default (dtype: auto) makes the same choice on this machine: every system runs in that dtype
    model, chosen = choose(model, tokenizer, "embedding", "cpu")
    batcher = InProcessBatcher(EmbeddingEngine(model, tokenizer), max_batch_size=32, wait_s=0.01)
    workers = WorkerPoolEmbedder(str(minilm_dir()), workers=2, max_batch_size=32, wait_s=0.01, dtype=chosen.dtype)

    apply_ray_start_env(get_settings())  # as `mass serve up` starts a local Ray
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"

    def deploy(variant: str) -> None:
        model_args = {"name": "minilm", "ref": "minilm-l6@production", "engine": "embedding",
                      "max_ongoing_requests": 64, **SERVED[variant]}
        serve.run(build_app(AppArgs.model_validate({"gateway": {"num_cpus": 0.5}, "models": [model_args]})),
                  name=APP_NAME, route_prefix="/", logging_config={"enable_access_log": False,
                                                                   "log_level": "WARNING"})
        wait_ready(url, timeout=300)

    async def measure() -> dict[str, list[float]]:
        results: dict[str, list[float]] = {name: [] for name in ("in_process_1x2", "in_process_2x1", *SERVED,
                                                                 *HANDLE_ROWS.values())}
        # the gateway as deployed by default: auth on and the ledger on, with a key without limits
        _, secret = KeyStore().create({"name": f"bench-serving-{os.urandom(3).hex()}"})
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64),
                                         headers={"Authorization": f"Bearer {secret}"}) as http:
            for round_ in range(rounds + 1):  # round 0 warms every system up (loads, first batches, sockets)
                count = 64 if round_ == 0 else requests
                runs = {"in_process_1x2": batcher.embed, "in_process_2x1": workers.embed}
                for name, call in runs.items():
                    rate = await drive(call, texts, count)
                    if round_:
                        results[name].append(rate)
                for variant in SERVED:
                    await asyncio.to_thread(deploy, variant)
                    rows = {variant: http_embedder(http, url, "minilm")}
                    if variant in HANDLE_ROWS:
                        handle = serve.get_deployment_handle("embedding-minilm", APP_NAME)

                        async def call(batch: list[str], handle=handle) -> list[list[float]]:
                            return (await handle.embed.remote(batch))["data"]
                        rows[HANDLE_ROWS[variant]] = call
                    for name, call in rows.items():
                        rate = await drive(call, texts, count)
                        if round_:
                            results[name].append(rate)
                    await asyncio.to_thread(serve.delete, APP_NAME)
        return results

    # One loop for the measurement and the shutdown: with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 the handles'
    # router lives on the caller's loop, and shutting them down needs that loop still open.
    with asyncio.Runner() as runner:
        try:
            return runner.run(measure()), chosen.dtype
        finally:
            batcher.pool.shutdown()
            workers.close()
            serve.shutdown()
            ray.shutdown()


GOALS = [("engine_vs_one_by_one", 5.0, "continuous batching: engine / one-by-one HF generate"),
         ("engine_vs_static_batch", 0.8, "continuous batching: engine / static HF batch"),
         ("gateway_vs_in_process", 0.8, "gateway efficiency: HTTP gateway / best in-process layout"),
         ("batched_vs_unbatched", 2.0, "dynamic batching: max_batch_size=32 / max_batch_size=1")]


def run_continuous(args, result: dict) -> None:
    """The continuous-batching part: tokens/s per round of each system, TTFTs, ratios into ``result``."""
    model, tok = build_model(shape=args.shape, device=args.device)
    reqs = workload(args.requests, stagger_s=args.stagger_ms / 1000)
    want = sum(n for _, n, _ in reqs)
    systems = {"engine": lambda r: run_engine(model, tok, r)[::2],
               "engine_hf_runner": lambda r: run_engine(model, tok, r, fast=False)[::2],
               "one_by_one": lambda r: run_sequential(model, tok, r),
               "static_batch": lambda r: run_static(model, tok, r)}
    for run in systems.values():  # warm-up of every system: first calls, allocator, OpenMP teams
        in_fresh_thread(run, reqs[:2])
    runs: dict[str, list[float]] = {name: [] for name in systems}
    ttfts: list[float] = []
    for _ in range(args.rounds):
        for name, run in systems.items():
            if name == "engine":
                wall, ttft, tokens = in_fresh_thread(run_engine, model, tok, reqs)
                ttfts += ttft
            else:
                wall, tokens = in_fresh_thread(run, reqs)
            assert tokens == want, f"{name} produced {tokens} tokens, not {want}"
            runs[name].append(tokens / wall)
    result["stagger_ms"], result["tokens_per_request_total"] = args.stagger_ms, want
    result["shape"], result["device"] = args.shape, args.device
    result["tokens_per_s"] = {k: [round(v, 1) for v in vs] for k, vs in runs.items()}
    med = {k: statistics.median(v) for k, v in runs.items()}
    result["engine_vs_one_by_one"] = round(med["engine"] / med["one_by_one"], 2)
    result["engine_vs_static_batch"] = round(med["engine"] / med["static_batch"], 2)
    result["engine_hf_runner_vs_one_by_one"] = round(med["engine_hf_runner"] / med["one_by_one"], 2)
    result["engine_hf_runner_vs_static_batch"] = round(med["engine_hf_runner"] / med["static_batch"], 2)
    result["ttft_ms_p50"] = round(statistics.median(ttfts) * 1000, 1)
    result["ttft_ms_p95"] = round(statistics.quantiles(ttfts, n=20)[18] * 1000, 1)


def run_gateway(args, result: dict) -> None:
    """The gateway-efficiency and dynamic-batching parts: texts/s per round of each system, ratios."""
    from mass.settings import get_settings

    result["serve_ingress"] = get_settings().serve_ingress
    runs, result["embedding_dtype"] = run_gateway_parts(args.rounds, args.embed_requests)
    result["texts_per_s"] = {k: [round(v, 1) for v in vs] for k, vs in runs.items()}
    med = {k: statistics.median(v) for k, v in runs.items()}
    baseline = max(("in_process_1x2", "in_process_2x1"), key=med.get)
    result["in_process_baseline"] = baseline
    result["gateway_vs_in_process"] = round(med["gateway"] / med[baseline], 2)
    result["gateway_one_2cpu_replica_vs_in_process"] = round(med["gateway_one_2cpu_replica"] / med[baseline], 2)
    result["batched_vs_unbatched"] = round(med["gateway"] / med["gateway_unbatched"], 2)
    result["handle_batched_vs_unbatched"] = round(med["handle"] / med["handle_unbatched"], 2)


def _cell(values: list[float], unit: str) -> str:
    """``median unit (min–max)`` over rounds."""
    return f"{statistics.median(values):.1f} {unit} ({min(values):.0f}–{max(values):.0f})"


def render_table(result: dict) -> str:
    """The README's benchmark table (markdown) from one run's JSON; the README test checks they agree."""
    dtype = (f" MiniLM ran in {result['embedding_dtype']} in every system (what `dtype: auto` chose on this "
             "machine)." if "embedding_dtype" in result else "")
    lines = [f"Run of {result['date']} on {result['machine']}; {result['rounds']} rounds, median (range over "
             f"rounds).{dtype}{' ' + result['note'] if result.get('note') else ''}", "",
             "| part | system | median (range) | ratio | goal |", "|---|---|---|---|---|"]
    if "tokens_per_s" in result:
        t, ok = result["tokens_per_s"], _met(result)
        lines += [
            f"| continuous batching | MASS engine, lean GPT-2 runner | {_cell(t['engine'], 'tokens/s')} | — | — |",
            f"| | MASS engine, HF-forward runner | {_cell(t['engine_hf_runner'], 'tokens/s')} | "
            f"{result['engine_hf_runner_vs_one_by_one']}x / {result['engine_hf_runner_vs_static_batch']}x | |",
            f"| | HF `generate`, one request at a time | {_cell(t['one_by_one'], 'tokens/s')} | "
            f"engine = **{result['engine_vs_one_by_one']}x** | ≥ 5x{ok('engine_vs_one_by_one')} |",
            f"| | HF `generate`, one static batch | {_cell(t['static_batch'], 'tokens/s')} | "
            f"engine = **{result['engine_vs_static_batch']}x** | ≥ 0.8x{ok('engine_vs_static_batch')} |",
            f"| | time to first token (engine) | p50 {result['ttft_ms_p50']} ms, p95 {result['ttft_ms_p95']} ms "
            "| | |"]
    if "texts_per_s" in result:
        e, ok = result["texts_per_s"], _met(result)
        base = result["in_process_baseline"]
        mark = {"in_process_1x2": "", "in_process_2x1": ""}
        mark[base] = " ← baseline"
        lines += [
            f"| gateway efficiency | in-process, 1 process × 2 torch threads{mark['in_process_1x2']} | "
            f"{_cell(e['in_process_1x2'], 'texts/s')} | — | — |",
            f"| | in-process, 2 processes × 1 thread{mark['in_process_2x1']} | "
            f"{_cell(e['in_process_2x1'], 'texts/s')} | — | — |",
            f"| | HTTP gateway, 2 × 1-CPU replicas | {_cell(e['gateway'], 'texts/s')} | "
            f"gateway = **{result['gateway_vs_in_process']}x** | ≥ 0.8x{ok('gateway_vs_in_process')} |",
            f"| | HTTP gateway, one 2-CPU replica | {_cell(e['gateway_one_2cpu_replica'], 'texts/s')} | "
            f"{result['gateway_one_2cpu_replica_vs_in_process']}x | |",
            f"| dynamic batching | gateway, `max_batch_size: 1` | {_cell(e['gateway_unbatched'], 'texts/s')} | "
            f"batched = **{result['batched_vs_unbatched']}x** | ≥ 2x{ok('batched_vs_unbatched')} |",
            f"| | Serve handle, batched / `max_batch_size: 1` | {statistics.median(e['handle']):.1f} / "
            f"{statistics.median(e['handle_unbatched']):.1f} texts/s | {result['handle_batched_vs_unbatched']}x | |"]
    return "\n".join(lines)


def _met(result: dict):
    goals = {key: goal for key, goal, _ in GOALS}
    return lambda key: "" if result[key] >= goals[key] else " (not met)"


README_START, README_END = "<!-- benchmark:serving -->", "<!-- /benchmark:serving -->"


def readme_markers(device: str = "cpu", shape: str = "4x256") -> tuple[str, str]:
    """The README block a run renders into: the main table, or one per (CUDA device, shape) for the GPU runs."""
    if device == "cpu" and shape == "4x256":
        return README_START, README_END
    tag = f"serving-{device}-{shape}"
    return f"<!-- benchmark:{tag} -->", f"<!-- /benchmark:{tag} -->"


def save(result: dict, json_path: str | None, readme: str | None, markers: tuple[str, str], table: str) -> None:
    """Print the JSON line; write it to ``json_path`` and ``table`` between the README's ``markers`` when asked."""
    print(json.dumps(result))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    if readme:
        replace_block(readme, *markers, table)


def run_and_save(args, run, render_table, markers: tuple[str, str]) -> int:
    """The tail every benchmark's ``main`` shares: a private MASS_HOME (registry, platform database, event log),
    ``run(args)`` under the machine line, the table printed, the JSON line printed and saved as asked."""
    os.environ.setdefault("MASS_HOME", tempfile.mkdtemp(prefix="mass-bench-"))
    result = {"machine": machine_line(),
              "rounds": args.rounds, "date": time.strftime("%Y-%m-%d"), **run(args)}
    print(render_table(result))
    save(result, args.json, args.readme, markers, render_table(result))
    return 0


GATEWAY_KEYS = ("serve_ingress", "texts_per_s", "in_process_baseline", "gateway_vs_in_process",
                "gateway_one_2cpu_replica_vs_in_process", "batched_vs_unbatched", "handle_batched_vs_unbatched")


def saved_other_part(path: str | None, machine: str, is_other) -> tuple[dict, dict] | None:
    """The saved JSON at ``path`` and its keys of the part this run did not measure (``is_other(key)``), when it
    ran on the same machine line (same CPU, cores, torch, threads): one table, one machine. None otherwise (no
    file, or another machine: said on stdout), and the table has only this run's part. Shared by the benchmarks
    that run in parts (``--part``)."""
    if not path or not Path(path).exists():
        return None
    saved = json.loads(Path(path).read_text())
    if saved.get("machine") != machine:
        print(f"not merging {path}: it ran on {saved.get('machine')!r}, this on {machine!r}")
        return None
    return saved, {k: v for k, v in saved.items() if is_other(k) and k not in ("machine", "rounds", "date")}


def with_other_part(result: dict, args) -> dict:
    """A one-part run completed by the other part of the saved JSON (``saved_other_part``); the dates of both."""
    found = None if args.part == "all" else saved_other_part(
        args.json, result["machine"], lambda k: (k in GATEWAY_KEYS) == (args.part == "continuous"))
    if found is None:
        return result
    saved, other = found
    dates = sorted({saved.get("date"), result["date"]})
    return {**result, **other, "date": " and ".join(d for d in dates if d)}


def cpu_name() -> str:
    """The CPU's model name and the vector extensions that decide int8/bf16 speed (AVX-512 VNNI and BF16, or AVX2
    only): figures from different CPUs are not comparable, so every machine line names it."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.processor() or "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    isa = [label for flag, label in (("avx512_vnni", "AVX-512 VNNI"), ("avx512_bf16", "AVX-512 BF16"),
                                     ("amx_tile", "AMX")) if flag in flags]
    return f"{name} ({', '.join(isa) if isa else 'AVX2' if 'avx2' in flags else 'no AVX2'})"


def machine_line(threads: bool = False) -> str:
    """Where a benchmark ran: architecture, CPU, cores, GPU, torch (and its thread count)."""
    import torch

    line = f"{platform.machine()}, {cpu_name()}, {os.cpu_count()} cores, {gpu_name()}, torch {torch.__version__}"
    return line + (f" ({torch.get_num_threads()} threads)" if threads else "")


def gpu_name() -> str:
    """The CUDA device's name for the machine line, or "no GPU"."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def replace_block(path: str, start: str, end: str, text: str) -> None:
    """Replace what lies between the markers ``start`` and ``end`` in the file at ``path`` with ``text``."""
    from pathlib import Path

    whole = Path(path).read_text()
    head, rest = whole.split(start, 1)
    _, tail = rest.split(end, 1)
    Path(path).write_text(f"{head}{start}\n{text}\n{end}{tail}")


def main(argv=None) -> int:
    """Run the benchmark, print the table and the JSON line (and save / render them when asked)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "continuous", "gateway"], default="all")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every system (medians reported)")
    parser.add_argument("--requests", type=int, default=16, help="continuous batching: requests")
    parser.add_argument("--stagger-ms", type=float, default=5.0,
                        help="continuous batching: gap between arrivals (each joins a batch mid-decode)")
    parser.add_argument("--shape", default="4x256", help="continuous batching: the GPT's layers x width")
    parser.add_argument("--device", default="cpu", help="continuous batching: torch device of every system "
                        "(cuda: the GPU tier's check; the gateway parts stay on the CPU)")
    parser.add_argument("--embed-requests", type=int, default=512, help="gateway parts: requests per run")
    parser.add_argument("--json", help="also write the JSON result to this file")
    parser.add_argument("--readme", help="rewrite this README's benchmark table from the result")
    args = parser.parse_args(argv)

    os.environ.setdefault("MASS_HOME", tempfile.mkdtemp(prefix="mass-bench-"))  # a private registry
    result: dict = {"machine": machine_line(threads=True), "rounds": args.rounds,
                    "date": time.strftime("%Y-%m-%d")}
    if args.part in ("all", "continuous"):
        run_continuous(args, result)
    if args.part in ("all", "gateway"):
        run_gateway(args, result)
    result = with_other_part(result, args)
    print(render_table(result))
    for key, goal, label in GOALS:
        if key in result:
            print(f"{label} = {result[key]}x (goal >= {goal}x){'' if result[key] >= goal else '  NOT MET'}")
    save(result, args.json, args.readme, readme_markers(args.device, args.shape), render_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
