"""Distillation (``mass compress distill`` / ``jobs/distill.py``): a student — a subset of the teacher's layers, or
a smaller registered model with the same tokenizer — is trained by a Ray Train job (DDP) on the corpus's training
split to reproduce the teacher: an encoder's sentence embeddings (cosine or MSE), a causal LM's next-token
distributions (KL divergence at a temperature). Then it is measured against the teacher on its own card, gated and
registered like every compressed child (``mass.compression.job``)."""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

from mass.cluster import worker_error
from mass.compression.arch import ENCODER, GPT2, Arch, arch_of, build
from mass.compression.job import Child, CompressionResult, _cause, check_parent
from mass.errors import ConfigError, DataError, JobFailed

log = logging.getLogger(__name__)

LOSSES = {"cosine": "encoders: 1 - cosine between the student's and the teacher's normalised mean-pooled embeddings",
          "mse": "encoders: mean squared error between the (unnormalised) mean-pooled embeddings",
          "kl": "causal LMs: KL divergence from the teacher's next-token distribution to the student's, both softened "
                "by --temperature, times its square (Hinton et al.)"}
#: the intermediate losses' default weights (layer, attention) per family: on for encoders (the compression
#: benchmark's 3-layer MiniLM student), off for causal LMs (not measured on them yet)
INNER_LOSSES = {"encoder": (1.0, 1.0), "causal": (0.0, 0.0)}
STATE_FILE = "student.pt"
PRECISIONS = ("auto", "fp32", "bf16")  # training arithmetic: training_precision


def pick_layers(total: int, spec: str) -> list[int]:
    """The teacher layers a student keeps: ``"3"`` -> three evenly spaced, the last included (6 layers: 1, 3, 5);
    ``"0,2,5"`` -> those. ``ConfigError`` when the student would not be smaller than its ``total``-layer teacher."""
    text = str(spec).strip()
    try:
        picked = [int(x) for x in text.split(",")] if "," in text else None
        count = None if picked else int(text)
    except ValueError:
        raise ConfigError(f"--layers {text!r}: give a layer count (3) or the teacher layers to keep (0,2,5)",
                          field="layers") from None
    if picked is None:
        if not 1 <= count < total:
            raise ConfigError(f"a student of {count} layers is not smaller than its teacher ({total} layers); give "
                              f"1 to {total - 1}", field="layers")
        return [round((i + 1) * total / count) - 1 for i in range(count)]
    if sorted(set(picked)) != picked or not all(0 <= i < total for i in picked):
        raise ConfigError(f"--layers {text!r}: teacher layers must be distinct, increasing and in 0..{total - 1}",
                          field="layers")
    if len(picked) >= total:
        raise ConfigError(f"a student of {len(picked)} layers is not smaller than its teacher ({total} layers)",
                          field="layers")
    return picked


def student_state(teacher_state: dict[str, Any], layers: list[int], arch: Arch | None = None) -> dict[str, Any]:
    """The teacher's weights for a student of ``layers``: embeddings, pooler or LM head as they are, layer
    ``layers[j]`` as the student's layer ``j`` (``arch``: the family, by default told from the keys)."""
    arch = arch or (GPT2 if any(k.startswith(GPT2.prefix + ".") for k in teacher_state) else ENCODER)
    prefix = arch.prefix + "."
    out = {}
    for key, value in teacher_state.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if int(index) not in layers:
                continue
            key = f"{prefix}{layers.index(int(index))}.{rest}"
        out[key] = value
    return out


def user_texts(data: str, held_out: list[str]) -> list[str]:
    """The texts of the user's file ``data`` (``.jsonl`` with a ``text`` field, ``.parquet`` with a ``text`` column,
    or ``.txt`` with blank-line-separated documents: ``mass.data.loaders.load_texts``) less any the card measures on
    (``held_out``: a student must not be graded on what it was trained on); ``DataError`` naming the file when it
    cannot be read or nothing is left."""
    from mass.data.loaders import load_texts

    texts = load_texts(data)
    measured = set(held_out)
    kept = [t for t in texts if t not in measured and t.strip() not in measured]
    if not kept:
        raise DataError(f"{data}: every one of its {len(texts)} texts is one the card measures the student on; "
                        "train on other texts", field="data", path=str(data))
    if len(kept) < len(texts):
        log.warning("%s: %d of its %d texts are held-out texts the card measures on; they are left out of training",
                    data, len(texts) - len(kept), len(texts))
    return kept


