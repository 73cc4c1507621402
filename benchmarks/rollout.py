"""Rollout benchmark: managed models moved by the lifecycle controller while clients keep calling, on a local
Ray Serve (one gateway replica; every model version one replica).

- accuracy: a canary at 10 % of a random-weight 4-layer GPT-2 (v2 against v1, same shape); 2,000 chat requests
  from 32 clients; the share answered by v2 (``x-mass-model-version``) must be 10 +- 2 points.
- zero failures: 16 clients streaming chat (``roll-gpt``) and 16 clients asking for embeddings (``roll-minilm``,
  MiniLM registered twice) call without pause while both models go canary 10 % -> promote -> (the old version
  drained and deleted) -> rollback (the old version deployed again while the new one keeps serving). Every
  non-200 answer, and every stream that ends without ``[DONE]`` or with an error event, is a failure.
  Switch time: from the operation's return to the first moment after which every request that started got the
  new version (promote: the new version is already up; rollback: also reported from the moment the controller
  saw the redeployed version ready).
- detection: a canary at 50 % that is really slower (a 512-wide, 8-layer GPT-2 under the same name) under 8 chat
  clients; the time from its split reaching the gateways to the controller's automatic rollback, and the bound.

Prints a table and one JSON line; ``--json PATH`` saves the JSON and ``--readme README.md`` rewrites the README's
rollout table.  Run:  .venv/bin/python benchmarks/rollout.py --json benchmarks/results/rollout.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

APP = "mass-bench-rollout"
GPT, MINILM = "roll-gpt", "roll-minilm"


def register_models() -> int:
    """roll-gpt v1, v2 (random 4-layer GPT-2s, seeds 0 and 1) and v3 (a slow 8x512 one); roll-minilm v1 and v2
    (MiniLM twice); v1 of each is production. Returns the slow version."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from mass.data.corpus import collect_documents
    from mass.data.tokenizer import train_tokenizer
    from mass.lifecycle import Lifecycle
    from mass.registry import ModelRegistry
    from mass.registry.imports import minilm_dir

    registry = ModelRegistry()
    tok = train_tokenizer([d["text"] for d in collect_documents(["json", "argparse"], progress=False)], 2048)
    for seed, (width, layers) in enumerate([(256, 4), (256, 4), (512, 8)]):
        torch.manual_seed(seed)
        cfg = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=width, n_layer=layers, n_head=4,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
        slow = registry.register((GPT2LMHeadModel(cfg).eval(), tok), GPT, "text-generation",
                                 lineage={"method": "benchmark", "source": f"random weights, seed {seed}"}).version
    for _ in range(2):
        registry.register(minilm_dir(), MINILM, "embedding")
    life = Lifecycle(registry)
    for name in (GPT, MINILM):
        life.publish(name, 1, "benchmark")
    return slow


def app_args() -> dict:
    """Both models managed, one replica per version."""
    one = {"min_replicas": 1, "max_replicas": 1}
    return {"gateway": {"num_cpus": 0.5, "max_ongoing_requests": 256},
            "controller": {"drain_s": 5},
            "models": [
                {"name": GPT, "ref": f"{GPT}@production", "engine": "llm", "managed": True, "num_cpus": 0.5,
                 "max_tokens_limit": 64, "autoscaling": one},
                {"name": MINILM, "ref": f"{MINILM}@production", "engine": "embedding", "managed": True,
                 "num_cpus": 0.5, "max_ongoing_requests": 64, "autoscaling": one}]}


CHAT = {"model": GPT, "messages": [{"role": "user", "content": "Return the value"}], "max_tokens": 8}
EMBED = {"model": MINILM, "input": ["a short text to embed", "another one"]}


class Load:
    """Clients calling without pause; every request's (start, end, version, ok)."""

    def __init__(self, http, url: str) -> None:
        self.http, self.url = http, url
        self.log: dict[str, list[tuple[float, float, str, bool]]] = {GPT: [], MINILM: []}
        self.failures: list[str] = []
        self.stop = False

    async def chat(self, stream: bool) -> None:
        while not self.stop:
            start = time.monotonic()
            version, ok = "?", False
            try:
                async with self.http.post(f"{self.url}/v1/chat/completions", json={**CHAT, "stream": stream}) as r:
                    version = r.headers.get("x-mass-model-version", "?")
                    body = await r.text()
                    ok = r.status == 200 and (not stream or stream_ok(body))
                    if not ok:
                        self.failures.append(f"chat {r.status}: {body[-300:]}")
            except Exception as exc:  # noqa: BLE001 - a failure to report, not to raise
                self.failures.append(f"chat: {type(exc).__name__}: {exc}")
            self.log[GPT].append((start, time.monotonic(), version, ok))

    async def embed(self) -> None:
        while not self.stop:
            start = time.monotonic()
            version, ok = "?", False
            try:
                async with self.http.post(f"{self.url}/v1/embeddings", json=EMBED) as r:
                    version = r.headers.get("x-mass-model-version", "?")
                    body = await r.text()
                    ok = r.status == 200
                    if not ok:
                        self.failures.append(f"embed {r.status}: {body[-300:]}")
            except Exception as exc:  # noqa: BLE001
                self.failures.append(f"embed: {type(exc).__name__}: {exc}")
            self.log[MINILM].append((start, time.monotonic(), version, ok))


