"""The torchrun baseline of ``benchmarks/tuning.py``: the training loop MASS's Ray Train job runs (same model
config, AdamW, warm-up + cosine schedule, gradient clip, per-epoch permutation, per-epoch validation and a
checkpoint written by rank 0), as plain ``torch.distributed`` DDP over gloo, without Ray.

    torchrun --nproc_per_node 2 benchmarks/ddp_baseline.py --data DATA.npz --spec SPEC.json --optim OPTIM.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time


def main() -> None:
    """Train as ``mass.training.loop.train_loop_per_worker`` does, minus Ray; rank 0 prints one JSON line with
    each epoch's seconds of training steps (``epoch_s``, as the Ray Train loop reports them)."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from mass.training.loop import build_model, evaluate

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--optim", required=True)
    parser.add_argument("--epochs", type=int, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    opt = json.loads(open(args.optim).read())
    torch.manual_seed(opt["seed"])
    torch.set_num_threads(1)
    data = np.load(args.data)
    train, val, test = data["train"], data["validation"], data["test"]
    batch = opt["batch_size"]
    steps_per_epoch = len(train) // (world * batch)
    model = torch.nn.parallel.DistributedDataParallel(build_model(json.loads(open(args.spec).read())))
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt["lr"], weight_decay=opt["weight_decay"])
    total = max(1, steps_per_epoch * args.epochs)

    def lr_at(step: int) -> float:
        if step < opt["warmup_steps"]:
            return (step + 1) / opt["warmup_steps"]
        progress = (step - opt["warmup_steps"]) / max(1, total - opt["warmup_steps"])
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    device = torch.device("cpu")
    evaluate(model, val, batch, rank, world, device)
    epoch_s = []
    with tempfile.TemporaryDirectory() as tmp:
        for epoch in range(args.epochs):
            started = time.perf_counter()
            order = np.random.default_rng(opt["seed"] + epoch).permutation(len(train))
            mine = order[: steps_per_epoch * world * batch][rank::world]
            for i in range(steps_per_epoch):
                x = torch.as_tensor(train[mine[i * batch:(i + 1) * batch]], dtype=torch.long)
                loss = model(input_ids=x, labels=x).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), opt["grad_clip"])
                optimizer.step()
                scheduler.step()
            epoch_s.append(round(time.perf_counter() - started, 3))
            evaluate(model, val, batch, rank, world, device)
            if epoch == args.epochs - 1:  # the final test evaluation, as the Ray Train loop's last report has
                evaluate(model, test, batch, rank, world, device)
            if rank == 0:
                torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict()},
                           os.path.join(tmp, "state.pt"))
            dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"epoch_s": epoch_s}), flush=True)


if __name__ == "__main__":
    main()
