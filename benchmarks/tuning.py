"""Tuning and training-input benchmark (issue 12), on a local Ray of this machine's cores:

- ASHA vs random search: one search space over the smoke recipe (learning rate, width), the same seed (so the
  same trials are drawn), the same trial count and epochs; ASHA (grace 1 epoch) against random search without
  stopping. Best validation loss of each, and the trial-steps ASHA ran as a share of random search's: as Tune
  recorded them (``steps_run`` in the JSON) and as the workers ran them (``worker_steps``; ``mass tune``'s count).
- Ray Train vs torchrun: the same 2-worker DDP run (same packed blocks, model, optimizer, steps, per-epoch
  validation and checkpoint) through MASS's Ray Train runner (``mass.training.job.fit``) and through ``torchrun``
  directly (``benchmarks/ddp_baseline.py``); wall time of each, process start to end, MLflow logging off in both.
- Ray Data input: tokenize + pack of the training split on the driver vs by Ray Data tasks (``data.pipeline:
  ray``), and the same Ray Train run fed each way.

Prints a table and one JSON line; ``--json PATH`` saves the JSON and ``--readme README.md`` rewrites the README's
tuning table.  Run:  .venv/bin/python benchmarks/tuning.py --json benchmarks/results/tuning.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "tiny-gpt-smoke.yaml"
TRAIN_SET = ["data.max_train_tokens=120000", "optim.epochs=2", "registration.enabled=false"]


def search(algorithm: str, seed: int, samples: int, epochs: int, workdir: Path) -> dict:
    """One search of the benchmark's space; its best metric and trial-steps."""
    import yaml

    from mass.tuning.config import TuneConfig
    from mass.tuning.job import run_tuning

    path = workdir / f"{algorithm}-{seed}.yaml"
    path.write_text(yaml.safe_dump({
        "name": f"bench-{algorithm}", "train": str(SMOKE),
        "set": ["data.max_train_tokens=40000", f"optim.epochs={epochs}", "registration.enabled=false"],
        "space": {"optim.lr": {"loguniform": [1e-4, 3e-2]}, "model.arch.n_embd": {"choice": [64, 128]}},
        "search": {"algorithm": algorithm, "num_samples": samples, "max_concurrent_trials": 1, "grace_period": 1,
                   "reduction_factor": 4, "seed": seed}}))
    started = time.perf_counter()
    result = run_tuning(TuneConfig.load(path))
    return {"best": result.best["metric"], "steps_run": result.steps_reported, "steps_budget": result.steps_budget,
            "worker_steps": result.steps_run,
            "wall_s": round(time.perf_counter() - started, 1),
            "trials": sorted((json.dumps(t["config"], sort_keys=True), t["status"]) for t in result.trials)}


def asha_vs_random(rounds: int, samples: int, epochs: int) -> list[dict]:
    """Per round (seed = round): both searches, the same trials drawn."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(rounds):
            asha, rand = (search(a, seed, samples, epochs, Path(tmp)) for a in ("asha", "random"))
            assert [c for c, _ in asha["trials"]] == [c for c, _ in rand["trials"]], "different trials drawn"
            out.append({"seed": seed, "asha": asha, "random": rand,
                        "best_ratio": round(asha["best"] / rand["best"], 4),
                        "steps_share": round(asha["steps_run"] / rand["steps_run"], 4),
                        "worker_steps_share": round(asha["worker_steps"] / rand["worker_steps"], 4)})
            print(f"seed {seed}: ASHA best {asha['best']:.4f} in {asha['steps_run']} steps; random best "
                  f"{rand['best']:.4f} in {rand['steps_run']} steps", flush=True)
    return out


def _prepared(pipeline: str):
    from mass.registry import ModelRegistry
    from mass.settings import get_settings
    from mass.training.config import TrainConfig
    from mass.training.job import prepare_run

    cfg = TrainConfig.load(SMOKE, [*TRAIN_SET, f"data.pipeline={pipeline}"])
    settings = get_settings()
    return cfg, replace(settings, tracking_uri=""), prepare_run(cfg, ModelRegistry(settings), settings)


def ray_train_wall(pipeline: str) -> tuple[float, float]:
    """(wall seconds of the Ray Train run alone (the data already packed), MLflow logging off; seconds of its last
    epoch's training steps)."""
    from mass.training.job import fit
    from mass.training.loop import train_loop_per_worker

    cfg, settings, prepared = _prepared(pipeline)
    started = time.perf_counter()
    result = fit(cfg, settings, "benchmark", prepared.model_spec, None, prepared.data, train_loop_per_worker,
                 name=f"bench-{pipeline}-{time.time_ns()}")
    return time.perf_counter() - started, float(result.metrics["epoch_s"])


def torchrun_wall(workdir: Path) -> tuple[float, float]:
    """(wall seconds of the same run through torchrun, process start to end; seconds of its last epoch's training
    steps)."""
    import numpy as np

    cfg, _, prepared = _prepared("driver")
    data = workdir / "data.npz"
    np.savez(data, train=prepared.data.train, validation=prepared.data.validation, test=prepared.data.test)
    (workdir / "spec.json").write_text(json.dumps(prepared.model_spec))
    (workdir / "optim.json").write_text(json.dumps(cfg.optim.model_dump()))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    started = time.perf_counter()
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", str(cfg.scaling.num_workers),
                           str(ROOT / "benchmarks" / "ddp_baseline.py"), "--data", str(data), "--spec",
                           str(workdir / "spec.json"), "--optim", str(workdir / "optim.json"), "--epochs",
                           str(cfg.optim.epochs)], check=True, cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)
    wall = time.perf_counter() - started
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith('{"epoch_s"'))
    return wall, float(json.loads(line)["epoch_s"][-1])


