"""Compression benchmark: the pretrained MiniLM quantized by ``mass compress quantize`` (ONNX Runtime int8 on the ONNX
export, PyTorch dynamic int8, bitsandbytes int8 and nf4) and every child measured on the card against its parent
on this machine, in one run: bytes on disk,
weights in memory, resident memory grown, latency at batch 1, throughput at batch 32 over held-out docstring
first lines (median and range over rounds), mean cosine to the parent's embeddings and top-10 retrieval overlap.
The parent in bf16 is the reference row (nearly free on CPUs with AVX-512 BF16). Then the int8 children and the
parent are served through the gateway in turns (the served speed-up); ``mass compress distill`` trains a 3-layer and
a 2-layer student (Ray Train, 2 workers, the corpus's training split) and ``mass compress prune`` removes a quarter
of the FFN channels with a recovery run, each job on a card of its own (its parent rows measured again in it).
The causal part trains tiny-gpt by the smoke recipe (at ``--causal-shape``) in the run, then quantizes it
(bitsandbytes nf4 and int8), prunes a quarter of its FFN channels with recovery and distils it into a student of
half its layers (logit distillation), each on a perplexity card. ``--part encoder|causal`` runs one part and keeps
the other from the saved JSON when that ran on the same machine line.

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
GOAL_DISTILL_SPEEDUP, GOAL_DISTILL_QUALITY = 1.9, 0.97  # the 3-layer student
GOAL_STACKED_SPEEDUP, GOAL_STACKED_QUALITY = 4.0, 0.95  # the 3-layer student in ONNX int8, against the teacher
# the students are registered whatever their quality (the default gate's verdict is reported beside), so the 3-layer
# one can be exported and quantized in turn
STUDENT_GATE = "speedup > 1.05"
GOAL_NF4_MEMORY, GOAL_CAUSAL_PPL = 0.35, 1.05  # tiny-gpt: nf4 weights, and nf4's and pruning's perplexity ratio
SMOKE = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny-gpt-smoke.yaml"


INT8 = ("onnx-int8", "torch-int8")  # the goal's candidates


def run(args) -> dict:
    """The parts ``--part`` names (the other kept from the saved JSON when it ran on this machine line)."""
    out: dict = {}
    if args.part in ("all", "encoder"):
        out.update(encoder(args))
    if args.part in ("all", "causal"):
        out["causal"] = causal(args)
    if args.part != "all" and args.json and Path(args.json).exists():
        import json

        from serving import machine_line

        saved = json.loads(Path(args.json).read_text())
        if saved.get("machine") == machine_line():
            # the encoder part's date and rounds are the top level's; the causal part carries its own
            kept = {"causal": saved["causal"]} if args.part == "encoder" and "causal" in saved else \
                {k: v for k, v in saved.items() if k not in ("machine", "causal")}
            out = {**kept, **out}
        else:
            print(f"not merging {args.json}: it ran on {saved.get('machine')!r}")
    return out


def encoder(args) -> dict:
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
    out = {"methods": methods, "threads": args.threads, "cards": cards, "card": combined.to_dict(),
           "gates": {r.method: r.why for r in results}, "registered": {r.method: r.registered for r in results}}
    if args.served_requests:
        served = {"fp32": "minilm-l6@production"}
        served.update({m: out["registered"][m] for m in INT8 if out["registered"].get(m)})
        out["served"] = serve_through_gateway(served, args.served_rounds, args.served_requests)
    if args.students:
        out["distillation"] = distill(args)
    if args.prune_ffn:
        out["pruning"] = prune(args)
    return out


def causal(args) -> dict:
    """tiny-gpt trained in this run (the smoke recipe at ``--causal-shape``), then one job each: bitsandbytes nf4
    and int8, 25% of its FFN channels pruned with ``--causal-epochs`` of recovery, and a student of half its
    layers distilled by its logits for ``--causal-epochs``; each child on its own perplexity card."""
    from mass.compression.distill import run_distillation
    from mass.compression.job import run_compression
    from mass.compression.prune import run_pruning
    from mass.training.config import TrainConfig
    from mass.training.job import run_training

    from mass.data.corpus import build_corpus

    build_corpus(progress=False)  # the recipe's data, in this run's private MASS_HOME
    layers, width = (int(x) for x in args.causal_shape.split("x"))
    trained = run_training(TrainConfig.load(SMOKE, [f"model.arch.n_layer={layers}", f"model.arch.n_embd={width}",
                                                    "registration.aliases=[]"]))
    ref = trained.model_ref
    common = {"threads": args.threads, "rounds": args.rounds}
    results = {r.method: r for r in run_compression(ref, ["bnb-nf4", "bnb-int8"], **common)}
    results["prune"] = run_pruning(ref, ffn=0.25, recover_epochs=args.causal_epochs, **common)[0]
    results["distill"] = run_distillation(ref, layers=[str(layers // 2)], epochs=args.causal_epochs, **common)[0]
    import time

    from mass.compression.card import DECODES_PER_ROUND, NEW_TOKENS, PPL_BLOCK, PPL_BLOCKS, PROMPT_TOKENS

    return {"model": ref, "shape": args.causal_shape, "train_metrics": trained.metrics, "rounds": args.rounds,
            "date": time.strftime("%Y-%m-%d"), "measure": {"prompt": PROMPT_TOKENS, "new": NEW_TOKENS,
                                                            "decodes": DECODES_PER_ROUND, "ppl_block": PPL_BLOCK,
                                                            "ppl_blocks": PPL_BLOCKS},
            "epochs": args.causal_epochs, "cards": {k: r.card for k, r in results.items()},
            "gates": {k: r.why for k, r in results.items()}, "registered": {k: r.registered for k, r in results.items()},
            "errors": {k: r.error for k, r in results.items() if r.error}}


def prune(args) -> dict:
    """The parent with ``--prune-ffn`` of every layer's FFN channels removed and one recovery run of ``--epochs``,
    on its own card."""
    from mass.compression.prune import run_pruning

    result = run_pruning("minilm-l6@production", ffn=args.prune_ffn, recover_epochs=args.epochs,
                         threads=args.threads, rounds=args.rounds)[0]
    return {"card": result.card, "gate": result.why, "registered": result.registered, "error": result.error}


def serve_through_gateway(refs: dict[str, str], rounds: int, requests: int) -> dict:
    """Texts/s of each model in ``refs`` served through the gateway alone (2 replicas of 1 CPU, batches of up to 32,
    as the serving benchmark's gateway row), driven by 32 clients sending one text per request; the models take
    turns in every round (after a warm-up round that is not counted)."""
    import asyncio
    import os

    import aiohttp
    import ray
    from ray import serve

    from mass.access.keys import KeyStore
    from mass.app import APP_NAME, build_app, wait_ready
    from mass.cluster import free_port
    from mass.compression.card import eval_texts
    from mass.serving.args import AppArgs
    from mass.settings import apply_ray_start_env, get_settings
    from serving import SERVED, drive, http_embedder

    texts = eval_texts()[0]  # the card's held-out queries
    ray.shutdown()  # the compression job's local Ray; serving gets the layout the serving benchmark uses
    apply_ray_start_env(get_settings())
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"

    def deploy(ref: str) -> None:
        model = {"name": "minilm", "ref": ref, "engine": "embedding", "max_ongoing_requests": 64, **SERVED["gateway"]}
        serve.run(build_app(AppArgs.model_validate({"gateway": {"num_cpus": 0.5}, "models": [model]})),
                  name=APP_NAME, route_prefix="/", logging_config={"enable_access_log": False, "log_level": "WARNING"})
        wait_ready(url, timeout=300)

    async def measure() -> dict[str, list[float]]:
        rates: dict[str, list[float]] = {label: [] for label in refs}
        _, secret = KeyStore().create({"name": f"bench-compression-{os.urandom(3).hex()}"})
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64),
                                         headers={"Authorization": f"Bearer {secret}"}) as http:
            for round_ in range(rounds + 1):
                for label, ref in refs.items():
                    await asyncio.to_thread(deploy, ref)
                    rate = await drive(http_embedder(http, url, "minilm"), texts, 64 if round_ == 0 else requests)
                    if round_:
                        rates[label].append(round(rate, 1))
                    await asyncio.to_thread(serve.delete, APP_NAME)
        return rates

    with asyncio.Runner() as runner:
        try:
            rates = runner.run(measure())
        finally:
            serve.shutdown()
            ray.shutdown()
    return {"refs": refs, "requests": requests, "texts_per_s": rates}

def distill(args) -> dict:
    """The students of ``--students`` trained in one distillation job and measured on one card (its own parent
    rows: measured again in that job, one model at a time like every card)."""
    from mass.compression.card import Card
    from mass.compression.distill import run_distillation

    from mass.compression.gate import Gate

    layers = args.students.split(",")
    results = run_distillation("minilm-l6@production", layers=layers, name=None, epochs=args.student_epochs,
                               threads=args.threads, rounds=args.rounds, gate=STUDENT_GATE)
    rows = []
    for result in results:
        rows += [r for r in result.card.get("rows", []) if r not in rows]
    first = next(r.card for r in results if r.card)
    card = Card.from_dict({**first, "method": "distill", "rows": rows})
    return {"students": layers, "epochs": args.student_epochs, "params": first["params"], "card": card.to_dict(),
            "cards": {f"{len(r.card['params']['layers'])}L": r.card for r in results if r.card},
            "gates": {f"{len(r.card['params']['layers'])}L": r.why for r in results if r.card},
            "registered": {f"{len(r.card['params']['layers'])}L": r.registered for r in results if r.card},
            "default_gate": {f"{len(r.card['params']['layers'])}L": list(Gate.parse(None).check(r.card["figures"]))
                             for r in results if r.card},
            "stacked": stacked(args, next((r.registered for r in results
                                           if r.card and len(r.card["params"]["layers"]) == 3), None)),
            "errors": {r.method: r.error for r in results if r.error}}


def stacked(args, student: str | None) -> dict | None:
    """The 3-layer student exported and quantized by ``mass compress quantize --methods onnx-int8`` (its card: against
    the student), then that child and the teacher measured side by side (each in a fresh Ray worker, one after the
    other, as every card measures) — the stacked figure against the teacher. None without a registered student."""
    if not student:
        return None
    import ray

    from mass.compression.card import Card, Subject, agreement, eval_texts, measure_encoder
    from mass.compression.job import run_compression
    from mass.registry import ModelRegistry

    result = run_compression(student, ["onnx-int8"], name=None, gate="speedup > 0", threads=args.threads,
                             rounds=args.rounds)[0]
    if not result.registered:
        return {"card": result.card or None, "error": result.error or result.why}
    registry = ModelRegistry()
    parent_ref = registry.resolve("minilm-l6@production").ref
    teacher, child = (registry.download(ref) for ref in (parent_ref, result.registered))
    texts = eval_texts()
    measure = ray.remote(max_calls=1)(measure_encoder).options(num_cpus=1, max_retries=0)
    parent, parent_out = ray.get(measure.remote(Subject("parent fp32", str(teacher / "model"),
                                                        str(teacher / "components" / "tokenizer")),
                                                *texts, args.threads, args.rounds))
    row, out = ray.get(measure.remote(Subject("student 3L onnx int8", str(child),
                                              str(child / "components" / "tokenizer"), runtime="onnx",
                                              dtype="int8"), *texts, args.threads, args.rounds))
    row.quality, row.top10 = agreement(parent_out, out)
    card = Card(parent_ref, "distill 3L + onnx-int8", {}, [parent, row],
                {"queries": len(texts[0]), "documents": len(texts[1])})
    return {"quantize_card": result.card, "card": card.to_dict()}


def render_table(result: dict) -> str:
    """The README's compression block (markdown) from one run's JSON; the README test checks they agree."""
    if "card" not in result:  # a causal-only run
        return f"Run on {result['machine']}.\n" + "\n".join(causal_table(result.get("causal")))
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
        f"{GOAL_MEMORY_QUALITY}: {'; '.join(memory)}.", "", f"Default gate, per child: {gates}.",
        *served_lines(result), *distill_table(result.get("distillation")), *prune_table(result.get("pruning")),
        *causal_table(result.get("causal"))])


def causal_table(part: dict | None) -> list[str]:
    """The causal part's lines of the README block: one card per job (quantization, pruning, distillation, each
    measuring its parent again) and the goals' verdicts."""
    from mass.compression.card import Card

    if not part:
        return []
    cards, lines = part["cards"], []
    quantized = [k for k in ("bnb-nf4", "bnb-int8") if cards.get(k)]
    if quantized:
        rows = []
        for key in quantized:
            rows += [r for r in cards[key]["rows"] if r not in rows]
        lines += ["", f"Quantization of {part['model']} (one job):", "",
                  Card.from_dict({**cards[quantized[0]], "rows": rows}).table()]
    for key, what in (("prune", f"25% of the FFN channels pruned, {part['epochs']} recovery epochs (logit "
                                "distillation from the unpruned parent)"),
                      ("distill", f"a student of half the layers, {part['epochs']} epochs of logit distillation")):
        if cards.get(key):
            lines += ["", f"{what.capitalize()} (a job of its own):", "", Card.from_dict(cards[key]).table()]
    verdicts = []
    if cards.get("bnb-nf4"):
        f = cards["bnb-nf4"]["figures"]
        met = f["memory"] <= GOAL_NF4_MEMORY and f["perplexity"] <= GOAL_CAUSAL_PPL
        verdicts.append(f"nf4 ≤ {GOAL_NF4_MEMORY}x weights at ≤ {GOAL_CAUSAL_PPL:.2f}x perplexity: **{f['memory']}x "
                        f"at {f['perplexity']}x** ({'met' if met else 'not met'})")
    if cards.get("prune"):
        f, rows = cards["prune"]["figures"], cards["prune"]["rows"]
        # a measured speed-up: the child's slowest round faster than the parent's fastest, not a ratio within noise
        clear = {what: bool(rows[-1].get(key) and rows[-1][key][0] > rows[0][key][1])
                 for what, key in (("decode", "throughput_range"), ("prefill", "prefill_range"))}
        met = f["perplexity"] <= GOAL_CAUSAL_PPL and any(clear.values())
        speeds = ", ".join(f"{f[figure]}x {what}{'' if clear[what] else ' (within the rounds’ spread)'}"
                           for what, figure in (("decode", "speedup"), ("prefill", "prefill")) if f.get(figure))
        verdicts.append(f"pruning 25% of the FFN with recovery, perplexity within {GOAL_CAUSAL_PPL - 1:.0%} and a "
                        f"measured speed-up (every round of the child faster than every round of the parent, in "
                        f"decode or prefill): **{f['perplexity']}x perplexity, {speeds}** "
                        f"({'met' if met else 'not met'})")
    gates = "; ".join(f"{k}: {'registered' if part['registered'].get(k) else 'refused'} ({why})"
                      for k, why in part["gates"].items())
    train, m = part.get("train_metrics", {}), part["measure"]
    prefilled = any(r.get("prefill") for card in cards.values() if card for r in card["rows"])
    return ["", f"Causal LM (run of {part['date']}, same machine): {part['model']}, the smoke recipe at "
                f"{part['shape']} (layers x width) trained in this run (test perplexity "
                f"{train.get('test_perplexity', float('nan')):.1f}); perplexity over up to {m['ppl_blocks']} blocks "
                f"of {m['ppl_block']} tokens of the corpus's test split; decode: 32 prompts of {m['prompt']} tokens "
                f"decoded together, {m['new']} new tokens each (greedy, EOS ignored), {m['decodes']} such batches a "
                f"round, tokens/s median (range) over {part['rounds']} rounds; "
                + ("prefill: the perplexity pass timed (a forward over those blocks, batches of 8), tokens/s median "
                   "(range) over as many rounds; " if prefilled else "prefill: not measured in this run (the card "
                   "timed it from a later version on); ")
                + "latency: ms per token of one request.",
            *lines, "", f"Goals: {'; '.join(verdicts)}.", "", f"Default gate, per child: {gates}."]


