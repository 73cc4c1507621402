"""Data preparation on the job driver: read texts, get a tokenizer, tokenize and pack into blocks."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mass.data.loaders import load_corpus_split, load_texts
from mass.errors import DataError
from mass.training.config import DataConfig

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Packed token blocks per split, each an int32 array of shape (n_blocks, block_size)."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray

    def counts(self) -> dict[str, int]:
        """Tokens per split."""
        return {k: int(getattr(self, k).size) for k in ("train", "validation", "test")}


def read_splits(cfg: DataConfig, corpus_dir: Path, seed: int) -> dict[str, list[str]]:
    """Documents for train/validation/test from user files or the built corpus."""
    if cfg.train is None:
        return {split: load_corpus_split(corpus_dir, split) for split in ("train", "validation", "test")}
    train = load_texts(Path(cfg.train).expanduser())
    splits = {"train": train}
    missing = [s for s in ("validation", "test") if getattr(cfg, s) is None]
    for split in ("validation", "test"):
        if getattr(cfg, split) is not None:
            splits[split] = load_texts(Path(getattr(cfg, split)).expanduser())
    if missing:  # hold out 5% of train per missing split, deterministically
        docs = list(train)
        random.Random(seed).shuffle(docs)
        n = max(1, len(docs) // 20)
        if len(docs) < n * len(missing) + 1:
            raise DataError(f"{cfg.train}: {len(docs)} documents are too few to hold out "
                            f"{'/'.join(missing)}; give those files explicitly", field="data.train")
        for i, split in enumerate(missing):
            splits[split] = docs[i * n:(i + 1) * n]
        splits["train"] = docs[len(missing) * n:]
    return splits


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


def prepare(cfg: DataConfig, tokenizer, texts: dict[str, list[str]], min_blocks: int) -> PreparedData:
    """Pack every split of ``texts`` (``read_splits``); DataError when a split has fewer blocks than the
    workers need."""
    eval_cap = None if cfg.max_train_tokens is None else max(cfg.max_train_tokens // 10, cfg.block_size * 8)
    data = PreparedData(
        train=pack(texts["train"], tokenizer, cfg.block_size, cfg.max_train_tokens),
        validation=pack(texts["validation"], tokenizer, cfg.block_size, eval_cap),
        test=pack(texts["test"], tokenizer, cfg.block_size, eval_cap),
    )
    for split in ("train", "validation", "test"):
        blocks = len(getattr(data, split))
        need = min_blocks if split == "train" else 1
        if blocks < need:
            raise DataError(f"{split} split has {blocks} blocks of {cfg.block_size} tokens, need at least "
                            f"{need}; add data or lower data.block_size / optim.batch_size", field=f"data.{split}")
    log.info("prepared tokens per split: %s", data.counts())
    return data
