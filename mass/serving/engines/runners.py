"""Model runners for ``LLMEngine``: ``HFRunner`` drives any HF causal LM through its own ``forward``, a batched
prefill and one decode step at a time over a left-padded batch KV cache. GPT-2 models (what our training job
produces) take the lean ``gpt2.GPT2Runner`` instead: mixed prefill + decode steps over a slot cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [batch, heads, tokens, head_dim]


def make_runner(model, fast: bool = True, max_rows: int = 16):
    """The fastest runner that supports ``model`` (``fast=False`` forces the generic HF path); ``max_rows``: the
    sequences it must hold at once."""
    from mass.serving.engines.gpt2 import GPT2Runner

    if fast and GPT2Runner.supports(model):
        return GPT2Runner(model, max_rows=max_rows)
    return HFRunner(model)


def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[list[list[int]], torch.Tensor]:
    """Left-pad token lists to one width; returns them and a [batch, width] bool mask of real tokens."""
    width = max(len(p) for p in prompts)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, p in enumerate(prompts):
        mask[row, width - len(p):] = True
    return [[pad] * (width - len(p)) + list(p) for p in prompts], mask


def split_rows(kv: KV, lengths: list[int]) -> list[KV]:
    """One left-padded batch cache -> one cache per row, each cut to that row's real tokens."""
    width = kv[0][0].shape[2]
    return [[(k[row:row + 1, :, width - n:], v[row:row + 1, :, width - n:]) for k, v in kv]
            for row, n in enumerate(lengths)]


def join_rows(caches: list[KV], room: int = 0) -> tuple[KV, int]:
    """Per-row caches -> one left-padded batch cache with ``room`` free columns on the right; and its width."""
    width = max(c[0][0].shape[2] for c in caches)
    first = caches[0][0][0]
    layers = []
    for i in range(len(caches[0])):
        keys = first.new_zeros(len(caches), first.shape[1], width + room, first.shape[3])
        values = torch.zeros_like(keys)
        for row, cache in enumerate(caches):
            k, v = cache[i]
            keys[row, :, width - k.shape[2]:width] = k[0]
            values[row, :, width - v.shape[2]:width] = v[0]
        layers.append((keys, values))
    return layers, width


@dataclass
class BatchState:
    """The running batch's cache: ``kv`` holds ``width`` filled columns (left-padded) plus free room."""

    kv: KV
    mask: torch.Tensor  # [batch, capacity] bool, True where a real token sits
    width: int
    handle: object = None  # a runner's own cache object, kept between steps

    def filled(self) -> KV:
        """The filled part of the cache (views)."""
        return [(k[:, :, :self.width], v[:, :, :self.width]) for k, v in self.kv]


class HFRunner:
    """Any HF causal LM, through its ``forward`` with a ``DynamicCache``."""

    def __init__(self, model) -> None:
        self.model = model
        self.device = next(model.parameters()).device

    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, KV]:
        """Run prompts (batched, left-padded): last-token logits [n, vocab] and their left-padded cache."""
        ids, mask = left_pad(prompts)
        mask = mask.to(self.device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=torch.tensor(ids, device=self.device), attention_mask=mask.long(),
                         position_ids=positions, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], [(layer.keys, layer.values) for layer in out.cache.layers]

    def start(self, caches: list[KV], room: int) -> BatchState:
        """A batch state from per-row caches (HF grows its cache itself, so ``room`` is not used)."""
        kv, width = join_rows(caches)
        mask = torch.zeros(len(caches), width, dtype=torch.bool, device=self.device)
        for row, cache in enumerate(caches):
            mask[row, width - cache[0][0].shape[2]:] = True
        return BatchState(kv, mask, width)

    def decode(self, state: BatchState, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token per row: logits [batch, vocab]; the state grows by one column."""
        from transformers import DynamicCache

        mask = torch.cat([state.mask, state.mask.new_ones(len(tokens), 1)], dim=1)
        cache = state.handle if state.handle is not None else DynamicCache(ddp_cache_data=state.kv)
        out = self.model(input_ids=torch.tensor(tokens, device=self.device)[:, None], attention_mask=mask.long(),
                         position_ids=torch.tensor(positions, device=self.device)[:, None], cache=cache,
                         use_cache=True)
        state.handle, state.kv = out.cache, [(layer.keys, layer.values) for layer in out.cache.layers]
        state.mask, state.width = mask, state.width + 1
        return out.logits[:, -1]
