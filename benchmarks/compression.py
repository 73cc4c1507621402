"""Compression benchmark: the pretrained MiniLM quantized by ``mass compress quantize`` (ONNX Runtime int8 on the ONNX
export, PyTorch dynamic int8, bitsandbytes int8 and nf4) and every child measured on the card against its parent
on this machine, in one run: bytes on disk,
weights in memory, resident memory grown, latency at batch 1, throughput at batch 32 over held-out docstring
first lines (median and range over rounds), mean cosine to the parent's embeddings and top-10 retrieval overlap.
The parent in bf16 is the reference row (nearly free on CPUs with AVX-512 BF16).

Prints a table and one JSON line; ``--json PATH`` saves the JSON (and the card's chart beside it as PNG) and
``--readme README.md`` rewrites the README's compression table.
Run:  .venv/bin/python benchmarks/compression.py --json benchmarks/results/compression.json --readme README.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

README_START, README_END = "<!-- benchmark:compression -->", "<!-- /benchmark:compression -->"
GOAL_SPEEDUP, GOAL_QUALITY, GOAL_TOP10 = 2.5, 0.98, 0.90
GOAL_MEMORY, GOAL_MEMORY_QUALITY = 0.30, 0.99


INT8 = ("onnx-int8", "torch-int8")  # the goal's candidates


def run(args) -> dict:
    """Import MiniLM into the private registry, quantize it by every method in one job on a local Ray, return
    the cards (one per method, and all rows in one) and the verdicts."""
    from mass.compression.card import Card
    from mass.compression.job import run_compression
    from mass.registry import ModelRegistry
    from mass.registry.imports import import_minilm

    import_minilm(ModelRegistry())
    methods = args.methods.split(",")
    results = run_compression("minilm-l6@production", methods, name="minilm-bench", threads=args.threads,
                              rounds=args.rounds)
    cards = {r.method: r.card for r in results}
    rows = []  # the shared rows once (parent fp32, bf16, the float export), then each child
    for card in cards.values():
        rows += [r for r in card["rows"] if r not in rows]
    combined = Card.from_dict({**next(iter(cards.values())), "method": ", ".join(methods), "rows": rows})
    return {"methods": methods, "threads": args.threads, "cards": cards, "card": combined.to_dict(),
            "gates": {r.method: r.why for r in results}, "registered": {r.method: r.registered for r in results}}


def render_table(result: dict) -> str:
    """The README's compression block (markdown) from one run's JSON; the README test checks they agree."""
    from mass.compression.card import Card

    card = result["card"]
    verdicts = []
    for method in [m for m in INT8 if m in result["cards"]]:
        figures = result["cards"][method]["figures"]
        met = (figures["speedup"] >= GOAL_SPEEDUP and figures["quality"] >= GOAL_QUALITY
               and figures["top10"] >= GOAL_TOP10)
        verdicts.append(f"{method} **{figures['speedup']}x at {figures['quality']} / {figures['top10']}** "
                        f"({'met' if met else 'not met'})")
    memory = []  # the memory goal: int8 embeddings included (the default), weights <= 0.30x at cosine >= 0.99
    for method in [m for m in INT8 if m in result["cards"]]:
        figures = result["cards"][method]["figures"]
        met = figures["memory"] <= GOAL_MEMORY and figures["quality"] >= GOAL_MEMORY_QUALITY
        memory.append(f"{method} **{figures['memory']}x at {figures['quality']}** ({'met' if met else 'not met'})")
    gates = "; ".join(f"{m}: {'registered' if result['registered'][m] else 'refused'} ({why})"
                      for m, why in result["gates"].items())
    return "\n".join([
        f"Run of {result['date']} on {result['machine']}; {result['threads']} threads per model, "
        f"{result['rounds']} throughput rounds of {card['texts']['queries']} held-out docstring first lines in "
        f"batches of 32, median (range over rounds); quality over those and {card['texts']['documents']} held-out "
        "documents.", "",
        Card.from_dict(card).table(), "",
        f"Goal (int8 against the fp32 parent): ≥ {GOAL_SPEEDUP}x throughput at cosine ≥ {GOAL_QUALITY} and top-10 "
        f"overlap ≥ {GOAL_TOP10}: {'; '.join(verdicts)}.", "",
        f"Goal (int8 with its embeddings, weights in memory against the fp32 parent): ≤ {GOAL_MEMORY}x at cosine ≥ "
        f"{GOAL_MEMORY_QUALITY}: {'; '.join(memory)}.", "", f"Default gate, per child: {gates}."])


def main(argv=None) -> int:
    """Run the benchmark, print the table and the JSON line (and save / render them when asked)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="throughput rounds per model (median and range)")
    parser.add_argument("--threads", type=int, default=2, help="threads every model runs with")
    parser.add_argument("--methods", default="onnx-int8,torch-int8,bnb-int8,bnb-nf4",
                        help="comma-separated quantization methods, one job")
    parser.add_argument("--json", help="also write the JSON result to this file (and the chart beside it)")
    parser.add_argument("--readme", help="rewrite this README's compression table from the result")
    args = parser.parse_args(argv)
    from serving import run_and_save  # this directory's serving benchmark (a script dir on sys.path)

    code = run_and_save(args, run, render_table, (README_START, README_END))
    if args.json:
        import json

        from mass.compression.card import Card

        Card.from_dict(json.loads(Path(args.json).read_text())["card"]).plot(Path(args.json).with_suffix(".png"))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