def train_texts(limit: int | None = None, seed: int = 0, data: str | None = None) -> list[str]:
    """An encoder student's training texts, shuffled, at most ``limit``: the corpus's train split (never the
    held-out texts the card measures on) — every document and its first line (short texts, as embedding requests
    mostly are) —, or the texts of the user's file ``data`` (``user_texts``)."""
    import random

    if data:
        from mass.compression.card import eval_texts

        texts = user_texts(data, [t for group in eval_texts() for t in group])
    else:
        from mass.data.corpus import collect_documents

        docs = [d["text"] for d in collect_documents(progress=False) if d["split"] == "train"]
        texts = docs + [t.strip().splitlines()[0] for t in docs]
    random.Random(seed).shuffle(texts)
    return texts[:limit] if limit else texts


def train_blocks(tokenizer, block: int, limit: int | None = None, seed: int = 0, data: str | None = None):
    """A causal LM's training data: the corpus's train split documents — or the texts of the user's file ``data``
    (``user_texts``) — shuffled, joined by EOS and cut into blocks of ``block`` tokens (int32 array [n, block]), at
    most ``limit`` blocks."""
    import random

    from mass.training.prep import pack

    if data:
        from mass.compression.card import causal_texts

        docs = user_texts(data, causal_texts())
    else:
        from mass.data.corpus import collect_documents

        docs = [d["text"] for d in collect_documents(progress=False) if d["split"] == "train"]
    random.Random(seed).shuffle(docs)
    blocks = pack(docs, tokenizer, block)
    return blocks[:limit] if limit else blocks


def length_grouped(lengths, batch: int, rng, pool: int = 50) -> list[list[int]]:
    """One epoch's batches of indices into ``lengths``: a random permutation cut into pools of ``pool`` batches, each
    pool sorted by length and cut into batches (similar lengths pad little), the batches shuffled: ``len(lengths) //
    batch`` of them (pools are whole batches, so only the last pool's remainder is dropped) — every data-parallel
    rank with as many texts takes as many steps. HF's ``group_by_length`` idea."""
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), pool * batch):
        chunk = sorted(order[start:start + pool * batch], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch] for i in range(0, len(chunk) - batch + 1, batch)]
    rng.shuffle(batches)
    return batches


def _build(spec: dict[str, Any]):
    return build(spec)


def _pooled(hidden, attention_mask):
    hidden = hidden.float()  # (bf16 under autocast: pooled and compared in fp32)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def layer_loss(student_hidden, teacher_hidden, attention_mask, pairs):
    """The intermediate-layer loss (TinyBERT's hidden-state transfer): for each ``(j, t)`` in ``pairs``, the squared
    difference between the output of the student's layer ``j`` and of the teacher's layer ``t`` (``hidden_states``
    tuples: index 0 is the embeddings), per hidden dimension, averaged over the real (unpadded) tokens; the mean
    over the pairs."""
    mask = attention_mask.unsqueeze(-1).float()
    tokens = mask.sum().clamp(min=1.0)
    total = sum((((student_hidden[j + 1].float() - teacher_hidden[t + 1].float()) ** 2) * mask).sum() / tokens
                / student_hidden[j + 1].shape[-1] for j, t in pairs)
    return total / len(pairs)


