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

    def embed(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        """Return (one vector per text, tokens per text), both in input order."""
        if not texts:
            raise InvalidRequest("input must contain at least one text", field="input")
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True, truncation=True,
                                                     max_length=self.max_length)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        vectors: list[list[float] | None] = [None] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                batch = self.tokenizer([texts[i] for i in chunk], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
                batch = {k: v.to(self.model.device) for k, v in batch.items()}
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled, dim=-1)
                for i, vec in zip(chunk, pooled.float().cpu().tolist()):
                    vectors[i] = vec
        return vectors, lengths
