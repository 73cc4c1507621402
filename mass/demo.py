"""The ``make demo`` story, end to end on embedded defaults: corpus -> train -> import -> registry table."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run_demo(recipe: str | None = None) -> int:
    """Build the corpus, train the smoke GPT on a local 2-worker Ray, import MiniLM, print the registry."""
    from mass.cli.output import models_table
    from mass.data.corpus import build_corpus
    from mass.registry import ModelRegistry
    from mass.registry.imports import import_minilm
    from mass.settings import get_settings
    from mass.training.config import TrainConfig
    from mass.training.job import run_training

    settings = get_settings()
    started = time.perf_counter()
    print(f"MASS demo  (MASS_HOME={settings.home}, registry {settings.tracking_uri})", flush=True)

    _step("1/4 build the docstring corpus")
    corpus = build_corpus()
    print(f"corpus {corpus.path}: {corpus.counts}", flush=True)

    _step("2/4 train tiny-gpt on a local Ray cluster (Ray Train, 2 DDP workers)")
    recipe = recipe or str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "tiny-gpt-smoke.yaml")
    result = run_training(TrainConfig.load(recipe))
    m = result.metrics
    print(f"registered {result.model_ref}: val_loss {m['initial_val_loss']:.3f} -> {m['val_loss']:.3f}, "
          f"test perplexity {m['test_perplexity']:.1f}", flush=True)

    _step("3/4 import the pretrained all-MiniLM-L6-v2 from its package")
    registry = ModelRegistry(settings)
    info, created = import_minilm(registry)
    print(f"{'imported' if created else 'already imported'} {info.ref} ({', '.join(info.aliases)})", flush=True)

    _step("4/4 the model repository")
    print(models_table(registry.list_models()), flush=True)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    return 0