def stream_ok(body: str) -> bool:
    """An SSE body that ends with ``[DONE]`` and holds no error event."""
    events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
    return bool(events) and events[-1] == "[DONE]" and not any("error" in json.loads(e) for e in events[:-1])


def switch_s(log: list[tuple[float, float, str, bool]], since: float, version: str,
             until: float = float("inf")) -> float | None:
    """Seconds after ``since`` from which every request that started (before ``until``) got ``version``
    (None: never)."""
    window = [(s, v) for s, _, v, _ in log if since <= s < until]
    last_other = max((s for s, v in window if v != version), default=since)
    return round(last_other - since, 2) if any(s > last_other and v == version for s, v in window) else None


async def wait_version(http, url: str, path: str, body: dict, version: str, timeout: float = 300) -> None:
    """Until a request is answered by ``version``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with http.post(f"{url}{path}", json=body) as r:
            if r.headers.get("x-mass-model-version") == version:
                return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{body['model']} v{version} never answered")


def ready_at(controller, model: str, version: int, after_wall: float) -> float | None:
    """Wall time the controller saw ``model``/``version`` ready after ``after_wall``."""
    import ray

    records = ray.get(controller.status.remote())["records"]
    times = [r["at"] for r in records if r["model"] == model and r["version"] == version and r["action"] == "ready"
             and r["at"] >= after_wall]
    return min(times) if times else None


def run_round(url: str, headers: dict, slow: int) -> dict:
    """One round: accuracy, promote/rollback under load, detection. The registry ends as it began."""
    import aiohttp
    import ray

    from mass.lifecycle import Lifecycle
    from mass.lifecycle.controller import NAMESPACE, controller_name

    life = Lifecycle()
    controller = ray.get_actor(controller_name(APP), namespace=NAMESPACE)
    out: dict = {}

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64), headers=headers) as http:
            # accuracy: canary gpt v2 at 10 %, 2,000 chats from 32 clients
            for name in (GPT, MINILM):
                life.canary(name, 2, "benchmark", weight=10)
            await wait_version(http, url, "/v1/chat/completions", CHAT, "2")
            await wait_version(http, url, "/v1/embeddings", EMBED, "2")
            versions: list[str] = []
            todo = iter(range(2000))

            async def client():
                for _ in todo:
                    async with http.post(f"{url}/v1/chat/completions", json=CHAT) as r:
                        await r.read()
                        versions.append(r.headers.get("x-mass-model-version", "?"))
            await asyncio.gather(*(client() for _ in range(32)))
            out["canary_share_pct"] = round(100 * versions.count("2") / len(versions), 2)
            for name in (GPT, MINILM):
                if (await asyncio.to_thread(life.state, name)).canary is None:
                    raise RuntimeError(f"{name}'s canary was rolled back during the accuracy part: "
                                       f"{life.history(name, 1)[0]['reason']}")

            # zero failures: promote, drain, rollback while 16 streaming chat + 16 embedding clients call
            load = Load(http, url)
            tasks = [asyncio.create_task(load.chat(stream=True)) for _ in range(16)]
            tasks += [asyncio.create_task(load.embed()) for _ in range(16)]
            await asyncio.sleep(3)
            promoted = time.monotonic()
            for name in (GPT, MINILM):
                await asyncio.to_thread(life.promote, name, "benchmark")
            await asyncio.sleep(12)  # the old versions drain (5 s), then their apps are deleted
            rolled, rolled_wall = time.monotonic(), time.time()
            for name in (GPT, MINILM):
                await asyncio.to_thread(life.rollback, name, "benchmark")
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not all(
                    switch_s(load.log[n], rolled, "1") is not None for n in (GPT, MINILM)):
                await asyncio.sleep(0.5)
            await asyncio.sleep(3)
            load.stop = True
            await asyncio.gather(*tasks)
            for name, key in ((GPT, "chat"), (MINILM, "embed")):
                log = load.log[name]
                ready = await asyncio.to_thread(ready_at, controller, name, 1, rolled_wall)
                back = switch_s(log, rolled, "1")
                out[f"{key}_requests"] = len(log)
                out[f"{key}_failed"] = sum(1 for *_, ok in log if not ok)
                out[f"{key}_promote_switch_s"] = switch_s(log, promoted, "2", until=rolled)
                out[f"{key}_rollback_switch_s"] = back
                # the controller's clock is the wall clock: the version was ready (ready - rolled_wall) s after
                # the rollback returned, and every request got it from ``back`` s on
                out[f"{key}_rollback_after_ready_s"] = None if ready is None or back is None else \
                    round(back - (ready - rolled_wall), 2)
            out["failures"] = load.failures[:5]

            # detection: a slower canary at 50 % under 8 chat clients
            load = Load(http, url)
            tasks = [asyncio.create_task(load.chat(stream=False)) for _ in range(8)]
            life.canary(GPT, slow, "benchmark", weight=50)
            deadline = time.monotonic() + 300
            while (await asyncio.to_thread(life.state, GPT)).canary is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            load.stop = True
            await asyncio.gather(*tasks)
            last = life.history(GPT, limit=1)[0]
            records = (await asyncio.to_thread(lambda: ray.get(controller.status.remote())))["records"]
            split = [r["at"] for r in records if r["model"] == GPT and r["action"] == "traffic"
                     and f"v{slow}:" in r["detail"]]
            rolled_back = [r["at"] for r in records if r["model"] == GPT and r["action"] == "rollback"]
            out["detect_s"] = round(rolled_back[-1] - split[-1], 2) if split and rolled_back else None
            out["detect_reason"] = last["reason"] if last["actor"] == "controller" else None
            out["detect_requests_failed"] = sum(1 for *_, ok in load.log[GPT] if not ok)

    asyncio.run(main())
    return out


def run(args) -> dict:
    """Deploy the app once and run ``--rounds`` rounds."""
    import ray
    from ray import serve

    from mass.access.keys import KeyStore
    from mass.app import build_app, wait_ready
    from mass.cluster import free_port
    from mass.serving.args import AppArgs
    from mass.settings import apply_ray_start_env, get_settings

    slow = register_models()
    _, secret = KeyStore().create({"name": "bench-rollout", "admin": True})
    apply_ray_start_env(get_settings())
    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    serve.run(build_app(AppArgs.model_validate(app_args())), name=APP, route_prefix="/",
              logging_config={"enable_access_log": False, "log_level": "WARNING"})
    wait_ready(url, timeout=300)
    rounds = []
    try:
        for i in range(args.rounds):
            rounds.append(run_round(url, {"Authorization": f"Bearer {secret}"}, slow))
            print(json.dumps({"round": i + 1, **rounds[-1]}), flush=True)
    finally:
        serve.delete(APP)
        serve.shutdown()
        ray.shutdown()
    return {"per_round": rounds}


def _spread(rounds: list[dict], key: str, unit: str = "") -> str:
    values = [r[key] for r in rounds if r.get(key) is not None]
    if not values:
        return "never"
    if len(values) < len(rounds):
        unit += f" ({len(rounds) - len(values)} rounds: never)"
    return f"{statistics.median(values):g}{unit} ({min(values):g}–{max(values):g})"


def render_table(result: dict) -> str:
    """The README's rollout table (markdown) from one run's JSON; the README test checks they agree."""
    r = result["per_round"]
    failed = sum(x["chat_failed"] + x["embed_failed"] for x in r)
    total = sum(x["chat_requests"] + x["embed_requests"] for x in r)
    reasons = sorted({" ".join(x["detect_reason"].split("SLO: ", 1)[1].split(" ")[:2])
                      for x in r if x.get("detect_reason")})
    lines = [f"Run of {result['date']} on {result['machine']}; {result['rounds']} rounds, median (range over "
             "rounds).", "",
             "| measure | result | goal |", "|---|---|---|",
             f"| canary share at 10 % over 2,000 chats (32 clients) | {_spread(r, 'canary_share_pct', ' %')} | "
             "10 ± 2 points |",
             f"| failed requests: promote + rollback under 16 streaming chat + 16 embedding clients, one replica "
             f"per version | **{failed} of {total}** | 0 |",
             f"| chat: promote, until every new request gets the new version | "
             f"{_spread(r, 'chat_promote_switch_s', ' s')} | — |",
             f"| chat: rollback (old version redeployed), after it is ready | "
             f"{_spread(r, 'chat_rollback_after_ready_s', ' s')} | ≤ 2 s |",
             f"| chat: rollback, from the operation (the old version's app was deleted: deployed again) | "
             f"{_spread(r, 'chat_rollback_switch_s', ' s')} | — |",
             f"| embeddings: promote | {_spread(r, 'embed_promote_switch_s', ' s')} | — |",
             f"| embeddings: rollback, from the operation | {_spread(r, 'embed_rollback_switch_s', ' s')} | — |",
             f"| embeddings: rollback, after it is ready | {_spread(r, 'embed_rollback_after_ready_s', ' s')} | "
             "≤ 2 s |",
             f"| slow canary (8x512 vs 4x256) at 50 %: split routed -> automatic rollback | "
             f"{_spread(r, 'detect_s', ' s')}, bound: {', '.join(reasons) or '—'} | — |"]
    return "\n".join(lines)


README_START, README_END = "<!-- benchmark:rollout -->", "<!-- /benchmark:rollout -->"


def main(argv=None) -> int:
    """Run the benchmark, print the table and the JSON line (and save / render them when asked)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds (medians and ranges reported)")
    parser.add_argument("--json", help="also write the JSON result to this file")
    parser.add_argument("--readme", help="rewrite this README's rollout table from the result")
    args = parser.parse_args(argv)
    from serving import run_and_save  # this directory's serving benchmark (a script dir on sys.path)

    return run_and_save(args, run, render_table, (README_START, README_END))


if __name__ == "__main__":
    raise SystemExit(main())
