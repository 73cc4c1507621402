"""The lean GPT-2 runner: mixed prefill + decode steps over packed (unpadded) tokens, and a slot KV cache.

One forward pass per engine step carries every running sequence's next token and the whole prompt of every
sequence joining, packed into one row of tokens (no padding), so the linear layers read the weights once per
step. Each sequence owns a row (slot) of a preallocated cache, its keys from column 0: nothing is re-packed
when a sequence joins, and one leaving costs one row copied into its place.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:  # GPT-2's "gelu_new" in one fused op
    return F.gelu(x, approximate="tanh")


class Linear:
    """``x @ weight + bias`` (``weight`` as ``[in, out]``, GPT-2's Conv1D layout), optionally followed by GELU-tanh.

    On a CPU with oneDNN, a weight is reordered once into oneDNN's blocked layout for ``rows`` (the batch it
    will mostly see) when that paid off on this machine's AVX-512 CPU: every bf16 weight (``addmm`` has no fast
    bf16 path here), and fp32 weights of at least 512x512 (timed by hand: 768x3072 at 16 rows 0.38 ms against
    ``addmm``'s 0.58); smaller fp32 products stayed faster on ``addmm`` (the 4x256
    GPT's products fit in cache, and oneDNN's call costs ~15 us). The GELU is then fused
    into the product. The reordered copy is held beside the model's own weight. Elsewhere (GPU, a dtype
    oneDNN lacks) it is ``addmm``. The reorder
    happens at the first call, on the thread that computes: a reorder on another thread would give that thread
    an OpenMP team of its own, and two teams in one process slow every parallel region (see DESIGN.md).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, gelu: bool = False) -> None:
        self.weight, self.bias, self.gelu, self.rows = weight, bias, gelu, rows
        worth = weight.dtype == torch.bfloat16 or (weight.dtype == torch.float32 and min(weight.shape) >= 512)
        self.packed = ... if worth and weight.device.type == "cpu" and torch.backends.mkldnn.is_available() else None

    def _pack(self) -> None:
        try:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().T.contiguous(), self.rows)
        except (RuntimeError, AttributeError):  # this build's oneDNN cannot: the plain product
            self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The product for ``x`` ``[tokens, in]``."""
        if self.packed is ...:
            self._pack()
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "gelu" if self.gelu else "none", [],
                                                      "tanh" if self.gelu else "")
        y = torch.addmm(self.bias, x, self.weight) if self.bias is not None else x @ self.weight
        return _gelu_tanh(y) if self.gelu else y


class _Block(NamedTuple):
    """One GPT-2 block's weights and settings, as the lean forward uses them."""

    ln_1: torch.nn.LayerNorm
    qkv: Linear
    out: Linear
    scaling: float
    ln_2: torch.nn.LayerNorm
    fc: Linear  # with GPT-2's GELU fused when the model uses GELU-tanh
    act: object  # the activation still to apply after ``fc`` (None when fused)
    proj: Linear


