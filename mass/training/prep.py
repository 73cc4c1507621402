"""Data preparation on the job driver: read texts (noting which files and dataset versions), tokenize and pack
into blocks."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mass.data.loaders import parse_texts
from mass.errors import DataError, MassError
from mass.training.config import DataConfig

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Packed token blocks per split, each an int32 array of shape (n_blocks, block_size). With
    ``data.pipeline: ray`` the training blocks are instead a materialized Ray Dataset of ``{"ids": block}`` rows in
    the cluster's object store (``train_dataset``, ``train_blocks`` rows), streamed to the Train workers."""

    train: np.ndarray | None
    validation: np.ndarray
    test: np.ndarray
    train_dataset: Any = None
    train_blocks: int = 0

    def __post_init__(self) -> None:
        if self.train is not None:
            self.train_blocks = len(self.train)

    def counts(self) -> dict[str, int]:
        """Tokens per split."""
        block = self.validation.shape[1] if self.validation.ndim == 2 else 0
        return {"train": self.train_blocks * block, "validation": int(self.validation.size),
                "test": int(self.test.size)}


@dataclass
class Inputs:
    """The documents of every split, and where each came from: ``sources`` lists, per file or registered
    dataset read, its ``split``, ``path``, ``content_hash`` (as ``mass data register`` computes it) and the
    registered ``dataset`` version it is (``name@version``), or None for files no dataset version holds."""

    texts: dict[str, list[str]]
    sources: list[dict]

    def datasets(self) -> list[str]:
        """The registered dataset versions read, in order, once each."""
        return datasets_read(self.sources)


def datasets_read(sources: list[dict]) -> list[str]:
    """The registered dataset versions (``name@version``) among ``sources``, in order, once each."""
    return list(dict.fromkeys(s["dataset"] for s in sources if s.get("dataset")))


def read_splits(cfg: DataConfig, corpus_dir: Path, seed: int) -> dict[str, list[str]]:
    """Documents for train/validation/test from a registered dataset, user files or the built corpus."""
    return read_inputs(cfg, corpus_dir, seed).texts


def read_inputs(cfg: DataConfig, corpus_dir: Path, seed: int, store=None) -> Inputs:
    """``read_splits`` with the provenance of what was read (``Inputs``). ``data.dataset`` (a registered
    version, checked unchanged) or ``data.train`` gives the training documents, the corpus otherwise; a split
    without its own file is held out of train (5 %, deterministically)."""
    from mass.data.datasets import DatasetStore, hash_files

    store = store or DatasetStore()
    texts: dict[str, list[str]] = {}
    sources: list[dict] = []

    def read_file(split: str, path: Path) -> None:
        if not path.is_file():
            raise DataError(f"data file not found: {path}", field=f"data.{split}", path=str(path))
        raw = path.read_bytes()
        texts[split] = parse_texts(raw, str(path))
        digest = hash_files([(path.name, raw)])
        try:
            known = store.find(digest)
        except MassError as exc:  # provenance is worth a warning, not a failed run, when files were named directly
            log.warning("cannot look %s up among registered datasets (%s); recorded by its hash only", path,
                        exc.message)
            known = []
        sources.append({"split": split, "path": str(path.resolve()), "content_hash": digest,
                        "dataset": known[-1].ref if known else None})

    if cfg.dataset is not None:
        version, texts["train"] = store.read(cfg.dataset)
        sources.append({"split": "train", "path": version.path, "content_hash": version.content_hash,
                        "dataset": version.ref})
    elif cfg.train is not None:
        read_file("train", Path(cfg.train).expanduser())
    else:
        for split in ("train", "validation", "test"):
            path = Path(corpus_dir) / f"{split}.parquet"
            if not path.is_file():
                raise DataError(f"corpus split {path} not found; build it with `mass data build-corpus`",
                                field="data.corpus_dir", path=str(path))
            read_file(split, path)
        return Inputs(texts, sources)
    for split in ("validation", "test"):
        if getattr(cfg, split) is not None:
            read_file(split, Path(getattr(cfg, split)).expanduser())
    missing = [s for s in ("validation", "test") if s not in texts]
    if missing:  # hold out 5% of train per missing split, deterministically
        docs = list(texts["train"])
        random.Random(seed).shuffle(docs)
        n = max(1, len(docs) // 20)
        where = cfg.dataset or cfg.train
        if len(docs) < n * len(missing) + 1:
            raise DataError(f"{where}: {len(docs)} documents are too few to hold out "
                            f"{'/'.join(missing)}; give those files explicitly",
                            field="data.dataset" if cfg.dataset else "data.train")
        for i, split in enumerate(missing):
            texts[split] = docs[i * n:(i + 1) * n]
        texts["train"] = docs[len(missing) * n:]
    return Inputs(texts, sources)


def pack(texts: list[str], tokenizer, block_size: int, max_tokens: int | None = None) -> np.ndarray:
    """Tokenize documents, join them with EOS and cut the stream into equal blocks."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    n = len(stream) // block_size
    return np.asarray(stream[: n * block_size], dtype=np.int32).reshape(n, block_size)


def pack_on_cluster(texts: list[str], tokenizer, block_size: int, max_tokens: int | None = None,
                    batch_docs: int = 256):
    """The training blocks made by Ray Data: documents split into batches tokenized and packed in parallel tasks
    across the cluster (each batch's stream is cut into blocks; its tail, under one block, is dropped), capped at
    ``max_tokens``, materialized in the object store. (Ray Dataset of ``{"ids": int32[block_size]}`` rows, rows)."""
    import ray.data

    eos = tokenizer.eos_token_id

    def pack_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stream: list[int] = []
        for ids in tokenizer(list(batch["text"]), add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
        n = len(stream) // block_size
        return {"ids": np.asarray(stream[: n * block_size], dtype=np.int32).reshape(n, block_size)}

    ds = ray.data.from_items([{"text": t} for t in texts], override_num_blocks=max(1, len(texts) // batch_docs))
    ds = ds.map_batches(pack_batch, batch_size=batch_docs, batch_format="numpy")
    if max_tokens is not None:
        ds = ds.limit(max_tokens // block_size)
    ds = ds.materialize()
    return ds, ds.count()


def prepare(cfg: DataConfig, tokenizer, texts: dict[str, list[str]], min_blocks: int) -> PreparedData:
    """Pack every split of ``texts`` (``read_splits``); DataError when a split has fewer blocks than the
    workers need. ``data.pipeline: ray`` packs the training split on the cluster (``pack_on_cluster``)."""
    eval_cap = None if cfg.max_train_tokens is None else max(cfg.max_train_tokens // 10, cfg.block_size * 8)
    if cfg.pipeline == "ray":
        dataset, rows = pack_on_cluster(texts["train"], tokenizer, cfg.block_size, cfg.max_train_tokens)
        train = {"train": None, "train_dataset": dataset, "train_blocks": rows}
    else:
        train = {"train": pack(texts["train"], tokenizer, cfg.block_size, cfg.max_train_tokens)}
    data = PreparedData(
        **train,
        validation=pack(texts["validation"], tokenizer, cfg.block_size, eval_cap),
        test=pack(texts["test"], tokenizer, cfg.block_size, eval_cap),
    )
    for split in ("train", "validation", "test"):
        blocks = data.train_blocks if split == "train" else len(getattr(data, split))
        need = min_blocks if split == "train" else 1
        if blocks < need:
            raise DataError(f"{split} split has {blocks} blocks of {cfg.block_size} tokens, need at least "
                            f"{need}; add data or lower data.block_size / optim.batch_size", field=f"data.{split}")
    log.info("prepared tokens per split: %s", data.counts())
    return data