def served_lines(result: dict) -> list[str]:
    """The served speed-up line: each int8 child against the fp32 parent through the gateway, beside the card's."""
    import statistics

    served = result.get("served")
    if not served:
        return []
    rates = served["texts_per_s"]
    base = statistics.median(rates["fp32"])
    cells = [f"fp32 parent {base:.0f} texts/s ({min(rates['fp32']):.0f}–{max(rates['fp32']):.0f})"]
    for method in [m for m in rates if m != "fp32"]:
        mid = statistics.median(rates[method])
        cells.append(f"{method} {mid:.0f} ({min(rates[method]):.0f}–{max(rates[method]):.0f}): **{mid / base:.2f}x** "
                     f"(card: {result['cards'][method]['figures']['speedup']}x)")
    return ["", f"Served through the gateway (each model alone: 2 replicas of 1 CPU, batches of up to 32; 32 clients "
                f"sending one text per request, {served['requests']} requests a round, models taking turns, "
                f"{len(rates['fp32'])} rounds, median (range)): " + "; ".join(cells) + "."]


def inner_losses(params: dict) -> str:
    """How a run's students learned the teacher's layers, as the README says it ('' before the option existed)."""
    if "layer_loss" not in params:
        return ""
    return (f" plus layer outputs (weight {params['layer_loss']:g}) and attention distributions (weight "
            f"{params['attention_loss']:g}) of the teacher layers each student layer came from, dropout off")


