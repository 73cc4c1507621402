"""Train a byte-level BPE tokenizer on our own corpus (no tokenizer is ever downloaded)."""

from __future__ import annotations

from typing import Iterable

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, model_max_length: int = 1024,
                    min_frequency: int = 2):
    """Train a GPT-2 style byte-level BPE tokenizer and wrap it for transformers.

    Args:
        texts: training documents (deterministic order gives a deterministic tokenizer).
        vocab_size: total vocabulary including the 256 byte symbols and the special token.
        model_max_length: the context length the tokenizer reports.
        min_frequency: merges seen fewer times are skipped.

    Returns:
        A ``PreTrainedTokenizerFast`` whose bos, eos and pad token are ``<|endoftext|>``.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS,
                                   pad_token=EOS, unk_token=EOS, model_max_length=model_max_length)