def attention_loss(student_attentions, teacher_attentions, attention_mask, pairs):
    """The attention-transfer loss (MiniLM's self-attention distribution transfer): for each ``(j, t)`` in ``pairs``,
    the KL divergence from the teacher's layer-``t`` attention distributions to the student's layer-``j`` ones, per
    head and real query token; the mean over heads, tokens and pairs. Both need the same number of heads."""
    mask = attention_mask[:, None, :].float()  # [batch, 1, query]
    total = 0
    for j, t in pairs:
        mine, theirs = student_attentions[j].float(), teacher_attentions[t].float()  # [batch, heads, query, key]
        kl = (theirs * (theirs.clamp_min(1e-9).log() - mine.clamp_min(1e-9).log())).sum(-1)
        total = total + (kl * mask).sum() / (mask.sum().clamp(min=1.0) * mine.shape[1])
    return total / len(pairs)


def training_precision(precision: str) -> str:
    """The arithmetic a student (or a pruned child's recovery) trains in: ``fp32``, or ``bf16`` (autocast: matrix
    products in bfloat16, weights, optimizer and losses in fp32). ``auto``: bf16 where this node computes it natively
    (a CPU with AVX-512 BF16 or AMX: ``mass.hardware.native_bf16``), else fp32. On the 3-layer MiniLM student bf16
    took 0.57x the time of an fp32 step (side run recorded on issue 11). ``ConfigError`` for another value."""
    from mass.hardware import native_bf16

    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: give one of {', '.join(PRECISIONS)}", field="precision")
    native = native_bf16("cpu")
    if precision == "bf16" and not native:
        log.warning("this CPU has no native bfloat16 (AVX-512 BF16 or AMX): bf16 training is emulated and slower "
                    "than fp32; --precision auto picks fp32 here")
    return precision if precision != "auto" else "bf16" if native else "fp32"


def training_spec(spec: dict[str, Any], eager: bool = False) -> dict[str, Any]:
    """The config a student is trained in: its dropout off (it is fit to a deterministic teacher's outputs; side
    runs on the 3-layer MiniLM student, recorded on issue 11, reached a higher cosine without it) and, ``eager``,
    attention computed in plain PyTorch so its distributions can be returned (the attention loss reads them)."""
    arch = arch_of(spec)
    return {**spec, **{k: 0.0 for k in arch.dropouts if k in spec},
            **({"attn_implementation": "eager"} if eager else {})}


