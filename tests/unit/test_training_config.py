from pathlib import Path

import numpy as np
import pytest

from mass.errors import ConfigError, DataError, InvalidModelRef
from mass.training.config import TrainConfig
from mass.training.prep import pack, prepare, read_splits

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "jobs" / "configs" / "tiny-gpt-smoke.yaml"


@pytest.mark.parametrize("recipe", sorted((ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(recipe):
    """Training recipes, compression pipelines (``*-pipeline.yaml``) and tuning runs (``*-tune.yaml``) each load
    under their own schema."""
    if recipe.name.endswith("-pipeline.yaml"):
        from mass.compression.pipeline import PipelineConfig

        assert PipelineConfig.load(recipe).steps
    elif recipe.name.endswith("-tune.yaml"):
        from mass.tuning.config import TuneConfig

        assert TuneConfig.load(recipe).dims
    else:
        assert TrainConfig.load(recipe).scaling.num_workers >= 1


def test_smoke_recipe_values():
    cfg = TrainConfig.load(SMOKE, ["optim.epochs=1", "scaling.num_workers=1"])
    assert cfg.name == "tiny-gpt" and cfg.optim.epochs == 1 and cfg.scaling.num_workers == 1
    assert cfg.model.base is None and cfg.model.arch.n_layer == 2


@pytest.mark.parametrize("override,exc,needle", [
    ("optim.epochs=many", ConfigError, "optim.epochs"),
    ("optim.lr=-1", ConfigError, "optim.lr"),
    ("scaling.num_workers=0", ConfigError, "scaling.num_workers"),
    ("model.arch.n_head=3", ConfigError, "divisible by n_head"),
    ("optim.epoch=2", ConfigError, "optim.epoch: unknown key"),
    ("data.train=/no/such/file.jsonl", ConfigError, "data file not found: /no/such/file.jsonl"),
    ("model.base=bad ref!", InvalidModelRef, "illegal model name"),
    ("name=bad/name", InvalidModelRef, "illegal model name"),
    ("registration.aliases=[Prod]", InvalidModelRef, "illegal alias"),
])
def test_bad_recipes_fail_fast_naming_the_field(override, exc, needle):
    with pytest.raises(exc) as info:
        TrainConfig.load(SMOKE, [override])
    assert needle in str(info.value) and "\n" not in str(info.value)


class _ByteTokenizer:
    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False, verbose=True):
        return {"input_ids": [[b + 1 for b in t.encode()] for t in texts]}


def test_pack_joins_documents_with_eos_into_equal_blocks():
    blocks = pack(["abc", "de"], _ByteTokenizer(), block_size=3)
    assert blocks.dtype == np.int32 and blocks.shape == (2, 3)
    assert blocks.ravel().tolist() == [98, 99, 100, 0, 101, 102]


def test_user_files_hold_out_validation_and_test(tmp_path):
    (tmp_path / "train.txt").write_text("\n\n".join(f"document number {i} " * 5 for i in range(200)))
    cfg = TrainConfig.load(SMOKE, [f"data.train={tmp_path / 'train.txt'}", "data.block_size=16"]).data
    texts = read_splits(cfg, tmp_path, seed=0)
    data = prepare(cfg, _ByteTokenizer(), texts, min_blocks=4)
    assert len(data.validation) > 0 and len(data.test) > 0 and len(data.train) > len(data.validation)
    with pytest.raises(DataError, match="train split has .* need at least 100000"):
        prepare(cfg, _ByteTokenizer(), texts, min_blocks=100000)


def test_the_progress_line_round_trips():
    """What rank 0 writes is what `mass train --address` parses into its progress bar."""
    from mass.training.progress import PREFIX, StepProgress, parse_step, step_line

    p = StepProgress(2, 3, 17, 40, 5.4321)
    assert parse_step(PREFIX + step_line(p, 1e-3, 4.2)) == StepProgress(2, 3, 17, 40, 5.4321)
    assert parse_step("[mass] resumed from checkpoint after epoch 1") is None
