"""The ``make demo`` story, end to end on embedded defaults: corpus -> train (a model and a candidate) -> import
-> compress MiniLM (ONNX int8, on its card) -> registry table -> serve both models behind the gateway -> chat, streaming, SDK embeddings and a semantic
search -> canary the candidate at 20 %, promote it, roll back, while the controller moves traffic live."""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: serve_apps/ and jobs/ beside mass/
DEMO_APP = "mass-demo"


def step(title: str) -> None:
    """Print a demo step's heading (the demos' output and their tests find steps by these lines)."""
    print(f"\n== {title}", flush=True)


def _serve(corpus_dir: str, card: str, candidate: int) -> str:
    """Deploy the demo app, query it over HTTP and through the SDK, run the lifecycle story with ``candidate``
    (a second tiny-gpt version), then take the app down."""
    import secrets

    import httpx
    from ray import serve

    from mass.access.keys import KeyStore
    from mass.app import load_app_args, running_serve, serve_up
    from mass.cluster import connect_ray
    from mass.data.loaders import load_corpus_split
    from mass.sdk import Client

    from mass.serving.args import AppArgs

    data = load_app_args(ROOT / "serve_apps" / "configs" / "demo.yaml").model_dump()
    for model in data["models"]:  # tiny-gpt follows its lifecycle (production, canary) through the controller
        if model["name"] == "tiny-gpt":
            model.update(ref="tiny-gpt@production", managed=True)
    data["controller"].update(drain_s=5)
    args = AppArgs.model_validate(data)
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

        step("8/9 semantic search over the corpus: MiniLM embeddings through the SDK (Serve handles)")
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

        step("9/9 lifecycle: canary the candidate at 20 %, promote it, roll back (clients never see a gap)")
        _lifecycle_story(url, auth, candidate)
    finally:
        keys.revoke(key.id)  # the demo's key ends with the demo
        serve.delete(DEMO_APP)
        deadline = time.monotonic() + 60  # its controller deletes the version apps it deployed, then stops
        while any(n.startswith(f"{DEMO_APP}--") for n in serve.status().applications) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not had_serve:
            serve.shutdown()
    return url