def distill_loop_per_worker(cfg: dict[str, Any]) -> None:
    """One Ray Train worker: the student (dropout off) trained data-parallel on this worker's share of the data to
    reproduce the teacher — an encoder's embeddings, or a causal LM's softened next-token distributions —, plus,
    when ``layer_map`` names the teacher layer each student layer came from, ``layer_loss`` x the hidden-state loss
    and ``attention_loss`` x the attention-distribution loss of those pairs. The teacher runs beside the student on
    each batch, except for an encoder with no intermediate loss: its embeddings are computed once, before training.
    Rank 0 reports the loss per epoch and, after the last, the student."""
    import tempfile

    import numpy as np
    import ray
    import ray.train
    import torch
    import torch.nn.functional as F
    from ray.train import Checkpoint
    from ray.train.torch import get_device, prepare_model

    from mass.training.progress import StepProgress, say, step_line

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(cfg["threads"])
    device = get_device()
    tokenizer = ray.get(cfg["tokenizer"])
    data = ray.get(cfg["texts"])  # encoders: texts; causal LMs: token blocks [n, block]
    mine = data[: len(data) // world * world][rank::world]  # equal shares: equal steps on every rank
    batch, max_length, causal = cfg["batch_size"], cfg["max_length"], cfg["loss"] == "kl"
    # intermediate losses: (student layer, teacher layer) pairs, when the student is made of the teacher's layers
    pairs = list(enumerate(cfg.get("layer_map") or ()))
    layer_w, attention_w = (cfg.get("layer_loss", 0.0), cfg.get("attention_loss", 0.0)) if pairs else (0.0, 0.0)
    inner = {"output_hidden_states": bool(layer_w), "output_attentions": bool(attention_w)}

    def tokens(chunk):
        return {k: v.to(device) for k, v in tokenizer(chunk, padding=True, truncation=True, max_length=max_length,
                                                       return_tensors="pt").items()}

    teacher = _build({**cfg["teacher_spec"], **({"attn_implementation": "eager"} if attention_w else {})})
    teacher.load_state_dict(ray.get(cfg["teacher_state"]))
    teacher.to(device).eval()
    lengths = [len(text) for text in mine] if not causal else [1] * len(mine)  # characters: a cheap proxy for tokens
    per_batch = causal or layer_w or attention_w  # the teacher runs beside the student on each batch
    if not per_batch:  # teacher embeddings once, in length order (little padding), stored in the texts' order
        by_length = torch.as_tensor(np.argsort(lengths, kind="stable"))
        with torch.inference_mode():
            in_order = torch.cat([_pooled(teacher(**b).last_hidden_state, b["attention_mask"])
                                  for b in (tokens([mine[j] for j in by_length[i:i + 64].tolist()])
                                            for i in range(0, len(mine), 64))])
        targets = torch.empty_like(in_order)
        targets[by_length] = in_order
        del teacher, in_order
        if rank == 0:
            say(f"teacher embeddings of {len(mine) * world} training texts ready")

    def objective(model, idx):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.get("precision") == "bf16"):
            return _objective(model, idx)

    def _objective(model, idx):
        if causal:
            ids = torch.as_tensor(mine[idx], dtype=torch.long, device=device)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # packed blocks: no padding
        else:
            batch = tokens([mine[j] for j in idx])
        out = model(**batch, **inner)
        if per_batch:
            with torch.no_grad():
                ref = teacher(**batch, **inner)
        if causal:  # KL(teacher || student) per token, both softened by the temperature, times its square
            soft = F.log_softmax(ref.logits.float() / cfg["temperature"], dim=-1).flatten(0, 1)
            mine_soft = F.log_softmax(out.logits.float() / cfg["temperature"], dim=-1).flatten(0, 1)
            loss = F.kl_div(mine_soft, soft, log_target=True, reduction="batchmean") * cfg["temperature"] ** 2
        else:
            pooled = _pooled(out.last_hidden_state, batch["attention_mask"])
            target = _pooled(ref.last_hidden_state, batch["attention_mask"]) if per_batch else targets[idx]
            loss = ((1 - F.cosine_similarity(pooled, target, dim=-1)).mean() if cfg["loss"] == "cosine"
                    else ((pooled - target) ** 2).sum(-1).mean())
        if layer_w:
            loss = loss + layer_w * layer_loss(out.hidden_states, ref.hidden_states, batch["attention_mask"], pairs)
        if attention_w:
            loss = loss + attention_w * attention_loss(out.attentions, ref.attentions, batch["attention_mask"], pairs)
        return loss

    student = _build(training_spec(cfg["student_spec"], eager=bool(attention_w)))
    student.load_state_dict(ray.get(cfg["student_state"]))
    for key, param in student.named_parameters():  # the pooler is not part of a mean-pooled embedding
        param.requires_grad_(not key.startswith("pooler."))
    model = prepare_model(student)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"], weight_decay=0.01)
    steps_per_epoch = max(1, len(mine) // batch)
    total = steps_per_epoch * cfg["epochs"]
    warmup = max(1, total // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up over a tenth of the steps, linear decay
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, 1 - (s - warmup) / max(1, total - warmup)))
    losses: list[float] = []
    model.train()
    for epoch in range(cfg["epochs"]):
        batches = length_grouped(lengths, batch, np.random.default_rng(cfg["seed"] + epoch))
        started, running = time.perf_counter(), 0.0
        for i, idx in enumerate(batches):
            loss = objective(model, np.asarray(idx))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            running += loss.item()
            if rank == 0 and ((i + 1) % cfg["log_every"] == 0 or i == steps_per_epoch - 1):
                say(step_line(StepProgress(epoch + 1, cfg["epochs"], i + 1, steps_per_epoch, loss.item()),
                              scheduler.get_last_lr()[0], (i + 1) / (time.perf_counter() - started)))
        losses.append(running / steps_per_epoch)
        last = epoch == cfg["epochs"] - 1
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0 and last:
                raw = model.module if hasattr(model, "module") else model
                torch.save(raw.state_dict(), os.path.join(tmp, STATE_FILE))
                checkpoint = Checkpoint.from_directory(tmp)
            ray.train.report({"epoch": epoch + 1, "loss": losses[-1], "losses": list(losses)}, checkpoint=checkpoint)


