"""The card: a child and its parent measured on the same machine in the same run — bytes on disk, resident
memory of the loaded model, latency at batch 1, throughput at batch 32, and quality against the parent — with
the parent in bf16 as a reference row. Each model is measured by ``measure_encoder`` (encoders: texts/s, cosine)
or ``measure_causal`` (causal LMs: decoded tokens/s, perplexity) in a Ray task of its own, one after another
(never two at once), so each starts from a fresh process's memory."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BATCH = 32
LATENCY_SAMPLES = 32
PROMPT_TOKENS, NEW_TOKENS = 16, 64  # causal LMs: each decode measurement's prompt and generated lengths
DECODES_PER_ROUND = 2  # causal LMs: batches of 32 decoded per throughput round (a round of about a second here)
PPL_BLOCK, PPL_BLOCKS = 128, 64  # causal LMs: perplexity over at most this many blocks of the test split


@dataclass(frozen=True)
class Subject:
    """A model to measure: an HF directory run by torch in ``dtype``, an ONNX export run by ONNX Runtime, a PyTorch
    dynamic-int8 copy, or a bitsandbytes HF directory (``dtype`` names its kind: int8, nf4)."""

    label: str
    path: str
    tokenizer: str
    runtime: str = "torch"  # torch | onnx | torch-int8 | bnb
    dtype: str = "float32"


@dataclass
class Row:
    """One model's figures on the card (quality and top-10 are against the parent in fp32)."""

    label: str
    runtime: str
    dtype: str
    disk_bytes: int
    weight_bytes: int  # the weights as loaded (torch: parameters and buffers, int8 ones at a byte; ONNX Runtime: the
    # graph's file)
    rss_bytes: int  # the process's resident memory grown by loading and a warm-up pass (runtime buffers included)
    latency_ms: float
    throughput: float  # texts/s at batch 32, median over rounds
    throughput_range: tuple[float, float]
    quality: float | None = None  # encoders: mean cosine to the parent; causal LMs: parent perplexity / this one's
    top10: float | None = None
    perplexity: float | None = None  # causal LMs: on the corpus's test split
    # causal LMs: tokens/s of the perplexity pass (a forward over the test blocks, batches of 8: prompt processing,
    # where the model's arithmetic, not per-step overhead, sets the pace), median and range over rounds
    prefill: float | None = None
    prefill_range: tuple[float, float] | None = None
    unit: str = "texts"  # what ``throughput`` counts: texts (encoders) or generated tokens (causal LMs)


def eval_texts() -> tuple[list[str], list[str]]:
    """Held-out texts of the docstring corpus (never trained on): queries are the first lines of the test split's
    documents (short texts, as embedding requests mostly are), documents are the validation and test texts."""
    from mass.data.corpus import collect_documents

    docs = collect_documents(progress=False)
    queries = [d["text"].strip().splitlines()[0] for d in docs if d["split"] == "test"]
    documents = [d["text"] for d in docs if d["split"] in ("validation", "test")]
    return queries, documents


def causal_texts() -> list[str]:
    """The docstring corpus's test split (never trained on): what a causal LM's perplexity and prompts come from."""
    from mass.data.corpus import collect_documents

    return [d["text"] for d in collect_documents(progress=False) if d["split"] == "test"]


