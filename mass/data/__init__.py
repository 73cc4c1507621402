"""Offline data: the docstring corpus, user-data loaders and the BPE tokenizer trainer."""