def _save_student(work: str, key: str, spec: dict[str, Any], state: dict[str, Any], tokenizer_dir: str) -> str:
    """Write the trained student as an HF directory (model and tokenizer) in the job's work directory on the
    parent's node — a Ray task; its path."""
    from pathlib import Path

    from transformers import AutoTokenizer

    model = _build(spec)
    model.load_state_dict(state)
    out = Path(work) / key
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True).save_pretrained(out)
    return str(out)


def _student_model(registry, ref: str, teacher, teacher_tokenizer, task: str = "embedding"):
    """(config dict, state) of a registered model to start the student from, when it can learn from the teacher:
    a model of the teacher's ``task``, smaller, with the same tokenizer (and, encoders, the same embedding width);
    ``ConfigError`` otherwise."""
    info = registry.resolve(ref)
    if info.task != task or info.format != "transformers":
        raise ConfigError(f"student {info.ref} is a {info.task} model stored as {info.format}; a student of this "
                          f"teacher is a {task} model stored as an HF directory", field="student")
    model, tokenizer, _ = registry.load(info.ref)
    if tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ConfigError(f"student {info.ref}'s tokenizer ({len(tokenizer)} tokens) differs from the teacher's "
                          f"({len(teacher_tokenizer)} tokens); a student must read the same token ids — start it "
                          "from the teacher's layers (--layers) instead", field="student")
    sizes = [sum(p.numel() for p in m.parameters()) for m in (model, teacher)]
    if sizes[0] >= sizes[1]:
        raise ConfigError(f"student {info.ref} ({sizes[0]:,} parameters) is not smaller than its teacher "
                          f"({sizes[1]:,})", field="student")
    if task == "embedding" and model.config.hidden_size != teacher.config.hidden_size:
        raise ConfigError(f"student {info.ref} embeds in {model.config.hidden_size} dimensions, its teacher in "
                          f"{teacher.config.hidden_size}; they must match to replace it", field="student")
    return info, model.config.to_dict(), model.state_dict()


