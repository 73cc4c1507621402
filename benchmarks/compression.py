"""Compression benchmark: the pretrained MiniLM converted by ``mass compress convert`` (ONNX export, then ONNX
Runtime dynamic int8) and measured on the card against its parent on this machine, in one run: bytes on disk,
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


def run(args) -> dict:
    """Import MiniLM into the private registry, convert it on a local Ray, return the card and the verdicts."""
    from mass.compression.convert import run_convert
    from mass.registry import ModelRegistry
    from mass.registry.imports import import_minilm

    import_minilm(ModelRegistry())
    result = run_convert("minilm-l6@production", method=args.method, name="minilm-bench", threads=args.threads,
                         rounds=args.rounds)
    return {"method": args.method, "threads": args.threads, "card": result.card, "gate": result.why,
            "registered": result.registered}


def render_table(result: dict) -> str:
    """The README's compression block (markdown) from one run's JSON; the README test checks they agree."""
    from mass.compression.card import Card

    card = result["card"]
    figures = card["figures"]
    met = (figures["speedup"] >= GOAL_SPEEDUP and figures["quality"] >= GOAL_QUALITY
           and figures["top10"] >= GOAL_TOP10)
    return "\n".join([
        f"Run of {result['date']} on {result['machine']}; {result['threads']} threads per model, "
        f"{result['rounds']} throughput rounds of {card['texts']['queries']} held-out docstring first lines in "
        f"batches of 32, median (range over rounds); quality over those and {card['texts']['documents']} held-out "
        "documents.", "",
        Card.from_dict(card).table(), "",
        f"Goal (int8 against the fp32 parent): ≥ {GOAL_SPEEDUP}x throughput at cosine ≥ {GOAL_QUALITY} and top-10 "
        f"overlap ≥ {GOAL_TOP10}: **{figures['speedup']}x at {figures['quality']} / {figures['top10']}** — "
        f"{'met' if met else 'not met'}. Gate: {result['gate']}."])


def main(argv=None) -> int:
    """Run the benchmark, print the table and the JSON line (and save / render them when asked)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="throughput rounds per model (median and range)")
    parser.add_argument("--threads", type=int, default=2, help="threads every model runs with")
    parser.add_argument("--method", default="onnx-int8", choices=["onnx", "onnx-int8"])
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
