"""``LLMEngine``: iteration-level (continuous) batching for HF causal LMs, with token streaming.

Requests join the running batch between decode steps and leave the moment they finish or are
cancelled. A joining request is prefilled alone; the running batch keeps one left-padded KV cache that
grows by a column per step and is re-padded only when a request joins or leaves.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch

from mass.errors import InvalidRequest, MassError
from mass.serving.engines.sampling import SamplingParams, make_generator, sample

log = logging.getLogger(__name__)


@dataclass
class TokenEvent:
    """A piece of one request's output: new text, and the finish reason on the last event."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: MassError | None = None


@dataclass
class _Sequence:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[TokenEvent], None]
    generator: torch.Generator
    generated: list[int] = field(default_factory=list)
    cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    sent_chars: int = 0
    done: bool = False  # finished or cancelled: removed at the next step
    started: float = field(default_factory=time.perf_counter)

    @property
    def length(self) -> int:  # tokens held in the KV cache
        return 0 if self.cache is None else self.cache[0][0].shape[2]


class LLMEngine:
    """Continuous-batching generation over one HF causal LM (CPU or GPU).

    Args:
        model: a transformers causal LM in eval mode.
        tokenizer: its tokenizer.
        max_running: sequences decoded together at most.
        max_batch_tokens: prompt + max_tokens summed over running sequences at most (KV budget).
    """

    def __init__(self, model, tokenizer, max_running: int = 16, max_batch_tokens: int = 8192) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_running = max_running
        self.max_batch_tokens = max_batch_tokens
        config = model.config
        self.context_length = int(getattr(config, "n_positions", None) or config.max_position_embeddings)
        self.eos_id = tokenizer.eos_token_id
        self._ids = itertools.count(1)
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._by_id: dict[int, _Sequence] = {}
        self._cond = threading.Condition()
        self._stopped = False
        self.steps = 0
        # the running batch's KV cache, left-padded: rows follow _batch_ids; rebuilt only on join/leave
        self._batch_ids: list[int] = []
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._mask: torch.Tensor | None = None
        self._lens: list[int] = []
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ requests
    def encode(self, prompt: str) -> list[int]:
        """Prompt text -> token ids (no special tokens added)."""
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest when a request can never fit the model or the engine."""
        if not prompt_ids:
            raise InvalidRequest("prompt is empty", field="prompt")
        if len(prompt_ids) + params.max_tokens > self.context_length:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self.context_length} tokens", field="max_tokens", limit=self.context_length)
        if len(prompt_ids) + params.max_tokens > self.max_batch_tokens:
            raise InvalidRequest(f"request needs {len(prompt_ids) + params.max_tokens} tokens; this engine's "
                                 f"batch budget is {self.max_batch_tokens}", field="max_tokens")

    def submit(self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[TokenEvent], None]) -> int:
        """Queue a request; ``emit`` is called from the engine thread for every event. Returns its id."""
        self.check(prompt_ids, params)
        seq = _Sequence(next(self._ids), list(prompt_ids), params, emit, make_generator(params.seed))
        with self._cond:
            if self._stopped:
                raise MassError("engine is shut down")
            self._waiting.append(seq)
            self._by_id[seq.id] = seq
            self._cond.notify()
        return seq.id

    def cancel(self, request_id: int) -> None:
        """Stop a request; its slot is freed at the next step."""
        with self._cond:
            seq = self._by_id.get(request_id)
            if seq is not None:
                seq.done = True
                self._cond.notify()

    async def stream(self, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Yield events for one request; closing the iterator early cancels the request."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        request_id = self.submit(ids, params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        finished = False
        try:
            while True:
                event = await queue.get()
                if event.error is not None:
                    finished = True
                    raise event.error
                yield event
                if event.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self.cancel(request_id)

    async def generate(self, prompt: str | list[int], params: SamplingParams) -> TokenEvent:
        """The whole completion as one event (text joined, usage and finish reason of the last)."""
        parts, ids, last = [], [], None
        async for event in self.stream(prompt, params):
            parts.append(event.text)
            ids.extend(event.token_ids)
            last = event
        return TokenEvent("".join(parts), ids, last.finish_reason, last.prompt_tokens, last.completion_tokens)

    def stats(self) -> dict[str, int]:
        """Queue depths and steps taken (for readiness and metrics)."""
        with self._cond:  # finished sequences leave the lists at the next step; they no longer count
            return {"waiting": sum(not s.done for s in self._waiting),
                    "running": sum(not s.done for s in self._running), "steps": self.steps}

    def shutdown(self) -> None:
        """Stop the engine thread; queued requests fail."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stopped:
                    pending = list(self._waiting) + self._running
                    self._waiting.clear()
                    self._running.clear()
                    break
                self._drop_done()
                admitted = self._admit()
            try:
                with torch.inference_mode():
                    for seq in admitted:
                        self._prefill(seq)
                    self._drop_finished()
                    if self._running:
                        self._decode()
                        self._drop_finished()
                self.steps += 1
            except Exception as exc:  # a model failure fails the requests in flight, not the engine
                log.exception("engine step failed")
                error = MassError(f"generation failed: {type(exc).__name__}: {exc}")
                self._batch_ids = []
                with self._cond:
                    failed, self._running = self._running, []
                for seq in failed:
                    self._finish(seq, None, error=error)
        for seq in pending:
            self._finish(seq, None, error=MassError("engine shut down"))

    def _drop_done(self) -> None:
        """Forget finished or cancelled sequences (caller holds the lock)."""
        for seq in [s for s in self._running if s.done]:
            self._running.remove(seq)
            self._by_id.pop(seq.id, None)
        kept: deque[_Sequence] = deque()
        for seq in self._waiting:
            if seq.done:
                self._by_id.pop(seq.id, None)
            else:
                kept.append(seq)
        self._waiting = kept

    def _admit(self) -> list[_Sequence]:
        budget = sum(len(s.prompt_ids) + s.params.max_tokens for s in self._running)
        admitted = []
        while self._waiting and len(self._running) < self.max_running:
            need = len(self._waiting[0].prompt_ids) + self._waiting[0].params.max_tokens
            if budget + need > self.max_batch_tokens and self._running:
                break
            seq = self._waiting.popleft()
            budget += need
            self._running.append(seq)
            admitted.append(seq)
        return admitted

    def _prefill(self, seq: _Sequence) -> None:
        ids = torch.tensor([seq.prompt_ids], device=self.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        seq.cache = _layers(out.cache)
        self._advance(seq, out.logits[0, -1])

    def _decode(self) -> None:
        """One token for every running sequence in one forward pass over the batch cache."""
        batch = self._running
        if [s.id for s in batch] != self._batch_ids:  # someone joined or left: re-pad once
            self._rebuild(batch)
        mask = torch.cat([self._mask, self._mask.new_ones(len(batch), 1)], dim=1)
        out = self.model(
            input_ids=torch.tensor([[s.generated[-1]] for s in batch], device=self.device),
            attention_mask=mask,
            position_ids=torch.tensor([[n] for n in self._lens], device=self.device),
            cache=_cache(self._kv), use_cache=True)
        self._kv, self._mask = _layers(out.cache), mask
        self._lens = [n + 1 for n in self._lens]
        for row, seq in enumerate(batch):
            self._advance(seq, out.logits[row, -1])

    def _rebuild(self, batch: list[_Sequence]) -> None:
        """Left-pad the caches of ``batch`` (rows kept from the last batch, new ones from prefill) into one."""
        old_rows = {sid: row for row, sid in enumerate(self._batch_ids)}
        old_width = self._mask.shape[1] if self._mask is not None else 0
        parts = []
        for seq in batch:
            if seq.id in old_rows:
                row, n = old_rows[seq.id], self._lens[old_rows[seq.id]]
                parts.append(([(k[row:row + 1, :, old_width - n:], v[row:row + 1, :, old_width - n:])
                               for k, v in self._kv], n))
            else:
                parts.append((seq.cache, seq.length))
                seq.cache = None  # from now on it lives in the batch cache
        longest = max(n for _, n in parts)
        mask = torch.zeros(len(batch), longest, dtype=torch.long, device=self.device)
        for row, (_, n) in enumerate(parts):
            mask[row, longest - n:] = 1
        self._kv = [(torch.cat([_left_pad(layers[i][0], longest) for layers, _ in parts]),
                     torch.cat([_left_pad(layers[i][1], longest) for layers, _ in parts]))
                    for i in range(len(parts[0][0]))]
        self._mask, self._lens, self._batch_ids = mask, [n for _, n in parts], [s.id for s in batch]

    def _advance(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Sample one token for ``seq``, stream the new text, finish it when a stop condition holds."""
        token = sample(logits, seq.params, seq.generator)
        finish = None
        if token == self.eos_id:
            finish = "stop"
        else:
            seq.generated.append(token)
            if len(seq.generated) >= seq.params.max_tokens:
                finish = "length"
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        end = len(text)
        for stop in seq.params.stop:
            at = text.find(stop, max(0, seq.sent_chars - len(stop) + 1))
            if at != -1 and at < end:
                end, finish = at, "stop"
        if finish is None:
            held = max((len(s) for s in seq.params.stop), default=1) - 1  # may be the start of a stop string
            end = max(seq.sent_chars, end - held)
            if text[seq.sent_chars:end].endswith("\ufffd"):  # half of a multi-byte character
                end -= 1
        delta = text[seq.sent_chars:end] if end > seq.sent_chars else ""
        seq.sent_chars = max(seq.sent_chars, end)
        if finish is not None:
            self._finish(seq, finish, delta=delta, token_ids=[token] if token != self.eos_id else [])
        elif delta:
            seq.emit(TokenEvent(delta, [token], None, len(seq.prompt_ids), len(seq.generated)))

    def _finish(self, seq: _Sequence, reason: str | None, delta: str = "", token_ids: list[int] | None = None,
                error: MassError | None = None) -> None:
        seq.done = True
        seq.emit(TokenEvent(delta, token_ids or [], reason, len(seq.prompt_ids), len(seq.generated), error=error))

    def _drop_finished(self) -> None:
        with self._cond:
            self._drop_done()

def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers)


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - tensor.shape[2]
    if missing == 0:
        return tensor
    pad = tensor.new_zeros(tensor.shape[0], tensor.shape[1], missing, tensor.shape[3])
    return torch.cat([pad, tensor], dim=2)