def pack_rates(rounds: int) -> dict:
    """Training-split tokens per second packed on the driver and by Ray Data (a warm-up of each first)."""
    from mass.data.loaders import load_corpus_split
    from mass.data.tokenizer import train_tokenizer
    from mass.settings import get_settings
    from mass.training.prep import pack, pack_on_cluster

    texts = load_corpus_split(get_settings().corpus_dir(), "train")
    tokenizer = train_tokenizer(texts, 2048, 256)
    driver, cluster = [], []
    tokens = pack(texts, tokenizer, 128).size
    pack_on_cluster(texts, tokenizer, 128)
    for _ in range(rounds):
        started = time.perf_counter()
        pack(texts, tokenizer, 128)
        driver.append(tokens / (time.perf_counter() - started))
        started = time.perf_counter()
        _, rows = pack_on_cluster(texts, tokenizer, 128)
        cluster.append(rows * 128 / (time.perf_counter() - started))
    return {"documents": len(texts), "tokens": int(tokens), "driver_tokens_per_s": driver,
            "ray_data_tokens_per_s": cluster}


TRAINING_KEYS = ("pack", "walls", "epoch_s")  # the training part's keys in the JSON; the rest is the searches'


def run(args) -> dict:
    """The parts asked for, in this order: packing and training walls (rounds interleaved), searches. One part
    alone is completed by the other part of the saved JSON when that ran on the same machine line."""
    from mass.cluster import connect_ray
    from mass.data.corpus import build_corpus

    build_corpus(progress=False)
    connect_ray(None)
    out: dict = {}
    if args.part in ("all", "training"):
        out["pack"] = pack_rates(args.rounds)
        out["walls"] = {"ray_train": [], "ray_train_ray_data": [], "torchrun": []}
        out["epoch_s"] = {"ray_train": [], "ray_train_ray_data": [], "torchrun": []}
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.rounds):
                for name, fn in (("ray_train", lambda: ray_train_wall("driver")), ("torchrun", lambda: torchrun_wall(
                        Path(tmp))), ("ray_train_ray_data", lambda: ray_train_wall("ray"))):
                    wall, epoch = fn()
                    out["walls"][name].append(round(wall, 2))
                    out["epoch_s"][name].append(round(epoch, 3))
                print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s (last epoch {out['epoch_s'][k][-1]:.1f} s)"
                                                     for k, v in out["walls"].items()), flush=True)
    if args.part in ("all", "searches"):
        out["searches"] = asha_vs_random(args.search_rounds, args.samples, args.epochs)
        out["search"] = {"samples": args.samples, "epochs": args.epochs, "grace_period": 1, "reduction_factor": 4,
                         "rounds": args.search_rounds}
    return _with_other_part(out, args)


def _with_other_part(out: dict, args) -> dict:
    """A one-part run completed by the other part of the saved JSON (``serving.saved_other_part``); the training
    part's rounds and the other part's date are kept."""
    from serving import machine_line, saved_other_part

    found = None if args.part == "all" else saved_other_part(
        args.json, machine_line(), lambda k: (k in TRAINING_KEYS) == (args.part == "searches"))
    if found is None:
        return out
    saved, other = found
    if args.part == "searches":
        out["rounds"] = saved.get("rounds")  # the training part's rounds
    out["other_date"] = saved.get("date")
    return {**other, **out}


