"""``LLMEngine``: iteration-level (continuous) batching for HF causal LMs, with token streaming.

Requests join the running batch between decode steps and leave the moment they finish or are
cancelled. With a stepping runner (GPT-2's), each step is one forward pass that decodes every running
sequence and prefills every joining one, over a cache with a row per sequence. With the generic HF runner,
joining requests are prefilled together and the running batch keeps one left-padded KV cache that grows by a
column per step and is re-packed only when a request joins or leaves.

Faults stay with the request that caused them: a failure in one sequence's sampling, stop strings or
detokenisation fails that sequence alone; a failed shared forward pass is retried once per sequence
(each recomputed alone from its tokens), so only a sequence whose own forward fails is failed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from mass.errors import InvalidRequest, MassError
from mass.serving.engines.detokenize import TextStream
from mass.serving.engines.events import TokenEvent, check_request, check_resume, joined, token_text
from mass.serving.engines.gpt2 import swap_remove_order
from mass.serving.engines.runners import KV, BatchState, make_runner, split_rows
from mass.serving.engines.sampling import (
    SamplingParams,
    adjust,
    make_generator,
    sample,
    top_logprobs,
)

log = logging.getLogger(__name__)


@dataclass
class _Sequence:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    generator: torch.Generator
    generated: list[int] = field(default_factory=list)
    cache: KV | None = None  # its own cache between prefill and joining the batch
    text: TextStream | None = None  # detokenised text and stop strings
    unsent_ids: list[int] = field(default_factory=list)  # tokens whose text is not streamed yet
    unsent_logprobs: list[dict] = field(default_factory=list)  # their logprobs (when asked for)
    bias_row: torch.Tensor | None = None  # logit_bias as a dense row (greedy rows add it every step)
    done: bool = False  # finished or cancelled: removed at the next step
    started: float = field(default_factory=time.perf_counter)


class LLMEngine:
    """Continuous-batching generation over one HF causal LM (CPU or GPU).

    Args:
        model: a transformers causal LM in eval mode.
        tokenizer: its tokenizer.
        max_running: sequences decoded together at most.
        max_batch_tokens: prompt + max_tokens summed over running sequences at most (KV budget).
        fast: use the lean GPT-2 runner when the model is an unquantized GPT-2 (False: always HF forward).
        max_step_prompt_tokens: with the GPT-2 runner, a step prefills at most this many prompt tokens (a longer
            prompt is prefilled in parts over several steps), so running sequences get a token between the
            parts of a long prompt, and the first prompt in line gets its first token sooner.
    """

    def __init__(self, model, tokenizer, max_running: int = 16, max_batch_tokens: int = 8192,
                 fast: bool = True, max_step_prompt_tokens: int = 512) -> None:
        self.tokenizer = tokenizer
        self.runner = make_runner(model.eval(), fast=fast, max_rows=max_running)
        self._stepped = hasattr(self.runner, "step")  # one mixed prefill + decode pass per step
        self.max_running = max_running
        self.max_batch_tokens = max_batch_tokens
        self.max_step_prompt_tokens = max_step_prompt_tokens
        config = model.config
        self.context_length = int(getattr(config, "n_positions", None) or config.max_position_embeddings)
        self.vocab_size = int(config.vocab_size)
        self.eos_id = tokenizer.eos_token_id
        self._ids = itertools.count(1)
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._by_id: dict[int, _Sequence] = {}
        self._cond = threading.Condition()
        self._stopped = False
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, TokenEvent]]] = defaultdict(list)
        self.steps = 0
        # the running batch: rows follow _batch_ids; _lens are each row's real tokens in the cache
        self._batch_ids: list[int] = []
        self._state: BatchState | None = None
        self._lens: list[int] = []
        self._rows: list[_Sequence] = []  # a stepping runner's decoding rows, in cache order
        self._partial: _Sequence | None = None  # the one prompt prefilled in parts: the cache's last row
        self._partial_done = 0  # its tokens in the cache so far
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ requests
    def encode(self, prompt: str) -> list[int]:
        """Prompt text -> token ids (no special tokens added)."""
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest when a request can never fit the model or the engine."""
        check_request(prompt_ids, params, self.vocab_size, self.context_length)
        if len(prompt_ids) + params.max_tokens > self.max_batch_tokens:
            raise InvalidRequest(f"request needs {len(prompt_ids) + params.max_tokens} tokens; this engine's "
                                 f"batch budget is {self.max_batch_tokens}", field="max_tokens")

    def check_resume(self, generated: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest unless ``generated`` can be the start of a ``params`` request's output."""
        check_resume(generated, params, self.vocab_size)

    def submit(self, prompt_ids: list[int], params: SamplingParams, queue: asyncio.Queue,
               loop: asyncio.AbstractEventLoop, generated: list[int] = (), sent: int = 0) -> int:
        """Queue a request; its events are put on ``queue`` in ``loop``. Returns the request id.

        ``generated``/``sent`` resume a request another replica had started: its output so far (token ids) and
        how many characters of that output's text were already streamed; only text after them is sent, and
        ``max_tokens``, penalties and the usage count the resumed tokens."""
        self.check(prompt_ids, params)
        self.check_resume(list(generated), params)
        text = TextStream(self.tokenizer, params.stop)
        text.replay(generated, sent)
        seq = _Sequence(next(self._ids), list(prompt_ids), params, queue, loop, make_generator(params.seed),
                        generated=list(generated), text=text)
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

    async def stream(self, prompt: str | list[int], params: SamplingParams, generated: list[int] = (),
                     sent: int = 0) -> AsyncIterator[TokenEvent]:
        """Yield events for one request; closing the iterator early cancels the request. ``generated``/``sent``
        resume a started request (see ``submit``)."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        request_id = self.submit(ids, params, queue, asyncio.get_running_loop(), generated, sent)
        finished = False
        try:
            while True:
                event = await queue.get()
                if event.failure is not None:
                    finished = True
                    raise event.failure
                yield event
                if event.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self.cancel(request_id)

    async def generate(self, prompt: str | list[int], params: SamplingParams) -> TokenEvent:
        """The whole completion as one event (text joined, usage and finish reason of the last)."""
        return await joined(self.stream(prompt, params), params.logprobs is not None)

    def stats(self) -> dict[str, int]:
        """Queue depths and steps taken (for readiness and metrics)."""
        with self._cond:  # finished sequences leave the lists at the next step; they no longer count
            return {"waiting": sum(not s.done for s in self._waiting),
                    "running": sum(not s.done for s in self._running), "steps": self.steps}

    def alive(self) -> bool:
        """Whether the engine thread runs (Serve's health check asks)."""
        return self._thread.is_alive()

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
                    if self._stepped:
                        self._step(admitted)
                    elif admitted:
                        self._prefill(admitted)
                        self._flush()  # first tokens go out now, not after the decode step
                    self._drop_finished()
                    if self._running and not self._stepped:
                        self._decode()
                        self._drop_finished()
                self.steps += 1
            except Exception as exc:  # a bug in the step itself: fail the requests in flight, not the engine
                log.exception("engine step failed")
                error = MassError(f"generation failed: {type(exc).__name__}: {exc}")
                self._forget_batch()
                with self._cond:
                    failed, self._running = self._running, []
                for seq in failed:
                    self._finish(seq, None, failure=error)
            self._flush()
        for seq in pending:
            self._finish(seq, None, failure=MassError("engine shut down"))
        self._flush()

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

    def _drop_finished(self) -> None:
        with self._cond:
            self._drop_done()

    def _admit(self) -> list[_Sequence]:
        budget = sum(len(s.prompt_ids) + s.params.max_tokens for s in self._running)
        admitted, prompt_tokens = [], self._partial_part() if self._partial is not None else 0
        while self._waiting and len(self._running) < self.max_running:
            need = len(self._waiting[0].prompt_ids) + self._waiting[0].params.max_tokens
            if budget + need > self.max_batch_tokens and self._running:
                break
            if self._stepped and prompt_tokens >= self.max_step_prompt_tokens:
                break  # this step's prompt tokens are spent (the last one admitted may join in part)
            seq = self._waiting.popleft()
            prompt_tokens += len(seq.prompt_ids) + len(seq.generated)
            budget += need
            self._running.append(seq)
            admitted.append(seq)
        return admitted

    def _prefill(self, seqs: list[_Sequence]) -> None:
        """Prompts of the joining sequences in one forward pass; each keeps its own cache until it joins."""
        try:  # a resumed sequence prefills its prompt and the output it already has
            logits, kv = self.runner.prefill([s.prompt_ids + s.generated for s in seqs])
        except Exception as exc:
            log.warning("prefill of %d requests failed (%s: %s); retrying each alone", len(seqs),
                        type(exc).__name__, exc)
            self._recompute(seqs)
            return
        for seq, cache in zip(seqs, split_rows(kv, [len(s.prompt_ids) + len(s.generated) for s in seqs])):
            seq.cache = cache
        self._advance(seqs, logits)

    def _forget_batch(self) -> None:
        """Drop the batch cache (its rows are rebuilt from each sequence's tokens when they run again)."""
        self._batch_ids, self._state, self._lens = [], None, []
        if self._stepped:
            self._rows, self._partial, self._partial_done = [], None, 0
            self.runner.cache.truncate(0)

    def _partial_part(self) -> int:
        """Tokens of the part-prefilled prompt that the next step takes."""
        seq = self._partial
        return min(len(seq.prompt_ids) + len(seq.generated) - self._partial_done, self.max_step_prompt_tokens)

    def _step(self, admitted: list[_Sequence]) -> None:
        """One forward pass: the next token of every running sequence, the next part of a prompt prefilled in parts,
        and the prompts of ``admitted`` (the last one in part when this step's prompt tokens run out). The rows of
        sequences that ended since the last step are dropped first (each costs one row copy)."""
        partial = self._partial
        rows = self._rows + ([partial] if partial is not None else [])
        alive = [not s.done for s in rows]
        if not all(alive):  # the part-prefilled row stays last
            order = swap_remove_order(alive[:-1]) + [len(rows) - 1] if partial is not None and alive[-1] \
                else swap_remove_order(alive[:len(self._rows)])
            self.runner.cache.retain(order)
            self._rows = [rows[i] for i in order[:len(order) - (partial is not None and alive[-1])]]
            if partial is not None and not alive[-1]:
                self._partial, self._partial_done, partial = None, 0, None
        batch, budget, more = self._rows, self.max_step_prompt_tokens, None
        if partial is not None:
            take = self._partial_part()
            more = (partial.prompt_ids + partial.generated)[self._partial_done:self._partial_done + take]
            budget -= take
        prompts = []
        for seq in admitted:
            ids = seq.prompt_ids + seq.generated
            prompts.append(ids[:min(len(ids), budget)])
            budget -= len(prompts[-1])
        if not batch and more is None and not prompts:
            return
        seqs = batch + ([partial] if partial is not None else []) + admitted
        room = max(s.params.max_tokens - len(s.generated) for s in seqs) + 1
        try:
            logits = self.runner.step([s.generated[-1] for s in batch], prompts, room, more=more)
        except Exception as exc:
            log.warning("forward pass over %d requests failed (%s: %s); retrying each alone", len(seqs),
                        type(exc).__name__, exc)
            self._restep(seqs)
            return
        done, picked = list(batch), list(range(len(batch)))  # sequences whose next token this pass gives
        if partial is not None:
            self._partial_done += len(more)
            if self._partial_done == len(partial.prompt_ids) + len(partial.generated):
                done.append(partial)
                picked.append(len(batch))
                self._partial, self._partial_done = None, 0
        first = len(batch) + (partial is not None)
        for j, (seq, part) in enumerate(zip(admitted, prompts)):
            if len(part) < len(seq.prompt_ids) + len(seq.generated):  # the last admitted, joining in part
                self._partial, self._partial_done = seq, len(part)
            else:
                done.append(seq)
                picked.append(first + j)
        self._rows = done
        self._advance(done, logits[picked])

    def _restep(self, seqs: list[_Sequence]) -> None:
        """The stepping runner's retry after a failed pass: the cache is cleared and each sequence re-enters it
        alone from its prompt and generated tokens; a sequence whose own pass fails again is failed, alone."""
        self._forget_batch()
        survivors, rows = [], []
        for seq in seqs:
            if seq.done:
                continue
            try:
                logits = self.runner.step([], [seq.prompt_ids + seq.generated])
            except Exception as exc:
                log.warning("request %d failed in its own forward pass: %s: %s", seq.id, type(exc).__name__, exc)
                self._finish(seq, None, failure=MassError(f"generation failed: {type(exc).__name__}: {exc}"))
                continue
            survivors.append(seq)
            rows.append(logits[0])
        self._rows = survivors
        if survivors:
            self._advance(survivors, torch.stack(rows))

    def _decode(self) -> None:
        """One token for every running sequence in one forward pass over the batch cache."""
        batch = [s for s in self._running if not s.done]
        try:
            if [s.id for s in batch] != self._batch_ids:  # someone joined or left: re-pack once
                self._rebuild(batch)
            logits = self.runner.decode(self._state, [s.generated[-1] for s in batch], self._lens)
        except Exception as exc:  # the batch cache may be half-written: rebuild it from each row's tokens
            log.warning("decode step over %d requests failed (%s: %s); retrying each alone", len(batch),
                        type(exc).__name__, exc)
            self._batch_ids, self._state, self._lens = [], None, []
            self._recompute(batch)
            return
        self._lens = [n + 1 for n in self._lens]
        self._advance(batch, logits)

    def _recompute(self, seqs: list[_Sequence]) -> None:
        """The retry after a failed shared forward: each sequence's logits and cache recomputed alone from
        its prompt and generated tokens; a sequence whose own forward fails again is failed, alone."""
        survivors, rows = [], []
        for seq in seqs:
            try:
                logits, kv = self.runner.prefill([seq.prompt_ids + seq.generated])
            except Exception as exc:
                log.warning("request %d failed in its own forward pass: %s: %s", seq.id, type(exc).__name__, exc)
                self._finish(seq, None, failure=MassError(f"generation failed: {type(exc).__name__}: {exc}"))
                continue
            seq.cache = kv
            survivors.append(seq)
            rows.append(logits[0])
        if survivors:
            self._advance(survivors, torch.stack(rows))

    def _rebuild(self, batch: list[_Sequence]) -> None:
        """One left-padded cache for ``batch``: rows kept from the last batch, new ones from prefill."""
        old_rows = {sid: row for row, sid in enumerate(self._batch_ids)}
        kept = split_rows(self._state.filled(), self._lens) if self._state is not None else []
        caches, lens = [], []
        for seq in batch:
            if seq.id in old_rows:
                caches.append(kept[old_rows[seq.id]])
                lens.append(self._lens[old_rows[seq.id]])
            else:
                caches.append(seq.cache)
                lens.append(seq.cache[0][0].shape[2])
                seq.cache = None  # from now on it lives in the batch cache
        room = max(s.params.max_tokens - len(s.generated) for s in batch) + 1
        self._state = self.runner.start(caches, room)
        self._lens, self._batch_ids = lens, [s.id for s in batch]

    def _advance(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Choose the next token of every sequence (plain greedy rows in one argmax) and stream their text.
        Whatever fails here belongs to one sequence (its sampling, stop strings, detokenisation): that
        sequence alone is failed."""
        greedy, failed = self._greedy_tokens(seqs, logits) if any(s.params.greedy for s in seqs) else (None, {})
        for row, seq in enumerate(seqs):
            if seq.done:  # cancelled meanwhile
                continue
            try:
                if row in failed:
                    raise failed[row]
                if seq.params.greedy:
                    token = greedy[row]
                else:
                    token = sample(adjust(logits[row], seq.params, seq.generated), seq.params, seq.generator)
                self._emit_token(seq, token, logits[row])
            except Exception as exc:
                log.warning("request %d failed while choosing its next token: %s: %s", seq.id,
                            type(exc).__name__, exc, exc_info=True)
                failure = exc if isinstance(exc, MassError) else MassError(
                    f"generation failed for this request: {type(exc).__name__}: {exc}")
                self._finish(seq, None, failure=failure)

    def _greedy_tokens(self, seqs: list[_Sequence], logits: torch.Tensor) -> tuple[list[int], dict[int, Exception]]:
        """The argmax of every row in one call, after the penalties and biases of rows that have them (a bias
        alone is one cached dense row added; only penalties need per-row work); and the rows whose own
        adjustment failed, with their error."""
        adjusted = [row for row, s in enumerate(seqs) if s.params.greedy and s.params.adjusts_logits]
        if not adjusted:
            return logits.argmax(-1).tolist(), {}
        x, failed = logits.to(torch.float32, copy=True), {}
        for row in adjusted:
            seq = seqs[row]
            try:
                if seq.params.presence_penalty or seq.params.frequency_penalty:
                    x[row] = adjust(x[row], seq.params, seq.generated)
                else:
                    if seq.bias_row is None:
                        seq.bias_row = adjust(torch.zeros_like(x[row]), seq.params, [])
                    x[row] += seq.bias_row
            except Exception as exc:  # noqa: BLE001 - raised for this sequence alone in _advance
                failed[row] = exc
        return x.argmax(-1).tolist(), failed

    def _emit_token(self, seq: _Sequence, token: int, logits: torch.Tensor) -> None:
        """Record ``token`` for ``seq``, stream its new text, finish it when a stop condition holds."""
        finish = None
        if token == self.eos_id:
            finish = "stop"
        else:
            seq.generated.append(token)
            seq.unsent_ids.append(token)
            if seq.params.logprobs is not None:
                seq.unsent_logprobs.append(self._logprob_entry(logits, token, seq.params.logprobs))
            seq.text.push(token)
            if len(seq.generated) >= seq.params.max_tokens:
                finish = "length"
        delta, stopped = seq.text.release(finishing=finish is not None)
        finish = "stop" if stopped else finish
        if finish is not None:
            self._finish(seq, finish, delta=delta)
        elif delta:
            self._send(seq, TokenEvent(delta, seq.unsent_ids, None, len(seq.prompt_ids), len(seq.generated),
                                       self._take_logprobs(seq)))
            seq.unsent_ids = []

    def _logprob_entry(self, logits: torch.Tensor, token: int, k: int) -> dict:
        """``token``'s logprob, text and bytes, and the ``k`` most likely alternatives (OpenAI's shape)."""
        chosen, top = top_logprobs(logits, token, k)
        return {**self._token_text(token), "logprob": chosen,
                "top": [{**self._token_text(t), "logprob": lp} for t, lp in top]}

    def _token_text(self, token: int) -> dict:
        return token_text(self.tokenizer, token)

    @staticmethod
    def _take_logprobs(seq: _Sequence) -> list[dict] | None:
        if seq.params.logprobs is None:
            return None
        out, seq.unsent_logprobs = seq.unsent_logprobs, []
        return out

    def _finish(self, seq: _Sequence, reason: str | None, delta: str = "", failure: MassError | None = None) -> None:
        """The request's last event: its remaining text and tokens, or ``failure``."""
        seq.done = True
        ids, seq.unsent_ids = (seq.unsent_ids, []) if failure is None else ([], [])
        self._send(seq, TokenEvent(delta, ids, reason, len(seq.prompt_ids), len(seq.generated),
                                   self._take_logprobs(seq) if failure is None else None, failure=failure))

    def _send(self, seq: _Sequence, event: TokenEvent) -> None:
        self._outbox[seq.loop].append((seq.queue, event))

    def _flush(self) -> None:
        """Hand this step's events to their event loops: one wake-up per loop, not one per token."""
        outbox, self._outbox = self._outbox, defaultdict(list)
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: its requests are gone
                pass


def _deliver(items: list[tuple[asyncio.Queue, TokenEvent]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)