def run_distillation(ref: str, layers: list[str] | tuple[str, ...] | None = None, student: str | None = None,
                     name: str | None = None, gate: str | None = None, loss: str | None = None,
                     temperature: float = 2.0, layer_loss: float | None = None,
                     attention_loss: float | None = None, epochs: int = 2,
                     lr: float = 5e-4, batch_size: int = 32, max_length: int = 128, max_texts: int | None = None,
                     workers: int = 2, cpus_per_worker: float = 1.0, seed: int = 0, log_every: int = 20,
                     data: str | None = None, aliases: tuple[str, ...] = (), threads: int | None = None,
                     rounds: int = 3, precision: str = "auto", address: str | None = None,
                     phases=None) -> list[CompressionResult]:
    """Distil the registered encoder or causal LM ``ref`` into one student per ``layers`` entry (a count or
    teacher layer indices, see ``pick_layers``; default one of 3 layers) — or into the registered model
    ``student`` — and register each that passes ``gate`` as a new version of ``name`` (default
    ``<parent>-distill-<N>l``), lineage ``method: distill``. ``loss`` (``LOSSES``) defaults to cosine for an
    encoder and kl (at ``temperature``) for a causal LM. A student of the teacher's layers also learns each kept
    layer's output (``layer_loss``, its weight) and attention distributions (``attention_loss``) from the teacher
    layer it came from; both default by family (``INNER_LOSSES``: on for encoders, off for causal LMs) and do not
    apply to a ``student`` model (its layers are not the teacher's). Students train in ``precision``
    (``training_precision``: by default bf16 where the CPU computes it natively); the lineage records which.

    Checked before any work: the options, the gate, the parent (an HF directory), that every student is smaller
    than the teacher and (``student``) reads the same tokenizer, and that the cluster can hold ``workers`` x
    ``cpus_per_worker``. Students are trained one after another, each by a Ray Train job of ``workers`` DDP workers
    for ``epochs`` over the corpus's training split or the user's file ``data`` (encoders: texts, ``max_texts`` at
    most; causal LMs: blocks of ``max_length`` tokens, ``max_texts`` blocks at most); then each is measured against
    the teacher on its card (as ``run_compression`` does). A student whose training fails is reported with its
    error; when none could be trained this raises ``JobFailed``. ``phases``: as for
    ``run_compression``.
    """
    from mass.cluster import connect_ray, require
    from mass.compression.gate import Gate
    from mass.compression.job import _Job
    from mass.registry import ModelRegistry

    if loss is not None and loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; losses: {', '.join(LOSSES)}", field="loss")
    if not temperature > 0:
        raise ConfigError(f"temperature must be above 0, got {temperature!r}", field="temperature")
    precision = training_precision(precision)
    for field, value in (("layer_loss", layer_loss), ("attention_loss", attention_loss)):
        if value is not None and not 0 <= value:
            raise ConfigError(f"{field} (a weight) must be 0 or more, got {value!r}", field=field)
        if value and student:
            raise ConfigError(f"{field} needs a student made of the teacher's layers (--layers): the layers of "
                              f"--student {student} are not the teacher's", field=field)
    for field, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("workers", workers, 1),
                              ("max_length", max_length, 8)):
        if int(value) < low:
            raise ConfigError(f"{field} must be at least {low}, got {value!r}", field=field)
    if not 0 < lr < 1:
        raise ConfigError(f"lr must be in (0, 1), got {lr!r}", field="lr")
    if student and layers:
        raise ConfigError("give --student or --layers, not both", field="student")
    specs = [] if student else list(layers or ("3",))
    if aliases and len(specs) > 1:
        raise ConfigError("--alias needs a single student (each registers a model of its own)", field="alias")
    checked = Gate.parse(gate)
    registry = ModelRegistry()
    parent = check_parent(registry, ref, tasks=("embedding", "text-generation"), what="distillation")
    causal = parent.task == "text-generation"
    loss = loss or ("kl" if causal else "cosine")
    if (loss == "kl") != causal:
        raise ConfigError(f"loss {loss!r} is for {'encoders' if causal else 'causal LMs'}; {parent.ref} is "
                          f"{'a causal LM' if causal else 'an encoder'}: use {'kl' if causal else 'cosine or mse'}",
                          field="loss")
    teacher, tokenizer, _ = registry.load(parent.ref)
    teacher_spec = teacher.config.to_dict()
    arch, total = arch_of(teacher_spec), teacher.config.num_hidden_layers
    weights = INNER_LOSSES["causal" if causal else "encoder"]
    inner = {} if student else {"layer_loss": weights[0] if layer_loss is None else float(layer_loss),
                                "attention_loss": weights[1] if attention_loss is None else float(attention_loss)}
    common = {"loss": loss, "epochs": epochs, "lr": lr, "batch_size": batch_size, "max_length": max_length,
              "workers": workers, "seed": seed, "precision": precision,
              **({"temperature": temperature} if causal else {}), **inner,
              **({"data": str(data)} if data else {})}
    students: list[tuple[Child, dict[str, Any], dict[str, Any]]] = []
    if student:
        info, spec, state = _student_model(registry, student, teacher, tokenizer, parent.task)
        depth = spec[arch_of(spec).layers_key]
        key = f"distill-{depth}l"
        students.append((Child(key, "distill", {**common, "student": info.ref}, f"student {depth}L fp32"), spec,
                         state))
    else:
        teacher_state = teacher.state_dict()
        for text in specs:
            picked = pick_layers(total, text)
            key = f"distill-{len(picked)}l"
            if any(c.key == key for c, _, _ in students):
                raise ConfigError(f"two students of {len(picked)} layers; each needs its own layer count",
                                  field="layers")
            spec = {**teacher_spec, arch.layers_key: len(picked)}
            students.append((Child(key, "distill", {**common, "layers": picked}, f"student {len(picked)}L fp32"),
                             spec, student_state(teacher_state, picked, arch)))
    if causal:
        texts = train_blocks(tokenizer, min(max_length, teacher.config.max_position_embeddings), max_texts, seed,
                             data)
    else:
        texts = train_texts(max_texts, seed, data)
    if len(texts) < workers * batch_size:
        what = f"blocks of {texts.shape[1]} tokens" if causal else "texts"
        raise ConfigError(f"{len(texts)} training {what} cannot fill one batch of {batch_size} on each of {workers} "
                          "workers; lower batch_size or raise max_texts", field="max_texts")
    connect_ray(address)
    require("CPU", workers * cpus_per_worker, f"workers={workers} x cpus_per_worker={cpus_per_worker}",
            "lower --workers or add nodes", "workers")
    job = _Job(registry, parent, checked, threads or os.cpu_count() or 1, rounds, phases)
    history: dict[str, dict[str, list[float]]] = {}
    shared = TeacherInputs(teacher_spec, teacher.state_dict(), tokenizer, texts)
    del teacher
    plans = [(child, lambda paths, spec=spec, state=state: (spec, state), True) for child, spec, state in students]
    make = students_maker(job, plans, shared, {**common, "log_every": log_every}, workers, cpus_per_worker, history)
    return job.run([c for c, _, _ in students], name, aliases, make, history=history)


