"""Serving benchmark: ratios measured side by side in one run on the same machine, model and inputs.

Part implemented so far — continuous batching: 16 streaming requests arriving staggered with varied output
lengths on a 4-layer, 256-wide GPT-2 (random weights: throughput does not depend on them); our engine vs
one-at-a-time HF ``generate`` vs one static HF batch of the same prompts; p50/p95 time to first token.
Prints a table and one JSON line.  Run:  .venv/bin/python benchmarks/serving.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
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


def workload(n: int, seed: int = 0):
    """(prompt, new tokens, arrival offset in s) for ``n`` requests: varied lengths, staggered arrivals."""
    import random

    rng = random.Random(seed)
    words = "return the value of a parser that reads json text from files and streams".split()
    return [(" ".join(rng.choice(words) for _ in range(rng.randint(4, 24))), rng.choice([16, 32, 64, 96]),
             i * 0.02) for i in range(n)]


def run_engine(model, tok, reqs) -> tuple[float, list[float], int]:
    """Our engine: (wall seconds, time to first token per request, tokens generated)."""
    from mass.serving.engines.llm import LLMEngine
    from mass.serving.engines.sampling import SamplingParams

    engine = LLMEngine(model, tok, max_running=16, max_batch_tokens=16 * 512)

    async def one(prompt, n, delay, start):
        await asyncio.sleep(delay)
        sent, first, count = time.perf_counter(), None, 0
        async for ev in engine.stream(prompt, SamplingParams(max_tokens=n, temperature=0)):
            if first is None:
                first = time.perf_counter() - sent
            count = ev.completion_tokens
        return first, count

    async def main():
        start = time.perf_counter()
        results = await asyncio.gather(*[one(p, n, d, start) for p, n, d in reqs])
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


def main(argv=None) -> int:
    """Run the benchmark and print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    args = parser.parse_args(argv)
    import torch

    model, tok = build_model()
    reqs = workload(args.requests)
    run_engine(model, tok, reqs[:2])  # warm-up
    eng_wall, ttft, eng_tokens = run_engine(model, tok, reqs)
    seq_wall, seq_tokens = run_sequential(model, tok, reqs)
    st_wall, st_tokens = run_static(model, tok, reqs)
    rates = {"engine": eng_tokens / eng_wall, "one_by_one": seq_tokens / seq_wall, "static_batch": st_tokens / st_wall}
    q = statistics.quantiles(ttft, n=20)
    result = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "tokens_per_s": {k: round(v, 1) for k, v in rates.items()},
        "engine_vs_one_by_one": round(rates["engine"] / rates["one_by_one"], 2),
        "engine_vs_static_batch": round(rates["engine"] / rates["static_batch"], 2),
        "ttft_ms_p50": round(statistics.median(ttft) * 1000, 1), "ttft_ms_p95": round(q[18] * 1000, 1),
    }
    print(f"{'system':<14} {'tokens/s':>10}")
    for name, rate in rates.items():
        print(f"{name:<14} {rate:>10.1f}")
    print(f"engine / one-by-one = {result['engine_vs_one_by_one']}x (goal >= 5x); engine / static batch = "
          f"{result['engine_vs_static_batch']}x (goal >= 0.8x); TTFT p50 {result['ttft_ms_p50']} ms, "
          f"p95 {result['ttft_ms_p95']} ms")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