def measure_encoder(subject: Subject, queries: list[str], documents: list[str], threads: int, rounds: int = 3):
    """(``Row`` without quality, (query vectors, document vectors)) of ``subject``: resident memory grown by loading
    it and a warm-up pass (run it in a fresh process: Ray's ``max_calls=1``), the median latency of one-text
    requests, and texts/s over the queries in batches of 32 (median and range over ``rounds``)."""
    import numpy as np
    import psutil
    import torch

    from mass.models import (TORCH_INT8_STATE, load_bnb_dir, load_hf_dir, load_onnx_dir, load_torch_int8_dir,
                             onnx_bytes, weights_bytes)
    from mass.serving.engines.embedding import EmbeddingEngine

    torch.set_num_threads(threads)
    process = psutil.Process()
    before = _settled_rss(process)
    path = Path(subject.path)
    if subject.runtime == "onnx":
        model, tokenizer = load_onnx_dir(path, Path(subject.tokenizer), subject.label)
        disk = weights = onnx_bytes(path)
    elif subject.runtime == "torch-int8":
        model, tokenizer = load_torch_int8_dir(path, Path(subject.tokenizer), subject.label)
        disk, weights = (path / TORCH_INT8_STATE).stat().st_size, weights_bytes(model)
    else:  # an HF directory: float in ``dtype``, or bitsandbytes (its config says how; ``dtype`` names the kind)
        if subject.runtime == "bnb":
            model, tokenizer = load_bnb_dir(path, Path(subject.tokenizer), subject.label)
        else:
            model, tokenizer = load_hf_dir(path, "embedding", tokenizer_dir=Path(subject.tokenizer),
                                           dtype=subject.dtype)
        disk = sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))
        weights = weights_bytes(model)
    engine = EmbeddingEngine(model, tokenizer, normalize=True, batch_size=BATCH)
    for i in range(0, len(queries), BATCH):  # warm-up: every batch shape once (runtimes plan per shape)
        engine.embed(queries[i:i + BATCH])
    rss = _settled_rss(process) - before
    latencies = []
    for text in queries[:LATENCY_SAMPLES]:
        start = time.perf_counter()
        engine.embed([text])
        latencies.append((time.perf_counter() - start) * 1000)
    speeds = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(0, len(queries), BATCH):
            engine.embed(queries[i:i + BATCH])
        speeds.append(len(queries) / (time.perf_counter() - start))
    vectors = [np.asarray(engine.embed(texts)[0], dtype=np.float32) for texts in (queries, documents)]
    row = Row(subject.label, subject.runtime, subject.dtype, disk, weights, rss, round(statistics.median(latencies), 3),
              round(statistics.median(speeds), 1), (round(min(speeds), 1), round(max(speeds), 1)))
    return row, (vectors[0], vectors[1])


def measure_causal(subject: Subject, texts: list[str], threads: int, rounds: int = 3):
    """(``Row``, None) of the causal LM ``subject``: resident memory grown by loading it and a warm-up pass (run it in
    a fresh process: Ray's ``max_calls=1``), perplexity on ``texts`` (packed into blocks of ``PPL_BLOCK`` tokens
    joined by EOS), the median time per generated token of one request, and generated tokens/s of 32 requests
    decoded together (greedy, ``NEW_TOKENS`` each, EOS ignored; ``DECODES_PER_ROUND`` such batches a round; median
    and range over ``rounds``), and tokens/s of the perplexity pass itself (prefill; median and range over
    ``rounds``)."""
    import math

    import psutil
    import torch

    from mass.models import load_bnb_dir, load_hf_dir, weights_bytes
    from mass.training.prep import pack

    torch.set_num_threads(threads)
    process = psutil.Process()
    before = _settled_rss(process)
    path = Path(subject.path)
    if subject.runtime == "bnb":
        model, tokenizer = load_bnb_dir(path, Path(subject.tokenizer), subject.label, task="text-generation")
    elif subject.runtime == "torch":
        model, tokenizer = load_hf_dir(path, "text-generation", tokenizer_dir=Path(subject.tokenizer),
                                       dtype=subject.dtype)
    else:
        raise ValueError(f"{subject.label}: causal LMs are measured in torch or bitsandbytes, not {subject.runtime}")
    disk = sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))
    width = min(PPL_BLOCK, getattr(model.config, "n_positions", None) or model.config.max_position_embeddings)
    blocks = torch.as_tensor(pack(texts, tokenizer, width)[:PPL_BLOCKS], dtype=torch.long)
    prompts = [ids for ids in tokenizer(texts, add_special_tokens=False, truncation=True, max_length=PROMPT_TOKENS,
                                        verbose=False)["input_ids"]
               if len(ids) >= PROMPT_TOKENS][:BATCH]
    if len(blocks) < 1 or len(prompts) < BATCH:
        raise ValueError(f"the test split is too small to measure {subject.label}: {len(blocks)} blocks of {width} "
                         f"tokens, {len(prompts)} prompts of {PROMPT_TOKENS} (need {BATCH})")
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    def decode(batch: list[list[int]], new: int = NEW_TOKENS) -> None:
        ids = torch.tensor(batch, dtype=torch.long)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=pad)

    with torch.inference_mode():
        decode(prompts[:1])  # warm-up: both batch shapes once
        decode(prompts)
        rss = _settled_rss(process) - before
        perplexity = math.exp(mean_loss(model, blocks))
        latencies = []
        for prompt in prompts[:8]:
            start = time.perf_counter()
            decode([prompt], 16)
            latencies.append((time.perf_counter() - start) * 1000 / 16)
        speeds = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(DECODES_PER_ROUND):
                decode(prompts)
            speeds.append(DECODES_PER_ROUND * len(prompts) * NEW_TOKENS / (time.perf_counter() - start))
        prefills = []
        for _ in range(rounds):
            start = time.perf_counter()
            mean_loss(model, blocks)
            prefills.append(blocks.numel() / (time.perf_counter() - start))
    row = Row(subject.label, subject.runtime, subject.dtype, disk, weights_bytes(model), rss,
              round(statistics.median(latencies), 3), round(statistics.median(speeds), 1),
              (round(min(speeds), 1), round(max(speeds), 1)), perplexity=round(perplexity, 4), unit="tokens",
              prefill=round(statistics.median(prefills), 1), prefill_range=(round(min(prefills), 1),
                                                                           round(max(prefills), 1)))
    return row, None