def _lifecycle_story(url: str, auth: dict[str, str], candidate: int) -> None:
    """Canary ``candidate`` at 20 %, show the split the responses report, promote, roll back."""
    from collections import Counter

    import httpx

    from mass.lifecycle import Lifecycle

    life = Lifecycle()
    production = life.state("tiny-gpt").production

    def answer(client: httpx.Client) -> str:
        resp = client.post(f"{url}/v1/chat/completions", timeout=60, headers=auth, json={
            "model": "tiny-gpt", "max_tokens": 4, "messages": [{"role": "user", "content": "hello"}]})
        resp.raise_for_status()
        return resp.headers["x-mass-model-version"]

    def wait_until(done, what: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client() as client:
            while not done(client):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
                time.sleep(0.2)

    life.canary("tiny-gpt", candidate, actor="demo", weight=20, reason="try the candidate on a fifth of traffic")
    print(f"canary: tiny-gpt v{candidate} at 20 % (production v{production} keeps 80 %); the controller deploys "
          f"it as its own Serve app and moves traffic once it is ready...", flush=True)
    wait_until(lambda c: answer(c) == str(candidate), f"v{candidate} to answer")
    with httpx.Client() as client:
        split = Counter(answer(client) for _ in range(200))
    print("  200 chats answered by (x-mass-model-version): "
          + ", ".join(f"v{v} {n} ({n / 2:.0f} %)" for v, n in sorted(split.items())), flush=True)
    life.promote("tiny-gpt", actor="demo", reason="the candidate held its SLO")
    wait_until(lambda c: all(answer(c) == str(candidate) for _ in range(10)), f"v{candidate} alone")
    print(f"promote: v{candidate} is production and answers every request; v{production} drains, then its app "
          "is deleted", flush=True)
    life.rollback("tiny-gpt", actor="demo", reason="demo: back to the previous version")
    wait_until(lambda c: all(answer(c) == str(production) for _ in range(10)), f"v{production} alone again")
    print(f"rollback: v{production} is production again and answers every request (a version still draining "
          "takes the traffic back at once; one already deleted is deployed again while the other keeps serving)",
          flush=True)
    for op in reversed(life.history("tiny-gpt", limit=4)):
        print(f"  {op['at'][11:19]} {op['action']:<8} v{op['version']}  by {op['actor']}: {op['reason']}", flush=True)


def gpt2_parameters(config) -> int:
    """Parameters of the GPT-2 a recipe trains from scratch (embeddings tied with the output layer)."""
    a, d = config.model.arch, config.model.arch.n_embd
    return config.model.vocab_size * d + a.n_positions * d + a.n_layer * (12 * d * d + 13 * d) + 2 * d


#: ``mass demo --quick``: each tiny-gpt trained for one epoch on 40,000 tokens
QUICK = ["optim.epochs=1", "data.max_train_tokens=40000"]


def run_demo(recipe: str | None = None, overrides: list[str] | None = None) -> int:
    """Build the corpus, train the smoke GPT on a local 2-worker Ray (``overrides``: recipe ``--set`` values),
    import MiniLM, compress it, serve both, search, and walk a model through its lifecycle."""
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

    step("1/9 build the docstring corpus")
    corpus = build_corpus()
    print(f"corpus {corpus.path}: {corpus.counts}", flush=True)

    step("2/9 train tiny-gpt on a local Ray cluster (Ray Train, 2 DDP workers)")
    recipe = recipe or str(ROOT / "jobs" / "configs" / "tiny-gpt-smoke.yaml")
    config = TrainConfig.load(recipe, overrides=overrides)
    trained_at = time.perf_counter()
    result = run_training(config)
    train_s = time.perf_counter() - trained_at
    m = result.metrics
    print(f"registered {result.model_ref}: val_loss {m['initial_val_loss']:.3f} -> {m['val_loss']:.3f}, "
          f"test perplexity {m['test_perplexity']:.1f}", flush=True)
    card = (f"a {gpt2_parameters(config) / 1e6:.1f}M-parameter GPT-2 trained for {train_s:.0f}s on "
            f"{result.data_tokens.get('train', 0):,} tokens (test perplexity {m['test_perplexity']:.0f})")

    step("3/9 train a candidate: the same recipe with another seed (a second tiny-gpt version)")
    candidate = run_training(TrainConfig.load(recipe, overrides=[*(overrides or []), "optim.seed=1"]))
    print(f"registered {candidate.model_ref}: val_loss {candidate.metrics['val_loss']:.3f}", flush=True)
    from mass.lifecycle import Lifecycle

    Lifecycle().publish("tiny-gpt", int(result.model_ref.split("/")[-1]), actor="demo",
                        reason="the demo's first model")
    print(f"published {result.model_ref} as production (mass models publish)", flush=True)

    step("4/9 import the pretrained all-MiniLM-L6-v2 from its package")
    registry = ModelRegistry(settings)
    info, created = import_minilm(registry)
    print(f"{'imported' if created else 'already imported'} {info.ref} ({', '.join(info.aliases)})", flush=True)

    step("5/9 compress MiniLM: ONNX int8, measured against its parent on one card, registered if it passes")
    from mass.compression.convert import result_text, run_convert

    compressed = run_convert(info.ref, name="minilm-l6-int8", rounds=1)
    print(result_text(compressed), flush=True)

    step("6/9 the model repository, and what it announced on the event bus")
    print(models_table(registry.list_models()), flush=True)
    for event in bus.replay(after=before, count=100):  # what a lifecycle controller or any subscriber receives
        data = event.data.model_dump(exclude_none=True, exclude={"metrics", "task", "run_id"})
        print(f"  event {event.offset}: {event.type} {data} (from {event.source})", flush=True)
    bus.close()

    step("7/9 serve tiny-gpt and MiniLM behind the OpenAI-compatible gateway (Ray Serve)")
    url = _serve(corpus.path, card, int(candidate.model_ref.split("/")[-1]))
    print("what the lifecycle announced on the event bus (the controller acted on these):", flush=True)
    bus = open_bus(settings.events_url)
    for event in bus.replay(after=before, count=1000):
        if event.type.startswith(("rollout.", "model.traffic")):
            print(f"  event {event.offset}: {event.type} {event.data.model_dump(exclude_none=True)}", flush=True)
    bus.close()
    print(f"\ndemo done; the API was served at {url}/v1", flush=True)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    return 0
