"""Pruning of an encoder or a causal LM (``mass compress prune`` / ``jobs/prune.py``): structured pruning that
really shrinks the tensors — whole layers and FFN channels, chosen by their importance on calibration data — with an
optional recovery run (distillation from the unpruned parent, Ray Train); and global magnitude pruning, reported as
what it is: zeros inside dense tensors, so neither a smaller file nor a faster kernel. Every child goes on the
card."""

from __future__ import annotations

import logging
import os
import random
from typing import Any

from mass.compression.arch import Arch, arch_of
from mass.compression.card import mean_loss
from mass.compression.distill import (TeacherInputs, add_precision_arg, student_state, students_maker, train_blocks,
                                     train_texts, training_precision)
from mass.compression.job import Child, CompressionResult, check_parent
from mass.errors import ConfigError

log = logging.getLogger(__name__)

CALIBRATION_TEXTS = 128  # encoders; a causal LM calibrates on CALIBRATION_BLOCKS blocks of its training tokens
CALIBRATION_BLOCKS = 32
STRUCTURED_HELP = "structured pruning (whole layers and FFN channels removed by importance on calibration texts)"
MAGNITUDE_HELP = ("global magnitude pruning (the smallest weights of the model's layers set to zero; the "
                  "tensors stay dense: no smaller file, no faster kernel)")


