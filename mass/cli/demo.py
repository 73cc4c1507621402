"""The ``make demo`` story, end to end on embedded defaults: corpus -> train -> import -> registry table ->
serve both models behind the gateway -> chat, streaming, SDK embeddings and a semantic search."""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: serve_apps/ and jobs/ beside mass/
DEMO_APP = "mass-demo"


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _serve(corpus_dir: str, card: str) -> str:
    """Deploy the demo app, query it over HTTP and through the SDK, then take it down."""
    import secrets

    import httpx
    from ray import serve

    from mass.access.keys import KeyStore
    from mass.app import load_app_args, running_serve, serve_up
    from mass.cluster import connect_ray
    from mass.data.loaders import load_corpus_split
    from mass.sdk import Client

    args = load_app_args(ROOT / "serve_apps" / "configs" / "demo.yaml")
    # Its own app name and route: a `mass` app already on the cluster's Serve is left as it is; a Serve
    # already running keeps its port (and keeps running afterwards), else one starts on a free port.
    connect_ray()
    had_serve = running_serve() is not None
    url = serve_up(args, port=None, block=False, name=DEMO_APP, route_prefix=f"/{DEMO_APP}")
    keys = KeyStore()
    key, secret = keys.create({"name": f"demo-{secrets.token_hex(3)}", "models": ["tiny-gpt", "minilm*"],
                               "rpm": 600, "tpm": 100_000, "budget": "1000000/day"})
    auth = {"Authorization": f"Bearer {secret}"}
    try:
        print(f"created API key {key.name} ({key.prefix}: models {','.join(key.models)}, {key.rpm} rpm, "
              f"{key.budget_tokens} tokens/day), as `mass keys create` does; every /v1 call needs one:", flush=True)
        refused = httpx.get(f"{url}/v1/models", timeout=60).json()["error"]
        print(f"  without a key: {refused['code']}: {refused['message']}", flush=True)
        print(f"tiny-gpt is {card}: expect docstring-flavoured babble, not answers.", flush=True)
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=60, headers=auth, json={
            "model": "tiny-gpt", "max_tokens": 24, "seed": 0,
            "messages": [{"role": "user", "content": "How do I parse a JSON string?"}]}).json()
        print(f"chat (HTTP):  {chat['choices'][0]['message']['content']!r}", flush=True)
        sampling = {"temperature": 0.8, "top_p": 0.95, "seed": 7, "frequency_penalty": 1.0, "presence_penalty": 0.5}
        print(f"stream (HTTP SSE, {', '.join(f'{k}={v}' for k, v in sampling.items())}): Return the", end="",
              flush=True)
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60, headers=auth, json={
                "model": "tiny-gpt", "prompt": "Return the", "max_tokens": 32, "stream": True, **sampling}) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    import json

                    for choice in json.loads(line[6:])["choices"]:
                        print(choice["text"], end="", flush=True)
        print(flush=True)

        _step("6/6 semantic search over the corpus: MiniLM embeddings through the SDK (Serve handles)")
        client = Client(app_name=DEMO_APP)  # this process is inside the Ray cluster: it calls the deployments
        docs = load_corpus_split(corpus_dir, "train")[:500]
        vectors = client.embed("minilm", docs)
        print(f"embedded {len(docs)} docstrings via {client.via}s", flush=True)
        for query in ("read and write JSON files", "run a command in a subprocess", "parse dates and times"):
            q = client.embed("minilm", query)[0]
            scores = sorted(((sum(a * b for a, b in zip(q, v)), d) for v, d in zip(vectors, docs)), reverse=True)
            print(f"\n  query: {query}", flush=True)
            for score, doc in scores[:3]:
                print(f"    {score:.3f}  {doc.splitlines()[0][:90]}", flush=True)
    finally:
        keys.revoke(key.id)  # the demo's key ends with the demo
        serve.delete(DEMO_APP)
        if not had_serve:
            serve.shutdown()
    return url


def gpt2_parameters(config) -> int:
    """Parameters of the GPT-2 a recipe trains from scratch (embeddings tied with the output layer)."""
    a, d = config.model.arch, config.model.arch.n_embd
    return config.model.vocab_size * d + a.n_positions * d + a.n_layer * (12 * d * d + 13 * d) + 2 * d


def run_demo(recipe: str | None = None) -> int:
    """Build the corpus, train the smoke GPT on a local 2-worker Ray, import MiniLM, print the registry."""
    from mass.cli.output import models_table
    from mass.data.corpus import build_corpus
    from mass.registry import ModelRegistry
    from mass.registry.imports import import_minilm
    from mass.settings import get_settings
    from mass.training.config import TrainConfig
    from mass.training.job import run_training

    from mass.events import open_bus

    settings = get_settings()
    started = time.perf_counter()
    print(f"MASS demo  (MASS_HOME={settings.home}, registry {settings.tracking_uri})", flush=True)
    bus = open_bus(settings.events_url)
    before = bus.last_offset()  # the demo shows the events of this run only

    _step("1/6 build the docstring corpus")
    corpus = build_corpus()
    print(f"corpus {corpus.path}: {corpus.counts}", flush=True)

    _step("2/6 train tiny-gpt on a local Ray cluster (Ray Train, 2 DDP workers)")
    recipe = recipe or str(ROOT / "jobs" / "configs" / "tiny-gpt-smoke.yaml")
    config = TrainConfig.load(recipe)
    trained_at = time.perf_counter()
    result = run_training(config)
    train_s = time.perf_counter() - trained_at
    m = result.metrics
    print(f"registered {result.model_ref}: val_loss {m['initial_val_loss']:.3f} -> {m['val_loss']:.3f}, "
          f"test perplexity {m['test_perplexity']:.1f}", flush=True)
    card = (f"a {gpt2_parameters(config) / 1e6:.1f}M-parameter GPT-2 trained for {train_s:.0f}s on "
            f"{result.data_tokens.get('train', 0):,} tokens (test perplexity {m['test_perplexity']:.0f})")

    _step("3/6 import the pretrained all-MiniLM-L6-v2 from its package")
    registry = ModelRegistry(settings)
    info, created = import_minilm(registry)
    print(f"{'imported' if created else 'already imported'} {info.ref} ({', '.join(info.aliases)})", flush=True)

    _step("4/6 the model repository, and what it announced on the event bus")
    print(models_table(registry.list_models()), flush=True)
    for event in bus.replay(after=before, count=100):  # what a lifecycle controller or any subscriber receives
        data = event.data.model_dump(exclude_none=True, exclude={"metrics", "task", "run_id"})
        print(f"  event {event.offset}: {event.type} {data} (from {event.source})", flush=True)
    bus.close()

    _step("5/6 serve tiny-gpt and MiniLM behind the OpenAI-compatible gateway (Ray Serve)")
    url = _serve(corpus.path, card)
    print(f"\ndemo done; the API was served at {url}/v1", flush=True)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    return 0