def distill_table(part: dict | None) -> list[str]:
    """The distillation card's lines of the README block (none when the run had no students)."""
    from mass.compression.card import Card

    if not part:
        return []
    p = part["params"]
    lines = ["", f"Distillation (one job: {', '.join(f'{s} layers' for s in part['students'])} of the 6, each "
                 f"trained by Ray Train on {p['workers']} workers for {p['epochs']} epochs over the corpus's "
                 f"training split, {p['loss']} loss{inner_losses(p)}, lr {p['lr']}, batch {p['batch_size']} per "
                 f"worker, {p['max_length']} tokens{', ' + p['precision'] if 'precision' in p else ''}; the "
                 "parent's rows measured again in that job):", "",
             Card.from_dict(part["card"]).table(), ""]
    three = part["cards"].get("3L")
    if three:
        f = three["figures"]
        met = f["speedup"] >= GOAL_DISTILL_SPEEDUP and f["quality"] >= GOAL_DISTILL_QUALITY
        lines.append(f"Goal (3-layer student against the fp32 parent): ≥ {GOAL_DISTILL_SPEEDUP}x throughput at cosine "
                     f"≥ {GOAL_DISTILL_QUALITY}: **{f['speedup']}x at {f['quality']}** "
                     f"({'met' if met else 'not met'}).")
    if part.get("default_gate"):  # the students were registered by the benchmark's gate, to be quantized in turn
        lines.append(f"Default gate, per student (the benchmark registers them by `{STUDENT_GATE}` so the 3-layer "
                     "one can be quantized in turn): " + "; ".join(
                         f"{k}: {'would register' if ok else 'would refuse'} ({why})"
                         for k, (ok, why) in part["default_gate"].items()) + ".")
    else:
        lines.append("Default gate, per student: " + "; ".join(
            f"{k}: {'registered' if part.get('registered', {}).get(k) else 'refused'} ({why})"
            for k, why in part["gates"].items()) + ".")
    stack = part.get("stacked")
    if stack and stack.get("card") and len(stack["card"]["rows"]) == 2:
        f = stack["card"]["figures"]
        met = f["speedup"] >= GOAL_STACKED_SPEEDUP and f["quality"] >= GOAL_STACKED_QUALITY
        lines += ["", "The 3-layer student exported to ONNX and quantized to int8 (`mass compress quantize --methods "
                      "onnx-int8` of the registered student), then measured beside the teacher:", "",
                  Card.from_dict(stack["card"]).table(), "",
                  f"Goal (3-layer + ONNX int8 against the fp32 teacher): ≥ {GOAL_STACKED_SPEEDUP}x at cosine ≥ "
                  f"{GOAL_STACKED_QUALITY}: **{f['speedup']}x at {f['quality']}** ({'met' if met else 'not met'})."]
    elif stack:
        lines += ["", f"The 3-layer student in ONNX int8: not made ({stack.get('error')})."]
    return lines