def students_maker(job, plans, shared: "TeacherInputs", common: dict[str, Any], workers: int,
                   cpus_per_worker: float, history: dict[str, dict[str, list[float]]]):
    """The ``make`` step of a job whose children are float encoders (students, pruned copies): for each
    ``(child, source, train)`` in ``plans``, ``source(paths)`` gives its (config dict, state), ``train`` says whether
    it then learns from the teacher (a Ray Train run, its loss per epoch into ``history``), and the result is
    written as an HF directory on the parent's node. One child failing does not stop the next."""
    def make(paths: dict[str, str]) -> dict[str, str | Exception]:
        import ray

        made: dict[str, str | Exception] = {}
        for child, source, train in plans:
            try:
                spec, state = source(paths)
                if train:
                    state, losses = _fit(child, spec, state, shared, common, workers, cpus_per_worker)
                    history[child.key] = {"distill_loss": losses}
                made[child.key] = ray.get(ray.remote(_save_student).options(num_cpus=1, max_retries=0, **job.pinned)
                                          .remote(paths["work"], child.key, spec, state, paths["tokenizer"]))
            except Exception as exc:  # the next child is still made
                log.error("%s of %s failed: %s", child.key, job.parent.ref, _cause(exc))
                made[child.key] = exc
        return made
    return make


class TeacherInputs:
    """What every student's training reads, put into the object store once: the teacher and the texts."""

    def __init__(self, teacher_spec, teacher_state, tokenizer, texts) -> None:
        import ray

        self.teacher_spec = teacher_spec
        self.teacher_state, self.tokenizer, self.texts = ray.put(teacher_state), ray.put(tokenizer), ray.put(texts)


def _fit(child: Child, spec: dict[str, Any], state: dict[str, Any], shared: TeacherInputs, common: dict[str, Any],
         workers: int, cpus_per_worker: float) -> tuple[dict[str, Any], list[float]]:
    """Train one student with Ray Train; (its trained state, the loss per epoch). ``JobFailed`` when the run fails."""
    import ray
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mass.settings import get_settings

    log.info("distilling %s: %s", child.key, child.params)
    config = {**common, "teacher_spec": shared.teacher_spec, "teacher_state": shared.teacher_state,
              "tokenizer": shared.tokenizer, "texts": shared.texts, "student_spec": spec,
              "student_state": ray.put(state), "threads": max(1, math.floor(cpus_per_worker)),
              "layer_map": child.params.get("layers")}  # a student of the teacher's layers: where each came from
    trainer = TorchTrainer(
        train_loop_per_worker=distill_loop_per_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=f"{child.key}-{int(time.time())}", storage_path=get_settings().storage_path))
    try:
        result = trainer.fit()
    except Exception as exc:
        raise JobFailed(f"distillation of {child.key} failed: {worker_error(exc)}") from exc
    if getattr(result, "error", None) or result.checkpoint is None:
        raise JobFailed(f"distillation of {child.key} failed: {result.error or 'no checkpoint'}")
    with result.checkpoint.as_directory() as directory:
        trained = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    return trained, [float(x) for x in result.metrics.get("losses", [])]


