"""Tuning configs: the search space is checked against the training recipe before any trial starts."""

from pathlib import Path

import pytest
import yaml

from mass.errors import ConfigError
from mass.tuning.config import TuneConfig
from mass.tuning.space import Dimension, parse_space, sample_count

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "jobs" / "configs" / "tiny-gpt-smoke.yaml"


def write(tmp_path, space=None, search=None, **top):
    """A tuning config in ``tmp_path`` over the smoke recipe."""
    data = {"train": str(SMOKE), "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}} if space is None else space,
            **({"search": search} if search else {}), **top}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_shipped_tuning_config_plans_its_search():
    plan = TuneConfig.load(ROOT / "jobs" / "configs" / "tiny-gpt-tune.yaml")
    assert plan.name == "tiny-gpt" and plan.recipe.optim.epochs == 4 and plan.max_epochs == 4
    assert [d.path for d in plan.dims] == ["optim.lr", "optim.batch_size", "model.arch.n_embd"]
    assert plan.config.search.algorithm == "asha" and sample_count(plan.dims, plan.config.search.num_samples) == 4


def test_every_distribution_becomes_its_ray_tune_domain():
    from ray.tune.search.sample import Categorical, Float, Integer

    dims = parse_space({"optim.lr": {"loguniform": [1e-4, 1e-2]}, "optim.weight_decay": {"uniform": [0, 0.1]},
                        "model.arch.n_layer": {"randint": [1, 3]}, "optim.batch_size": {"choice": [8, 16]},
                        "optim.warmup_steps": {"grid": [0, 10, 20]}})
    lr, wd, layers, batch, warmup = (d.to_tune() for d in dims)
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (1e-4, 1e-2)
    assert isinstance(wd, Float) and isinstance(batch, Categorical) and batch.categories == [8, 16]
    assert isinstance(layers, Integer) and (layers.lower, layers.upper) == (1, 4)  # our high end is included
    assert warmup == {"grid_search": [0, 10, 20]}
    assert sample_count(dims, 2) == 6  # each grid value gets num_samples trials


@pytest.mark.parametrize("space,needle", [
    ({}, "the search space is empty"),
    ({"optim.lr": {"loguniform": [1e-2, 1e-4]}}, "space.optim.lr: loguniform bounds [0.01, 0.0001] are inverted"),
    ({"optim.lr": {"uniform": [0.01, 0.01]}}, "are inverted or empty"),
    ({"optim.lr": {"loguniform": [0, 1e-2]}}, "loguniform bounds must be above 0"),
    ({"optim.lr": {"normal": [0, 1]}}, "expected one distribution"),
    ({"optim.lr": {"uniform": [1e-4]}}, "uniform takes [low, high]"),
    ({"optim.batch_size": {"randint": [8, 16.5]}}, "randint bounds must be integers"),
    ({"optim.batch_size": {"choice": []}}, "choice takes a non-empty list"),
    ({"optim.lrr": {"uniform": [0, 1]}}, "the training recipe has no field optim.lrr (optim's fields: epochs"),
    ({"optim": {"choice": [1]}}, "optim is a section, not a field"),
    ({"scaling.num_workers": {"choice": [1, 2]}}, "scaling.num_workers is the same for every trial"),
    ({"name": {"choice": ["a", "b"]}}, "name is the same for every trial"),
    ({"optim.lr": {"loguniform": [1e-4, 2.0]}}, "space.optim.lr: 2.0 does not make a valid training recipe: "
                                                "optim.lr: Input should be less than or equal to 1"),
    ({"model.arch.n_embd": {"choice": [64, 96]}, "model.arch.n_head": {"choice": [4, 5]}},
     "n_head: 5 does not make a valid training recipe"),  # 5 alone: 128 is not divisible by it
    ({"model.arch.n_embd": {"choice": [64, 100]}, "model.arch.n_head": {"choice": [4, 8]}},
     "the combination model.arch.n_embd=100, model.arch.n_head=8"),  # each value alone is valid
])
def test_a_bad_search_space_fails_before_any_trial_naming_the_field(tmp_path, space, needle):
    with pytest.raises(ConfigError) as info:
        TuneConfig.load(write(tmp_path, space))
    assert needle in str(info.value)


