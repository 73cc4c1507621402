"""``train_loop_per_worker``: the DDP training loop every Ray Train worker runs, top to bottom.

Rank 0 writes checkpoints and MLflow step metrics; every rank calls ``ray.train.report`` once per
epoch (Train V2 requires the same number of reports on every worker).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any

from mass.training.progress import StepProgress, say, step_line

STATE_FILE = "state.pt"
#: the metrics every epoch's report carries that a search can rank trials by (``mass.tuning``)
EPOCH_METRICS = ("val_loss", "val_perplexity", "train_loss")


def build_model(spec: dict[str, Any]):
    """A causal LM from its HF config dict (weights are random until a state dict is loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mass.models import MODEL_BUILD_LOCK

    config = AutoConfig.for_model(**spec)
    with MODEL_BUILD_LOCK:
        return AutoModelForCausalLM.from_config(config)


def evaluate(model, blocks, batch_size: int, rank: int, world: int, device) -> float:
    """Mean token loss over ``blocks``, each rank taking a stride and sums all-reduced."""
    import torch
    import torch.distributed as dist

    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss * tokens, tokens)
    mine = blocks[rank::world]
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            x = torch.tensor(mine[i:i + batch_size], dtype=torch.long, device=device)  # copy: shared memory is read-only
            loss = model(input_ids=x, labels=x).loss
            tokens = x.numel() - x.shape[0]  # one target fewer than inputs per row
            total += torch.tensor([loss.item() * tokens, tokens], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1].clamp(min=1))


def _batches(train, shard, steps: int, batch: int, rank: int, world: int, seed: int):
    """This rank's ``steps`` batches of one epoch (int64 tensors): a seeded permutation of the shared blocks, or
    the streamed shard locally shuffled (its equal split holds exactly ``steps`` full batches)."""
    import numpy as np
    import torch

    if shard is None:
        order = np.random.default_rng(seed).permutation(len(train))
        mine = order[: steps * world * batch][rank::world]  # equal steps on every rank
        for i in range(steps):
            yield torch.as_tensor(train[mine[i * batch:(i + 1) * batch]], dtype=torch.long)
        return
    done = 0
    for item in shard.iter_torch_batches(batch_size=batch, drop_last=True, dtypes=torch.long,
                                         local_shuffle_buffer_size=batch * 8, local_shuffle_seed=seed):
        if done < steps:  # (the split is equal: a surplus would only come from a smaller world than planned)
            yield item["ids"]
        done += 1
    if done < steps:  # fewer than the other ranks: DDP would wait for this rank forever
        raise RuntimeError(f"rank {rank} got {done} batches of its shard, {steps} expected")


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Train one causal LM data-parallel; resume from the latest checkpoint when there is one."""
    import ray
    import ray.train
    import torch
    from ray.train import Checkpoint
    from ray.train.torch import get_device, prepare_model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    opt = cfg["optim"]
    torch.manual_seed(opt["seed"])
    torch.set_num_threads(max(1, int(cfg["threads_per_worker"])))
    device = get_device()

    # --- data: packed blocks shared through the object store, identical on every worker; or (data.pipeline: ray)
    # this worker's shard of the training blocks, streamed (an equal split: every rank takes the same steps)
    data = ray.get(cfg["data_ref"])
    train, val, test = data["train"], data["validation"], data["test"]
    shard = ray.train.get_dataset_shard("train") if train is None else None
    batch = opt["batch_size"]
    steps_per_epoch = cfg["train_blocks"] // (world * batch)

    # --- model: fresh from config or the fine-tune base, then wrapped in DDP
    model = build_model(cfg["model_spec"])
    if cfg.get("init_state_ref") is not None:
        model.load_state_dict(ray.get(cfg["init_state_ref"]))
    model = prepare_model(model)
    raw = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt["lr"], weight_decay=opt["weight_decay"])
    total_steps = max(1, steps_per_epoch * cfg["epochs"])

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10% of peak
        if step < opt["warmup_steps"]:
            return (step + 1) / opt["warmup_steps"]
        progress = (step - opt["warmup_steps"]) / max(1, total_steps - opt["warmup_steps"])
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)

    # --- resume: the latest reported checkpoint, after a worker failure or a restarted job
    start_epoch, step, initial_val = 0, 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = torch.load(os.path.join(ckpt_dir, STATE_FILE), map_location=device, weights_only=False)
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step, initial_val = state["epoch"] + 1, state["step"], state["initial_val_loss"]
        if rank == 0:
            say(f"resumed from checkpoint after epoch {state['epoch'] + 1}")
    if initial_val is None:
        initial_val = evaluate(model, val, batch, rank, world, device)

    mlflow_client = None
    if rank == 0 and cfg.get("tracking_uri"):
        from mlflow import MlflowClient

        mlflow_client = MlflowClient(tracking_uri=cfg["tracking_uri"])

    # --- epochs: train, validate, checkpoint, report
    for epoch in range(start_epoch, cfg["epochs"]):
        started, running = time.perf_counter(), 0.0
        for i, x in enumerate(_batches(train, shard, steps_per_epoch, batch, rank, world, opt["seed"] + epoch)):
            x = x.to(device)
            loss = model(input_ids=x, labels=x).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt["grad_clip"])
            optimizer.step()
            scheduler.step()
            step += 1
            running += loss.item()
            if rank == 0 and (step % opt["log_every"] == 0 or i == steps_per_epoch - 1):
                rate = (i + 1) / (time.perf_counter() - started)
                say(step_line(StepProgress(epoch + 1, cfg["epochs"], i + 1, steps_per_epoch, loss.item()),
                              scheduler.get_last_lr()[0], rate))
                if mlflow_client is not None:
                    mlflow_client.log_metric(cfg["run_id"], "train_loss", loss.item(), step=step)
        epoch_s = time.perf_counter() - started  # the epoch's training steps alone (no evaluation or checkpoint)
        val_loss = evaluate(model, val, batch, rank, world, device)
        metrics = {"epoch": epoch + 1, "step": step, "epoch_s": round(epoch_s, 3),
                   "train_loss": running / max(1, steps_per_epoch),
                   "val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50)),
                   "initial_val_loss": initial_val, "start_epoch": start_epoch}
        if epoch == cfg["epochs"] - 1:  # final test evaluation rides on the last report
            test_loss = evaluate(model, test, batch, rank, world, device)
            metrics.update(test_loss=test_loss, test_perplexity=math.exp(min(test_loss, 50)))
        if mlflow_client is not None:
            for key in ("train_loss", "val_loss", "val_perplexity", "test_loss", "test_perplexity"):
                if key in metrics:
                    mlflow_client.log_metric(cfg["run_id"], f"epoch_{key}" if key == "train_loss" else key,
                                             metrics[key], step=epoch + 1)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save({"model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step,
                            "initial_val_loss": initial_val}, os.path.join(tmp, STATE_FILE))
                ckpt = Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