def add_distill_args(parser) -> None:
    """The options of ``mass compress distill`` and ``jobs/distill.py`` (one definition for both)."""
    from mass.compression.convert import add_common_args

    add_common_args(parser, embeddings=False)
    parser.add_argument("--layers", action="append", default=None, metavar="N|I,J,..",
                        help="a student of N of the teacher's layers (evenly spaced, the last kept) or of those "
                             "layers; repeat for several students, trained one after another (default: 3)")
    parser.add_argument("--student", default=None, metavar="REF",
                        help="start from this registered model instead (smaller, same task and tokenizer; encoders: "
                             "same width)")
    parser.add_argument("--loss", default=None, choices=list(LOSSES),
                        help="default: cosine for an encoder, kl for a causal LM; "
                             + "; ".join(f"{k}: {v}" for k, v in LOSSES.items()))
    parser.add_argument("--temperature", type=float, default=2.0,
                        help="kl: the temperature both distributions are softened by (default 2)")
    parser.add_argument("--layer-loss", type=float, default=None, metavar="WEIGHT",
                        help="a student of the teacher's layers also matches each kept layer's output to the teacher "
                             "layer it came from (mean squared difference), at this weight (default: 1 for "
                             "encoders, 0 for causal LMs)")
    parser.add_argument("--attention-loss", type=float, default=None, metavar="WEIGHT",
                        help="... and each kept layer's attention distributions (KL divergence), at this weight "
                             "(default: 1 for encoders, 0 for causal LMs)")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the training texts")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW, warm-up, linear decay)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per worker per step")
    parser.add_argument("--max-length", type=int, default=128,
                        help="tokens per training text (longer are cut); causal LMs: tokens per training block")
    parser.add_argument("--max-texts", type=int, default=None,
                        help="train on at most this many texts, or causal LMs' blocks (default: all of the corpus's "
                             "train split)")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="train on this file's texts instead of the corpus's train split: .jsonl (a 'text' "
                             "field), .parquet (a 'text' column) or .txt (blank-line-separated documents); texts "
                             "the card measures on are left out")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (DDP processes)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each worker reserves")
    parser.add_argument("--seed", type=int, default=0, help="seed for the student's training order")
    add_precision_arg(parser)


def add_precision_arg(parser) -> None:
    """``--precision`` of distillation and of pruning's recovery."""
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="training arithmetic: bf16 (autocast, fp32 weights) or fp32; auto: bf16 where the CPU "
                             "has native bfloat16 (AVX-512 BF16 or AMX), else fp32")


def distill_from_args(args, address: str | None = None) -> list[CompressionResult]:
    """Run ``run_distillation`` with parsed ``add_distill_args`` options."""
    return run_distillation(args.ref, layers=args.layers, student=args.student, name=args.name, gate=args.gate,
                            loss=args.loss, temperature=args.temperature, layer_loss=args.layer_loss,
                            attention_loss=args.attention_loss, epochs=args.epochs, lr=args.lr,
                            batch_size=args.batch_size, max_length=args.max_length, max_texts=args.max_texts,
                            workers=args.workers,
                            cpus_per_worker=args.cpus_per_worker, seed=args.seed, data=args.data,
                            aliases=tuple(args.alias), precision=args.precision,
                            threads=args.threads, rounds=args.rounds, address=address)
