"""``EmbeddingEngine``: sentence embeddings from an encoder (MiniLM): mean pooling, optional L2 norm.

Inputs are sorted by length before batching so each forward pass pads as little as possible; the
results are returned in the caller's order.
"""

from __future__ import annotations

import torch

from mass.errors import InvalidRequest


class EmbeddingEngine:
    """Embed texts with an HF encoder.

    Args:
        model: a transformers encoder (``AutoModel``).
        tokenizer: its tokenizer.
        max_length: inputs are truncated to this many tokens.
        normalize: L2-normalise the pooled vectors (cosine similarity becomes a dot product).
        batch_size: texts per forward pass.
    """

    def __init__(self, model, tokenizer, max_length: int = 256, normalize: bool = True, batch_size: int = 64):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.normalize = normalize
        self.batch_size = batch_size
        self.dim = int(model.config.hidden_size)

    def encode(self, inputs: list[str | list[int]]) -> list[list[int]]:
        """Token ids of each input: texts are tokenized (with the model's special tokens); token-id inputs
        are taken as they are (the model's own vocabulary, as vLLM takes them); both cut to ``max_length``."""
        texts = [i for i, x in enumerate(inputs) if isinstance(x, str)]
        encoded = self.tokenizer([inputs[i] for i in texts], add_special_tokens=True, truncation=True,
                                 max_length=self.max_length)["input_ids"] if texts else []
        out = [list(x)[:self.max_length] if not isinstance(x, str) else None for x in inputs]
        for i, ids in zip(texts, encoded):
            out[i] = ids
        vocab = len(self.tokenizer)
        for ids in out:
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequest(f"input token id {bad[0]} is outside this model's vocabulary (0..{vocab - 1})",
                                     param="input")
        return out

    def embed(self, inputs: list[str | list[int]]) -> tuple[list[list[float]], list[int]]:
        """Return (one vector per input, tokens per input), both in input order; an input is a text or a
        list of token ids."""
        if not inputs:
            raise InvalidRequest("input must contain at least one text", field="input")
        ids = self.encode(inputs)
        lengths = [len(x) for x in ids]
        order = sorted(range(len(inputs)), key=lambda i: lengths[i])
        vectors: list[list[float] | None] = [None] * len(inputs)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                batch = self.tokenizer.pad({"input_ids": [ids[i] for i in chunk]}, return_tensors="pt")
                batch = {k: v.to(self.model.device) for k, v in batch.items()}
                # pooled and normalised in fp32 whatever the model's dtype: bf16 sums over tokens and a bf16 norm
                # left vectors up to 0.5 % off unit length
                hidden = self.model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled, dim=-1)
                for i, vec in zip(chunk, pooled.float().cpu().tolist()):
                    vectors[i] = vec
        return vectors, lengths