def mean_loss(model, blocks) -> float:
    """A causal LM's mean next-token loss over token ``blocks`` (in batches of 8; each block weighs the same)."""
    import torch

    ids = torch.as_tensor(blocks, dtype=torch.long)
    with torch.inference_mode():
        return sum(model(input_ids=ids[i:i + 8], labels=ids[i:i + 8]).loss.item() * len(ids[i:i + 8])
                   for i in range(0, len(ids), 8)) / len(ids)


def _settled_rss(process) -> int:
    """Resident bytes once freed heap pages went back to the OS (loading and converting leave many behind)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the figure then includes what the allocator keeps
        pass
    return process.memory_info().rss


def agreement(parent: tuple[Any, Any], child: tuple[Any, Any]) -> tuple[float, float]:
    """(mean cosine of the child's vectors to the parent's over queries and documents, mean overlap of each
    query's top-10 documents by the child with those by the parent); vectors are L2-normalised."""
    import numpy as np

    def unit(v):
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    parent, child = [unit(v) for v in parent], [unit(v) for v in child]
    cosine = float(np.concatenate([(p * c).sum(1) for p, c in zip(parent, child)]).mean())
    k = min(10, parent[1].shape[0])
    top = [np.argsort(-(q @ d.T), axis=1)[:, :k] for q, d in (parent, child)]
    overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(*top)]))
    return round(cosine, 4), round(overlap, 4)


