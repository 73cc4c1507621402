"""Model runners for ``LLMEngine``: batched prefill and one decode step over a left-padded batch KV cache.

``HFRunner`` drives any HF causal LM through its own ``forward``. ``GPT2Runner`` is a lean fast path for
GPT-2 models (what our training job produces): the same weights and maths without HF's per-call overhead,
writing each step's keys and values into preallocated buffers instead of concatenating the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [batch, heads, tokens, head_dim]


def make_runner(model, fast: bool = True):
    """The fastest runner that supports ``model`` (``fast=False`` forces the generic HF path)."""
    if fast and GPT2Runner.supports(model):
        return GPT2Runner(model)
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


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:  # GPT-2's "gelu_new" in one fused op
    return F.gelu(x, approximate="tanh")


class _Block(NamedTuple):
    """One GPT-2 block's weights and settings, as the lean forward uses them."""

    ln_1: torch.nn.LayerNorm
    c_attn: torch.nn.Module
    c_proj: torch.nn.Module
    scaling: float
    ln_2: torch.nn.LayerNorm
    c_fc: torch.nn.Module
    act: object
    mlp_proj: torch.nn.Module


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


class GPT2Runner:
    """GPT-2 forward written out over the model's own weights, with preallocated KV buffers."""

    @staticmethod
    def supports(model) -> bool:
        """True for an unquantized GPT-2 LM head model with standard attention."""
        from transformers.pytorch_utils import Conv1D

        if type(model).__name__ != "GPT2LMHeadModel":
            return False
        cfg = model.config
        if getattr(cfg, "add_cross_attention", False):
            return False
        if cfg._attn_implementation == "eager" and cfg.reorder_and_upcast_attn:
            return False
        mods = [m for b in model.transformer.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
        return (all(type(m) is Conv1D and m.weight.is_floating_point() for m in mods)
                and isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.is_floating_point())

    def __init__(self, model) -> None:
        t = model.transformer
        self.device = t.wte.weight.device
        self.embed_dim = t.wte.weight.shape[1]
        self.heads = model.config.n_head
        self.head_dim = self.embed_dim // self.heads
        self.wte, self.wpe = t.wte.weight, t.wpe.weight
        act = model.config.activation_function
        self.blocks = [_Block(b.ln_1, b.attn.c_attn, b.attn.c_proj, b.attn.scaling, b.ln_2, b.mlp.c_fc,
                              _gelu_tanh if act in ("gelu_new", "gelu_pytorch_tanh") else b.mlp.act, b.mlp.c_proj)
                       for b in t.h]
        self.ln_f, self.lm_head = t.ln_f, model.lm_head.weight

    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, KV]:
        """Run prompts (batched, left-padded): last-token logits [n, vocab] and their left-padded cache."""
        ids, real = left_pad(prompts)
        real = real.to(self.device)
        n, width = real.shape
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        mask = None
        if not bool(real.all()):  # ragged: causal and padding mask; else SDPA's own causal path
            causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
            mask = (causal[None] & real[:, None, :])[:, None]  # [n, 1, width, width]
            mask |= ~real[:, None, :, None]  # padding queries attend to everything: no all-masked rows (NaN)
        kv: KV = []

        def attend(i, q, k, v):
            kv.append((k, v))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                  scale=self.blocks[i].scaling)

        x = self._forward(torch.tensor(ids, device=self.device), positions, attend)
        return self._logits(x[:, -1]), kv

    def start(self, caches: list[KV], room: int) -> BatchState:
        """A batch state from per-row caches, with ``room`` preallocated columns for the steps ahead."""
        kv, width = join_rows(caches, room)
        mask = torch.zeros(len(caches), width + room, dtype=torch.bool, device=self.device)
        for row, cache in enumerate(caches):
            mask[row, width - cache[0][0].shape[2]:width] = True
        return BatchState(kv, mask, width)

    def decode(self, state: BatchState, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token per row: logits [batch, vocab]; the new keys/values are written into the free column."""
        if state.width == state.kv[0][0].shape[2]:  # out of room: grow by 64 columns
            grow = 64
            state.kv = [(F.pad(k, (0, 0, 0, grow)), F.pad(v, (0, 0, 0, grow))) for k, v in state.kv]
            state.mask = F.pad(state.mask, (0, grow))
        col = state.width
        state.mask[:, col] = True
        mask = state.mask[:, None, None, :col + 1]

        def attend(i, q, k, v):
            keys, values = state.kv[i]
            keys[:, :, col] = k[:, :, 0]
            values[:, :, col] = v[:, :, 0]
            return F.scaled_dot_product_attention(q, keys[:, :, :col + 1], values[:, :, :col + 1], attn_mask=mask,
                                                  scale=self.blocks[i].scaling)

        x = self._forward(torch.tensor(tokens, device=self.device)[:, None],
                          torch.tensor(positions, device=self.device)[:, None], attend)
        state.width += 1
        return self._logits(x[:, -1])

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        n, width = ids.shape
        e, h, d = self.embed_dim, self.heads, self.head_dim
        x = F.embedding(ids, self.wte) + F.embedding(positions, self.wpe)
        for i, (ln_1, c_attn, c_proj, _, ln_2, c_fc, act, mlp_proj) in enumerate(self.blocks):
            y = F.layer_norm(x, (e,), ln_1.weight, ln_1.bias, ln_1.eps)
            qkv = torch.addmm(c_attn.bias, y.view(-1, e), c_attn.weight).view(n, width, 3, h, d)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [n, heads, width, head_dim]
            a = attend(i, q, k, v).transpose(1, 2).reshape(n * width, e)
            x = x + torch.addmm(c_proj.bias, a, c_proj.weight).view(n, width, e)
            y = F.layer_norm(x, (e,), ln_2.weight, ln_2.bias, ln_2.eps)
            y = act(torch.addmm(c_fc.bias, y.view(-1, e), c_fc.weight))
            x = x + torch.addmm(mlp_proj.bias, y, mlp_proj.weight).view(n, width, e)
        return x

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(last, (self.embed_dim,), self.ln_f.weight, self.ln_f.bias, self.ln_f.eps) @ self.lm_head.T