def _pooled(model, tokenizer, texts: list[str]):
    """The normalised mean-pooled embeddings of ``texts`` (distillation's pooling, in batches of 32)."""
    import torch

    from mass.compression.distill import _pooled as pooled

    batches = (tokenizer(texts[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
               for i in range(0, len(texts), 32))
    with torch.inference_mode():
        return torch.nn.functional.normalize(torch.cat([pooled(model(**b).last_hidden_state, b["attention_mask"])
                                                        for b in batches]), dim=-1)


def _build(spec: dict[str, Any], state: dict[str, Any]):
    from mass.compression.distill import _build as build

    model = build(spec)
    model.load_state_dict(state)
    return model.eval()


def layer_scores(spec: dict[str, Any], state: dict[str, Any], tokenizer, data) -> list[float]:
    """Each layer's importance: how much the model's output moves when that layer alone is removed — an encoder's
    embeddings of ``data`` (texts): 1 - mean cosine; a causal LM's loss on ``data`` (token blocks): its rise."""
    arch = arch_of(spec)
    total = spec[arch.layers_key]

    def without(layer):
        kept = [i for i in range(total) if i != layer]
        return _build({**spec, arch.layers_key: total - 1}, student_state(state, kept, arch))

    if arch.causal:
        full = mean_loss(_build(spec, state), data)
        return [mean_loss(without(layer), data) - full for layer in range(total)]
    full = _pooled(_build(spec, state), tokenizer, data)
    return [float(1 - (full * _pooled(without(layer), tokenizer, data)).sum(-1).mean()) for layer in range(total)]


def ffn_scores(model, tokenizer, data, arch: Arch) -> list[Any]:
    """Per layer, each FFN channel's importance: its mean absolute activation over the calibration tokens (an
    encoder's ``data``: texts; a causal LM's: token blocks) times the norm of the weights that carry it back to the
    residual stream."""
    import torch

    layers = arch.layer_modules(model)
    width = arch.ffn_width(model.config.to_dict())
    sums = [torch.zeros(width) for _ in layers]
    counts = [0]
    masks: list[Any] = []

    def hook(index):
        def record(module, inputs, output):
            mask = masks[-1].unsqueeze(-1).to(output.dtype)
            sums[index] += (output.abs() * mask).sum((0, 1))
        return record

    handles = [layer.get_submodule(arch.activation).register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            for i in range(0, len(data), 32 if not arch.causal else 8):
                if arch.causal:
                    batch = {"input_ids": torch.as_tensor(data[i:i + 8], dtype=torch.long)}
                    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
                else:
                    batch = tokenizer(data[i:i + 32], padding=True, truncation=True, max_length=128,
                                      return_tensors="pt")
                masks.append(batch["attention_mask"])
                counts[0] += int(batch["attention_mask"].sum())
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return [s / counts[0] * layer.get_parameter(arch.ffn_out).detach().norm(dim=1 - arch.out_axis)
            for s, layer in zip(sums, layers)]


def prune_structured(spec: dict[str, Any], state: dict[str, Any], tokenizer, data, drop_layers: int,
                     ffn: float) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(config dict, state, what was removed): the ``drop_layers`` least important layers removed, then in every
    remaining layer the ``ffn`` fraction of FFN channels with the lowest importance (the same count per layer, so
    the result is a plain HF model of a smaller FFN width). ``data``: calibration texts (encoders) or token blocks
    (causal LMs)."""
    arch = arch_of(spec)
    removed: dict[str, Any] = {}
    if drop_layers:
        scores = layer_scores(spec, state, tokenizer, data)
        dropped = sorted(sorted(range(len(scores)), key=scores.__getitem__)[:drop_layers])
        kept = [i for i in range(len(scores)) if i not in dropped]
        state = student_state(state, kept, arch)
        spec = {**spec, arch.layers_key: len(kept)}
        removed["layers"] = dropped
        removed["layer_scores"] = [round(x, 4) for x in scores]
    if ffn:
        width = arch.ffn_width(spec)
        keep = width - round(width * ffn)
        scores = ffn_scores(_build(spec, state), tokenizer, data, arch)
        state = dict(state)
        for layer, score in enumerate(scores):
            idx = score.argsort(descending=True)[:keep].sort().values
            base = f"{arch.prefix}.{layer}"
            for key, axis in ((arch.ffn_in, arch.in_axis), (arch.ffn_in_bias, 0), (arch.ffn_out, arch.out_axis)):
                state[f"{base}.{key}"] = state[f"{base}.{key}"].index_select(axis, idx).clone()
        spec = {**spec, arch.ffn_key: keep}
        removed["ffn_channels"] = f"{width - keep} of {width} per layer"
    return spec, state, removed


def prune_magnitude(state: dict[str, Any], sparsity: float, arch: Arch | None = None) -> tuple[dict[str, Any], float]:
    """(state, the fraction of all parameters now zero): the ``sparsity`` fraction of the layers' matrix weights
    (``arch``: the family, by default an encoder) with the smallest magnitude, chosen globally, set to zero."""
    import torch

    from mass.compression.arch import ENCODER

    prefix = (arch or ENCODER).prefix + "."
    names = [k for k, v in state.items() if k.startswith(prefix) and k.endswith(".weight") and v.dim() == 2]
    magnitudes = torch.cat([state[k].abs().flatten() for k in names])
    threshold = magnitudes.kthvalue(max(1, int(sparsity * magnitudes.numel()))).values
    state = dict(state)
    for key in names:
        state[key] = torch.where(state[key].abs() <= threshold, torch.zeros_like(state[key]), state[key])
    zeros = sum(int((v == 0).sum()) for v in state.values() if v.is_floating_point())
    return state, zeros / sum(v.numel() for v in state.values() if v.is_floating_point())


def _structured_source(job, paths: dict[str, str], drop_layers: int, ffn: float, texts, report: dict):
    """Prune the parent in a Ray task on its node (it holds the files); (config dict, state); what was removed
    goes into ``report`` (the child's params, so its lineage records it)."""
    import ray

    from mass.models import load_hf_dir

    kind = job.parent.task  # (the task must not capture the job: it is not serializable)

    def task(parent: str, tokenizer_dir: str):
        from pathlib import Path

        model, tokenizer = load_hf_dir(Path(parent), kind, tokenizer_dir=Path(tokenizer_dir), dtype="float32")
        return prune_structured(model.config.to_dict(), model.state_dict(), tokenizer, texts, drop_layers, ffn)

    spec, state, removed = ray.get(ray.remote(task).options(num_cpus=1, max_retries=0, **job.pinned).remote(
        paths["parent"], paths["tokenizer"]))
    report.update(removed)
    log.info("pruned: %s", removed)
    return spec, state


def run_pruning(ref: str, ffn: float | None = None, drop_layers: int = 0, sparsity: float | None = None,
                recover_epochs: int = 1, name: str | None = None, gate: str | None = None, lr: float = 5e-4,
                batch_size: int = 32, max_length: int = 128, max_texts: int | None = None, workers: int = 2,
                cpus_per_worker: float = 1.0, seed: int = 0, data: str | None = None, aliases: tuple[str, ...] = (),
                threads: int | None = None, rounds: int = 3, precision: str = "auto", address: str | None = None,
                phases=None) -> list[CompressionResult]:
    """Prune the registered encoder or causal LM ``ref`` and register the child if it passes ``gate``.

    Structured (the default): ``drop_layers`` whole layers, then the ``ffn`` fraction (default 0.25 when no layer
    is dropped, else none) of every remaining layer's
    FFN channels, the least important on calibration data from the corpus's training split (texts for an
    encoder, token blocks for a causal LM); then, unless ``recover_epochs`` is 0, a recovery run (distillation from
    the unpruned parent on Ray Train, as ``run_distillation`` trains: cosine for an encoder, kl at temperature 1
    for a causal LM, in ``precision``: see ``distill.training_precision``). The child is ``<parent>-pruned``.
    With ``sparsity`` instead: global magnitude pruning of the layers' matrix weights (no recovery: a fine-tune
    would refill the zeros), the child ``<parent>-sparse``; its card shows that dense tensors keep their size and
    speed.

    Checked before any work: fractions in (0, 1), layers to drop fewer than the parent has, one kind of pruning at a
    time, the gate, the parent (an HF directory), the user's file ``data`` when given (calibration and recovery
    texts instead of the corpus's train split; see ``distill.user_texts``). ``phases``: as for ``run_compression``.
    """
    from mass.cluster import connect_ray, require
    from mass.compression.gate import Gate
    from mass.compression.job import _Job
    from mass.registry import ModelRegistry

    if sparsity is not None:
        if not 0 < sparsity < 1:
            raise ConfigError(f"sparsity must be in (0, 1), got {sparsity!r}", field="sparsity")
        if drop_layers or ffn is not None:
            raise ConfigError("give --sparsity (magnitude) or --ffn/--drop-layers (structured), not both",
                              field="sparsity")
    else:
        ffn = (0.0 if drop_layers else 0.25) if ffn is None else ffn
        if not 0 <= ffn < 1 or (ffn == 0 and not drop_layers):
            raise ConfigError(f"ffn (the fraction of FFN channels removed) must be in (0, 1), got {ffn!r}",
                              field="ffn")
    if recover_epochs < 0:
        raise ConfigError(f"recover_epochs must be 0 or more, got {recover_epochs!r}", field="recover_epochs")
    precision = training_precision(precision)
    checked = Gate.parse(gate)
    registry = ModelRegistry()
    parent = check_parent(registry, ref, tasks=("embedding", "text-generation"), what="pruning")
    teacher, tokenizer, _ = registry.load(parent.ref)
    spec, total = teacher.config.to_dict(), teacher.config.num_hidden_layers
    arch = arch_of(spec)
    if not 0 <= drop_layers < total:
        raise ConfigError(f"drop_layers must be in 0..{total - 1} (the parent has {total} layers), got "
                          f"{drop_layers!r}", field="drop_layers")
    # the training data read (and, causal LMs, tokenized) once; the calibration data a sample of it
    if arch.causal:  # token blocks
        pool = train_blocks(tokenizer, min(max_length, teacher.config.max_position_embeddings), None, seed, data)
    else:
        pool = train_texts(None, seed, data)
    texts = pool[:max_texts] if max_texts else pool
    picked = random.Random(seed + 1).sample(range(len(pool)), min(len(pool), CALIBRATION_BLOCKS if arch.causal
                                                                   else CALIBRATION_TEXTS))
    calibration = pool[picked] if arch.causal else [pool[i] for i in picked]
    connect_ray(address)
    job = _Job(registry, parent, checked, threads or os.cpu_count() or 1, rounds, phases)
    report: dict[str, Any] = {}
    if sparsity is not None:
        params: dict[str, Any] = {"sparsity": sparsity}  # and, once made, the share of all parameters now zero
        child = Child("sparse", "magnitude", params, f"magnitude {sparsity:.0%} fp32", MAGNITUDE_HELP)

        def magnitude(paths: dict[str, str], state=teacher.state_dict()):
            state, achieved = prune_magnitude(state, sparsity, arch)
            params["zeros"] = round(achieved, 4)
            log.info("magnitude pruning: %.1f%% of all parameters are now zero (dense tensors: same size)",
                     achieved * 100)
            return spec, state
        plans = [(child, magnitude, False)]
    else:
        if recover_epochs:
            require("CPU", workers * cpus_per_worker, f"workers={workers} x cpus_per_worker={cpus_per_worker}",
                    "lower --workers or add nodes", "workers")
        params = {"ffn": ffn, "drop_layers": drop_layers, "recover_epochs": recover_epochs,
                  **({"precision": precision} if recover_epochs else {}),
                  f"calibration_{'blocks' if arch.causal else 'texts'}": len(calibration), "removed": report,
                  **({"data": str(data)} if data else {})}
        child = Child("pruned", "prune", params, "pruned fp32", STRUCTURED_HELP)
        plans = [(child, lambda paths: _structured_source(job, paths, drop_layers, ffn, calibration, report),
                  recover_epochs > 0)]
    common = {"loss": "kl" if arch.causal else "cosine", "temperature": 1.0, "epochs": recover_epochs, "lr": lr,
              "batch_size": batch_size, "max_length": max_length, "workers": workers, "seed": seed, "log_every": 20,
              "precision": precision}
    shared = TeacherInputs(spec, teacher.state_dict(), tokenizer, texts) if plans[0][2] else None
    del teacher
    history: dict[str, dict[str, list[float]]] = {}
    make = students_maker(job, plans, shared, common, workers, cpus_per_worker, history)
    return job.run([child], name, aliases, make, history=history)


def add_prune_args(parser) -> None:
    """The options of ``mass compress prune`` and ``jobs/prune.py`` (one definition for both)."""
    from mass.compression.convert import add_common_args

    add_common_args(parser, embeddings=False)
    parser.add_argument("--ffn", type=float, default=None, help="structured: the fraction of FFN channels removed "
                                                                "from every layer (default 0.25, none with "
                                                                "--drop-layers)")
    parser.add_argument("--drop-layers", type=int, default=0, help="structured: whole layers removed first, the "
                                                                   "least important ones (default 0)")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="magnitude pruning instead: the fraction of the layers' matrix weights set to zero "
                             "(dense tensors: reported, no smaller or faster)")
    parser.add_argument("--recover-epochs", type=int, default=1,
                        help="structured: epochs of recovery (distillation from the unpruned parent, Ray Train); "
                             "0 skips it")
    parser.add_argument("--lr", type=float, default=5e-4, help="recovery learning rate")
    parser.add_argument("--batch-size", type=int, default=32, help="recovery texts (causal LMs: blocks) per worker "
                                                                    "per step")
    parser.add_argument("--max-length", type=int, default=128, help="recovery tokens per text (causal LMs: per "
                                                                    "block)")
    parser.add_argument("--max-texts", type=int, default=None, help="recovery texts or blocks at most (default: the "
                                                                    "corpus's train split)")
    parser.add_argument("--workers", type=int, default=2, help="recovery Ray Train workers")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each recovery worker reserves")
    parser.add_argument("--seed", type=int, default=0, help="seed for the texts' order")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="calibrate and recover on this file's texts instead of the corpus's train split: "
                             ".jsonl (a 'text' field), .parquet (a 'text' column) or .txt (blank-line-separated "
                             "documents); texts the card measures on are left out")
    add_precision_arg(parser)


def prune_from_args(args, address: str | None = None) -> list[CompressionResult]:
    """Run ``run_pruning`` with parsed ``add_prune_args`` options."""
    return run_pruning(args.ref, ffn=args.ffn, drop_layers=args.drop_layers, sparsity=args.sparsity,
                       recover_epochs=args.recover_epochs, name=args.name, gate=args.gate, lr=args.lr,
                       batch_size=args.batch_size, max_length=args.max_length, max_texts=args.max_texts,
                       workers=args.workers, cpus_per_worker=args.cpus_per_worker, seed=args.seed, data=args.data,
                       aliases=tuple(args.alias), threads=args.threads, rounds=args.rounds, precision=args.precision,
                       address=address)