@pytest.mark.parametrize("search,top,needle", [
    ({"metric": "accuracy"}, {}, "the trainer never reports 'accuracy'; it reports val_loss, val_perplexity"),
    ({"mode": "lowest"}, {}, "search.mode"),
    ({"grace_period": 5}, {}, "search.grace_period=5 exceeds the most epochs a trial runs (3)"),
    ({"num_samples": 0}, {}, "search.num_samples"),
    ({"reduction_factor": 1}, {}, "search.reduction_factor"),
    ({}, {"train": "missing.yaml"}, "the training recipe"),
    ({}, {"set": ["optim.lr=-1"]}, "optim.lr"),
    ({}, {"name": "bad/name"}, "illegal model name"),
])
def test_a_bad_search_or_recipe_fails_before_any_trial(tmp_path, search, top, needle):
    with pytest.raises(Exception) as info:
        TuneConfig.load(write(tmp_path, search=search, **top))
    assert needle in str(info.value)


def test_optuna_is_refused_without_its_package_and_with_a_grid(tmp_path):
    try:
        import optuna  # noqa: F401
        missing = False
    except ImportError:
        missing = True
    with pytest.raises(ConfigError) as info:
        TuneConfig.load(write(tmp_path, {"optim.lr": {"grid": [1e-3, 1e-2]}}, {"algorithm": "optuna"}))
    assert ("needs the optuna package: `pip install optuna`" if missing else "use choice instead of grid") \
        in str(info.value)


def test_a_tuned_epoch_count_sets_the_budget_and_relative_recipes_resolve(tmp_path):
    (tmp_path / "recipe.yaml").write_text(SMOKE.read_text())
    path = write(tmp_path, {"optim.epochs": {"randint": [2, 6]}}, {"grace_period": 5}, train="recipe.yaml")
    plan = TuneConfig.load(path)
    assert plan.max_epochs == 6 and plan.recipe_path == tmp_path / "recipe.yaml"
    assert plan.dims == [Dimension("optim.epochs", "randint", (2, 6))]


def test_asha_rung_records_survive_a_driver_restart(tmp_path):
    """Ray Tune restores a scheduler from the pickle taken when the search started (ray#30838): PersistentASHA
    reads the rungs it saved back, so a trial resumed after the restart still meets the bar the others set."""
    import pickle
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from mass.tuning.asha import PersistentASHA

    state = tmp_path / "asha.pkl"
    first = PersistentASHA(str(state), time_attr="epoch", metric="val_loss", mode="min", max_t=3, grace_period=1,
                           reduction_factor=2)
    started = pickle.dumps(first)  # what tuner.pkl holds
    good, bad = SimpleNamespace(trial_id="good"), SimpleNamespace(trial_id="bad")
    first.on_trial_add(None, good)
    for epoch, loss in ((1, 4.0), (2, 3.5)):
        assert first.on_trial_result(None, good, {"epoch": epoch, "val_loss": loss}) == TrialScheduler.CONTINUE
    first.on_trial_complete(None, good, {"epoch": 3, "val_loss": 3.2})

    restored = pickle.loads(started)  # the driver died; Tuner.restore unpickles the scheduler as it was at start
    restored.on_trial_add(None, bad)
    assert restored.on_trial_result(None, bad, {"epoch": 1, "val_loss": 9.0}) == TrialScheduler.STOP
    forgetful = pickle.loads(started)  # without the saved rungs the weak trial would go on
    forgetful.state_path = str(tmp_path / "none.pkl")
    forgetful.on_trial_add(None, bad)
    assert forgetful.on_trial_result(None, bad, {"epoch": 1, "val_loss": 9.0}) == TrialScheduler.CONTINUE
