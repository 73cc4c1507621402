"""The training job on a real Ray cluster: smoke recipe, MLflow records, registration, fine-tune."""

from __future__ import annotations

import json

import torch

from mass.registry import ModelRegistry
from mass.training.config import TrainConfig
from mass.training.job import run_training
from tests.integration.support import SMOKE


def test_smoke_recipe_learns_and_registers(trained):
    m = trained.metrics
    assert m["val_loss"] < m["initial_val_loss"] - 1.0, m       # well below where it started
    assert m["test_perplexity"] < 0.5 * torch.e ** m["initial_val_loss"]
    assert trained.model_ref == "tiny-gpt/1" and trained.resumed_from_epoch == 0

    reg = ModelRegistry()
    info = reg.resolve("tiny-gpt@latest-train")
    assert info.ref == "tiny-gpt/1" and info.task == "text-generation" and info.run_id == trained.run_id
    assert info.lineage == {"source_run": trained.run_id, "method": "train"}
    assert info.metrics["val_loss"] == m["val_loss"] and "test_loss" in info.metrics
    assert info.config["optim"]["epochs"] == 3 and info.config["scaling"]["num_workers"] == 2

    run = reg.client.get_run(trained.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["scaling.num_workers"] == "2"
    steps = reg.client.get_metric_history(trained.run_id, "train_loss")
    assert len(steps) >= 10 and steps[-1].value < steps[0].value       # per-step metrics were logged
    assert [h.step for h in reg.client.get_metric_history(trained.run_id, "val_loss")] == [1, 2, 3]
    saved = json.loads(open(reg.client.download_artifacts(trained.run_id, "resolved_config.json")).read())
    assert saved == TrainConfig.load(SMOKE).model_dump(mode="json")
    read = json.loads(open(reg.client.download_artifacts(trained.run_id, "datasets.json")).read())
    assert [(r["split"], r["path"].endswith(f"corpus/{r['split']}.parquet"), len(r["content_hash"]), r["dataset"])
            for r in read] == [(s, True, 64, None) for s in ("train", "validation", "test")]  # none registered

    from mass.events import open_bus

    bus = open_bus()  # the job announced its version, then its completion, on the platform's event bus
    mine = [e for e in bus.replay(count=100_000) if getattr(e.data, "run_id", None) == trained.run_id]
    bus.close()
    assert [e.type for e in mine] == ["model.version.registered", "training.completed"]
    assert mine[1].data.version == "1" and mine[1].data.metrics["val_loss"] == m["val_loss"]
    assert mine[1].source == "training"


def test_registered_model_loads_and_generates(trained):
    model, tokenizer, info = ModelRegistry().load(trained.model_ref)
    ids = tokenizer("Return the", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] == ids.shape[1] + 8
    assert model.config.n_layer == 2 and model.config.vocab_size == len(tokenizer)


def test_fine_tune_a_registered_model_on_a_registered_dataset_packed_by_ray_data(trained, ray_cluster, tmp_path):
    """User jsonl registered as a dataset version; the recipe names the version; the run and the model version
    record it. The training split is tokenized and packed by Ray Data tasks and streamed to the workers in
    shards (``data.pipeline: ray``)."""
    from mass.data.datasets import DatasetStore

    docs = [{"text": f"The gateway routes request {i} to replica {i % 3} and returns tokens."} for i in range(400)]
    data = tmp_path / "ops" / "part-0.jsonl"
    data.parent.mkdir()
    data.write_text("\n".join(json.dumps(d) for d in docs))
    dataset, _ = DatasetStore().register("ops-docs", str(data.parent))
    cfg = TrainConfig.load(SMOKE, [f"data.dataset={dataset.ref}", "name=tiny-gpt-ops",
                                   "model.base=tiny-gpt@latest-train", "optim.epochs=2", "optim.batch_size=4",
                                   "optim.warmup_steps=2", "registration.aliases=[]", "data.pipeline=ray"])
    result = run_training(cfg, address=ray_cluster.gcs_address)
    info = ModelRegistry().resolve(result.model_ref)
    assert info.ref == "tiny-gpt-ops/1"
    assert info.lineage == {"source_run": result.run_id, "parent": "tiny-gpt/1", "method": "finetune",
                            "datasets": "ops-docs@1"}
    run = ModelRegistry().client.get_run(result.run_id)
    assert run.data.tags["mass.datasets"] == "ops-docs@1" and run.data.params["data.dataset"] == "ops-docs@1"
    assert run.data.params["data.pipeline"] == "ray"
    # every rank took the same steps over its equal shard: 2 workers x 4 sequences of block_size per step, 2 epochs
    steps = result.data_tokens["train"] // cfg.data.block_size // (2 * 4)
    assert [int(m.step) for m in ModelRegistry().client.get_metric_history(result.run_id, "val_loss")] == [1, 2]
    assert ModelRegistry().client.get_metric_history(result.run_id, "train_loss")[-1].step == 2 * steps
    # the base's tokenizer is kept and the model learned the new domain quickly
    assert result.metrics["val_loss"] < result.metrics["initial_val_loss"] - 0.5