class SlotCache:
    """Keys and values per layer, ``[rows, heads, columns, head_dim]``; row ``i`` holds ``lens[i]`` tokens from
    column 0. Capacity grows on demand (rows up to ``max_rows``, columns up to ``max_cols``)."""

    def __init__(self, layers: int, heads: int, head_dim: int, dtype: torch.dtype, device, max_rows: int,
                 max_cols: int) -> None:
        self.shape = (heads, head_dim)
        self.layers, self.dtype, self.device = layers, dtype, device
        self.max_rows, self.max_cols = max_rows, max_cols
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.lens: list[int] = []

    @property
    def rows(self) -> int:
        """Rows in use."""
        return len(self.lens)

    def reserve(self, rows: int, cols: int) -> None:
        """Make room for ``rows`` rows of ``cols`` columns (grown geometrically, copying what is held)."""
        have_rows, have_cols = (self.kv[0][0].shape[0], self.kv[0][0].shape[2]) if self.kv else (0, 0)
        if rows <= have_rows and cols <= have_cols:
            return
        new_rows = min(self.max_rows, max(rows, have_rows, 2 * have_rows))
        new_cols = min(self.max_cols, max(-(-cols // 64) * 64, have_cols, have_cols + have_cols // 2))
        if rows > new_rows or cols > new_cols:
            raise ValueError(f"the cache holds at most {self.max_rows} rows of {self.max_cols} tokens; "
                             f"asked for {rows} of {cols}")
        grown = []
        for i in range(self.layers):
            k = torch.zeros(new_rows, *self.shape[:1], new_cols, self.shape[1], dtype=self.dtype, device=self.device)
            v = torch.zeros_like(k)
            if self.kv:
                old_k, old_v = self.kv[i]
                k[:have_rows, :, :have_cols] = old_k
                v[:have_rows, :, :have_cols] = old_v
            grown.append((k, v))
        self.kv = grown

    def retain(self, keep: list[int]) -> None:
        """Keep the rows ``keep`` (old indices) as rows 0, 1, ...; each moved row is copied once. Every moved row
        must land on a row that is not kept (``keep[i] >= i``), as a swap-remove order has it."""
        for new, old in enumerate(keep):
            if old != new:
                n = self.lens[old]
                for k, v in self.kv:
                    k[new, :, :n] = k[old, :, :n]
                    v[new, :, :n] = v[old, :, :n]
        self.lens = [self.lens[old] for old in keep]

    def truncate(self, rows: int) -> None:
        """Forget the rows from ``rows`` on."""
        del self.lens[rows:]


def swap_remove_order(alive: list[bool]) -> list[int]:
    """The rows to keep, as ``SlotCache.retain`` takes them: each dead row's place is taken by the last live row
    after it, so a sequence leaving costs one row copied, not a re-pack of the batch."""
    keep = [i for i, a in enumerate(alive) if a]
    order = list(range(len(keep)))  # new row i holds old row order[i]
    live_tail = [i for i in reversed(range(len(alive))) if alive[i] and i >= len(keep)]
    for new in range(len(keep)):
        if not alive[new]:
            order[new] = live_tail.pop(0)
    return order


class GPT2Runner:
    """GPT-2's forward written out over the model's own weights, stepping a slot cache."""

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

    def __init__(self, model, max_rows: int = 16) -> None:
        t = model.transformer
        self.device = t.wte.weight.device
        self.embed_dim = t.wte.weight.shape[1]
        self.heads = model.config.n_head
        self.head_dim = self.embed_dim // self.heads
        self.wte, self.wpe = t.wte.weight, t.wpe.weight
        tanh = model.config.activation_function in ("gelu_new", "gelu_pytorch_tanh")
        self.blocks = [_Block(b.ln_1, Linear(b.attn.c_attn.weight, b.attn.c_attn.bias, max_rows),
                              Linear(b.attn.c_proj.weight, b.attn.c_proj.bias, max_rows), b.attn.scaling, b.ln_2,
                              Linear(b.mlp.c_fc.weight, b.mlp.c_fc.bias, max_rows, gelu=tanh),
                              None if tanh else b.mlp.act, Linear(b.mlp.c_proj.weight, b.mlp.c_proj.bias, max_rows))
                       for b in t.h]
        self.ln_f, self.lm_head = t.ln_f, Linear(model.lm_head.weight.T, None, max_rows)
        self.cache = SlotCache(len(self.blocks), self.heads, self.head_dim, self.wte.dtype, self.device, max_rows,
                               int(model.config.n_positions))

    def step(self, tokens: list[int], prompts: list[list[int]], room: int = 1,
             more: list[int] | None = None) -> torch.Tensor:
        """One forward pass: the next token of the first ``len(tokens)`` cached rows (``tokens[i]`` for row ``i``),
        the next part ``more`` of the last cached row's prompt (a prompt prefilled in parts: that row is not
        among the decoded ones), and the whole (or a first part) of each of ``prompts``, which join as new rows
        after the cached ones. Returns logits ``[len(tokens) + (more is not None) + len(prompts), vocab]``: the
        decoded rows' next-token logits, then the last token's of ``more`` and of each prompt. ``room``: columns
        to keep free for the tokens the rows will still make (so the cache grows seldom). The cache's row
        lengths change only when the pass succeeds."""
        cache, nd, base = self.cache, len(tokens), self.cache.rows
        if nd > base or (more is not None and nd > base - 1):
            raise ValueError(f"step has {nd} tokens{' and a prompt part' if more is not None else ''} for {base} "
                             "cached rows")
        lens = cache.lens[:nd]
        parts = ([(base - 1, cache.lens[-1], more)] if more is not None else []) + \
            [(base + j, 0, p) for j, p in enumerate(prompts)]  # (row, first column, tokens)
        need = max([n + 1 for n in lens] + [c + len(p) for _, c, p in parts])
        want = max([n + room for n in lens] + [c + len(p) + room for _, c, p in parts])
        cache.reserve(base + len(prompts), max(need, min(want, cache.max_cols)))
        ids = list(tokens)
        positions = list(lens)
        spans, start = [], nd
        for row, col, p in parts:
            ids += p
            positions += range(col, col + len(p))
            spans.append((row, col, start, start + len(p)))
            start += len(p)
        dev = self.device
        rows = torch.arange(nd, device=dev)
        cols = torch.tensor(lens, dtype=torch.long, device=dev)
        width = max(lens) + 1 if nd else 0
        mask = (torch.arange(width, device=dev)[None] <= cols[:, None])[:, None, None] if nd else None

        def attend(i, q, k, v):  # q, k, v: [tokens, heads, head_dim]
            keys, values = cache.kv[i]
            out = []
            if nd:
                keys[rows, :, cols] = k[:nd]
                values[rows, :, cols] = v[:nd]
                out.append(F.scaled_dot_product_attention(q[:nd, :, None], keys[:nd, :, :width],
                                                          values[:nd, :, :width], attn_mask=mask,
                                                          scale=self.blocks[i].scaling)[:, :, 0])
            for row, col, a, b in spans:
                pk, pv = k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)  # [heads, n, head_dim]
                keys[row, :, col:col + b - a] = pk
                values[row, :, col:col + b - a] = pv
                if col:  # a later part: its queries see the row's earlier columns too
                    causal = torch.arange(col + b - a, device=dev)[None] <= torch.arange(col, col + b - a,
                                                                                         device=dev)[:, None]
                    pk, pv = keys[row, :, :col + b - a], values[row, :, :col + b - a]
                out.append(F.scaled_dot_product_attention(q[a:b].transpose(0, 1), pk, pv, is_causal=not col,
                                                          attn_mask=causal if col else None,
                                                          scale=self.blocks[i].scaling).transpose(0, 1))
            return torch.cat(out) if len(out) > 1 else out[0]

        x = self._forward(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), attend)
        last = list(range(nd)) + [b - 1 for _, _, _, b in spans]
        lens_after = [n + 1 for n in lens] + cache.lens[nd:]
        for row, col, p in parts:
            if row < base:
                lens_after[row] = col + len(p)
            else:
                lens_after.append(len(p))
        cache.lens = lens_after
        return self._logits(x[last])

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        t, (e, h, d) = ids.shape[0], (self.embed_dim, self.heads, self.head_dim)
        x = F.embedding(ids, self.wte) + F.embedding(positions, self.wpe)
        for i, (ln_1, qkv, out, _, ln_2, fc, act, proj) in enumerate(self.blocks):
            y = F.layer_norm(x, (e,), ln_1.weight, ln_1.bias, ln_1.eps)
            q, k, v = qkv(y).view(t, 3, h, d).unbind(1)
            x = x + out(attend(i, q, k, v).reshape(t, e))
            y = F.layer_norm(x, (e,), ln_2.weight, ln_2.bias, ln_2.eps)
            y = fc(y)
            x = x + proj(y if act is None else act(y))
        return x

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        return self.lm_head(F.layer_norm(last, (self.embed_dim,), self.ln_f.weight, self.ln_f.bias, self.ln_f.eps))