def _spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def render_table(result: dict) -> str:
    """The README's tuning table (markdown) from one run's JSON; the README test checks they agree."""
    walls, pack, s, epochs = result["walls"], result["pack"], result["searches"], result["epoch_s"]
    ratio = [a / b for a, b in zip(walls["ray_train"], walls["torchrun"])]
    fixed = [a - b for a, b in zip(walls["ray_train"], walls["torchrun"])]
    step_ratio = [a / b for a, b in zip(epochs["ray_train"], epochs["torchrun"])]
    data_ratio = [a / b for a, b in zip(walls["ray_train_ray_data"], walls["ray_train"])]
    pack_ratio = [c / d for c, d in zip(pack["ray_data_tokens_per_s"], pack["driver_tokens_per_s"])]
    search = result["search"]
    when = result["date"] if not result.get("other_date") or result["other_date"] == result["date"] else \
        f"{result['date']} and {result['other_date']}"
    lines = [f"Run of {when} on {result['machine']}; {result['rounds']} rounds (searches: "
             f"{len(s)}), median (range over rounds).", "",
             "| measure | result | goal |", "|---|---|---|",
             f"| ASHA vs random search, {search['samples']} trials x {search['epochs']} epochs (same seed, same "
             f"trials): best val_loss | ASHA {_spread([r['asha']['best'] for r in s], '{:.3f}')} vs random "
             f"{_spread([r['random']['best'] for r in s], '{:.3f}')}: "
             f"**{_spread([r['best_ratio'] for r in s], '{:.3f}')}x** | within 2 % (≤ 1.02x) |",
             f"| ASHA's trial-steps / random search's, as Tune recorded them | "
             f"**{_spread([100 * r['steps_share'] for r in s], '{:.0f}')} %** | ≤ 40 % |",
             *([f"| the same, as the workers ran them (a stopped trial's workers go on until the stop reaches "
                f"them) | **{_spread([100 * r['worker_steps_share'] for r in s], '{:.0f}')} %** | ≤ 40 % |"]
               if all("worker_steps_share" in r for r in s) else []),
             f"| 2-worker DDP run, Ray Train (MASS) vs torchrun: wall | {_spread(walls['ray_train'], '{:.1f}')} s vs "
             f"{_spread(walls['torchrun'], '{:.1f}')} s: **{_spread(ratio)}x** | ≤ 1.10x |",
             f"| the same run's last epoch, training steps only (no start, evaluation or checkpoint): Ray Train vs "
             f"torchrun | {_spread(epochs['ray_train'])} s vs {_spread(epochs['torchrun'])} s: "
             f"**{_spread(step_ratio)}x**; the rest of the gap is {_spread(fixed, '{:.1f}')} s a run | reported |",
             f"| tokenize + pack the training split ({pack['tokens']:,} tokens): Ray Data / driver throughput | "
             f"{_spread(pack['ray_data_tokens_per_s'], '{:,.0f}')} vs {_spread(pack['driver_tokens_per_s'], '{:,.0f}')}"
             f" tokens/s: **{_spread(pack_ratio)}x** | reported |",
             f"| the same Ray Train run fed by Ray Data / by the driver: wall | "
             f"{_spread(walls['ray_train_ray_data'], '{:.1f}')} s vs {_spread(walls['ray_train'], '{:.1f}')} s: "
             f"**{_spread(data_ratio)}x** | ≤ 1.0x (not slower) |"]
    return "\n".join(lines)


README_START, README_END = "<!-- benchmark:tuning -->", "<!-- /benchmark:tuning -->"


def main(argv=None) -> int:
    """Run the benchmark, print the table and the JSON line (and save / render them when asked)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the packing and training parts")
    parser.add_argument("--search-rounds", type=int, default=1, help="ASHA/random pairs (seeds 0, 1, ...)")
    parser.add_argument("--samples", type=int, default=16, help="trials per search")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per trial")
    parser.add_argument("--part", choices=("all", "training", "searches"), default="all",
                        help="run one part; the other comes from --json's saved run (same machine line)")
    parser.add_argument("--json", help="also write the JSON result to this file")
    parser.add_argument("--readme", help="rewrite this README's tuning table from the result")
    args = parser.parse_args(argv)
    from serving import run_and_save  # this directory's serving benchmark (a script dir on sys.path)

    return run_and_save(args, run, render_table, (README_START, README_END))


if __name__ == "__main__":
    raise SystemExit(main())