def prune_table(part: dict | None) -> list[str]:
    """The pruning card's lines of the README block (none when the run did not prune)."""
    from mass.compression.card import Card

    if not part or not part["card"]:
        return [] if not part else ["", f"Pruning: not made ({part['error']})."]
    p = part["card"]["params"]
    return ["", f"Structured pruning (one job: {p['removed'].get('ffn_channels')} FFN channels removed by importance "
                f"on {p['calibration_texts']} calibration texts, then {p['recover_epochs']} recovery epochs "
                "distilling from the unpruned parent on Ray Train; the parent's rows measured again in that job):",
            "", Card.from_dict(part["card"]).table(), "",
            f"Default gate: {'registered' if part.get('registered') else 'refused'} ({part['gate']})."]


def main(argv=None) -> int:
    """Run the benchmark, print the table and the JSON line (and save / render them when asked)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="throughput rounds per model (median and range)")
    parser.add_argument("--threads", type=int, default=2, help="threads every model runs with")
    parser.add_argument("--methods", default="onnx-int8,torch-int8,bnb-int8,bnb-nf4",
                        help="comma-separated quantization methods, one job")
    parser.add_argument("--served-requests", type=int, default=1000,
                        help="requests a round when serving each int8 child and the parent through the gateway "
                             "(0 skips it)")
    parser.add_argument("--served-rounds", type=int, default=3, help="rounds of the served part (each model "
                                                                      "deployed once a round)")
    parser.add_argument("--students", default="3,2", help="comma-separated student layer counts, one distillation "
                                                            "job ('' skips distillation)")
    parser.add_argument("--student-epochs", type=int, default=18,
                        help="distillation epochs per student (18: about 1,200 steps over the corpus; side runs on "
                             "issue 11 found steps the lever: 3L cosine 0.930 at 200, 0.948 at 600, 0.954 at 1,200)")
    parser.add_argument("--epochs", type=int, default=3, help="pruning's recovery epochs")
    parser.add_argument("--prune-ffn", type=float, default=0.25, help="fraction of FFN channels the pruning job "
                                                                      "removes (0 skips pruning)")
    parser.add_argument("--part", choices=("all", "encoder", "causal"), default="all",
                        help="encoder: MiniLM; causal: tiny-gpt (the other part is kept from --json's saved result "
                             "when it ran on this machine line)")
    parser.add_argument("--causal-shape", default="4x256", help="tiny-gpt's layers x width for the causal part")
    parser.add_argument("--causal-epochs", type=int, default=3, help="causal part: recovery and distillation epochs")
    parser.add_argument("--json", help="also write the JSON result to this file (and the chart beside it)")
    parser.add_argument("--readme", help="rewrite this README's compression table from the result")
    args = parser.parse_args(argv)
    from serving import run_and_save  # this directory's serving benchmark (a script dir on sys.path)

    code = run_and_save(args, run, render_table, (README_START, README_END))
    if args.json:
        import json

        from mass.compression.card import Card

        saved = json.loads(Path(args.json).read_text())
        if "card" in saved:
            Card.from_dict(saved["card"]).plot(Path(args.json).with_suffix(".png"))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
