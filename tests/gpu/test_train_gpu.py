"""The smoke recipe on one GPU worker (``scaling.use_gpu=true``) on a local Ray."""

from pathlib import Path

SMOKE = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "tiny-gpt-smoke.yaml"


def test_smoke_recipe_on_gpu(mass_home):
    import ray

    from mass.data.corpus import build_corpus
    from mass.registry import ModelRegistry
    from mass.training.config import TrainConfig
    from mass.training.job import run_training

    build_corpus(progress=False)
    try:
        cfg = TrainConfig.load(SMOKE, ["scaling.use_gpu=true", "scaling.num_workers=1", "name=tiny-gpt-gpu"])
        result = run_training(cfg)
    finally:
        ray.shutdown()
    assert result.metrics["val_loss"] < result.metrics["initial_val_loss"] - 1.0
    assert ModelRegistry().resolve("tiny-gpt-gpu").ref == result.model_ref