@dataclass
class Card:
    """A child measured against its parent (rows: the parent fp32, the parent bf16, any intermediate, the child
    last) and the figures a gate reads (child / parent)."""

    parent: str
    method: str
    params: dict[str, Any]
    rows: list[Row]
    texts: dict[str, int] = field(default_factory=dict)

    @property
    def figures(self) -> dict[str, float]:
        """``quality``, ``top10``, ``perplexity``, ``speedup``, ``prefill``, ``latency``, ``memory``, ``rss``, ``size``
        of the child against the parent (fp32, the first row); ``gate.FIGURES`` says what each means."""
        parent, child = self.rows[0], self.rows[-1]
        perplexity = round(child.perplexity / parent.perplexity, 4) if child.perplexity and parent.perplexity else None
        return {"quality": child.quality, "top10": child.top10, "perplexity": perplexity,
                "speedup": round(child.throughput / parent.throughput, 3),
                "prefill": round(child.prefill / parent.prefill, 3) if child.prefill and parent.prefill else None,
                "latency": round(child.latency_ms / parent.latency_ms, 3),
                "memory": round(child.weight_bytes / max(parent.weight_bytes, 1), 3),
                "rss": round(child.rss_bytes / max(parent.rss_bytes, 1), 3),
                "size": round(child.disk_bytes / max(parent.disk_bytes, 1), 3)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``figures`` included)."""
        return {"parent": self.parent, "method": self.method, "params": self.params, "texts": self.texts,
                "rows": [asdict(r) for r in self.rows], "figures": self.figures}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Card":
        """The card ``to_dict`` wrote (e.g. read back from a job's JSON result)."""
        rows = [Row(**{**r, "throughput_range": tuple(r["throughput_range"]),
                       "prefill_range": tuple(r["prefill_range"]) if r.get("prefill_range") else None})
                for r in data["rows"]]
        return cls(data["parent"], data["method"], data["params"], rows, data.get("texts", {}))

    def table(self) -> str:
        """The card as a markdown table."""
        parent = self.rows[0]
        causal = parent.unit == "tokens"
        lines = ["| model | runtime | on disk | weights in memory | RSS growth | "
                 + ("latency per token, batch 1 | decode, batch 32 | speed-up | prefill, batches of 8 x 128 | "
                    "perplexity | parent ppl / ppl |"
                    if causal else "latency, batch 1 | throughput, batch 32 | speed-up | cosine to parent | "
                                   "top-10 overlap |"),
                 "|---" * (11 if causal else 10) + "|"]
        for r in self.rows:
            lines.append(f"| {r.label} | {r.runtime.removesuffix('-' + r.dtype)} {r.dtype} | {r.disk_bytes / 1e6:.1f} MB "
                         f"({r.disk_bytes / parent.disk_bytes:.2f}x) | {r.weight_bytes / 1e6:.1f} MB "
                         f"({r.weight_bytes / max(parent.weight_bytes, 1):.2f}x) | {r.rss_bytes / 1e6:.0f} MB | "
                         f"{r.latency_ms:.2f} ms | "
                         f"{r.throughput:.0f} {r.unit}/s ({r.throughput_range[0]:.0f}–{r.throughput_range[1]:.0f}) | "
                         f"{r.throughput / parent.throughput:.2f}x | "
                         + (f"{_prefill(r, parent)} | {_opt(r.perplexity, 2)} | {_opt(r.quality)} |" if causal
                            else f"{_opt(r.quality)} | {_opt(r.top10)} |"))
        return "\n".join(lines)

    def plot(self, path: Path) -> Path:
        """A PNG bar chart of the rows: throughput, memory and quality side by side."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [r.label for r in self.rows]
        unit = self.rows[0].unit
        panels = [(f"throughput, batch 32 ({unit}/s)", [r.throughput for r in self.rows]),
                  ("weights in memory (MB)", [r.weight_bytes / 1e6 for r in self.rows]),
                  ("perplexity (test split)" if unit == "tokens" else "cosine to parent fp32",
                   [(r.perplexity if unit == "tokens" else r.quality) or 0 for r in self.rows])]
        figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for ax, (title, values) in zip(axes, panels):
            ax.bar(labels, values, color=["#7f7f7f", "#bcbcbc"] + ["#1f77b4"] * (len(labels) - 2))
            ax.set_title(title, fontsize=10)
            ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        figure.suptitle(f"{self.method} of {self.parent}", fontsize=11)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path


def _prefill(row: Row, parent: Row) -> str:
    if not row.prefill or not parent.prefill:
        return "–"
    low, high = row.prefill_range  # measured with the median, always
    return f"{row.prefill:.0f} tokens/s ({low:.0f}–{high:.0f}; {row.prefill / parent.prefill:.2f}x)"


def _opt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
