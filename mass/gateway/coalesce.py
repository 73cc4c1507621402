"""Merge concurrent embedding requests for one model into one upstream call (one Ray RPC per batch, not per
request); each caller gets back its own slice. The model's ``batch`` settings bound it, as in the replica.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

Send = Callable[[list[Any]], Awaitable[dict[str, Any]]]  # inputs: texts or token-id lists


class Coalescer:
    """Batches ``submit(texts)`` calls made within ``wait_s`` of each other, up to ``max_texts`` texts.

    A batch goes out when it is full, when ``wait_s`` has passed since its first request, or at once when
    no batch is in flight (an idle model adds no latency). ``send`` gets the merged texts and returns the
    model's answer: ``{"data": vectors, "tokens": per-text token counts}`` or ``{"error": ...}``; every
    caller of a failed batch gets the same error or exception.
    """

    def __init__(self, send: Send, max_texts: int, wait_s: float) -> None:
        self.send, self.max_texts, self.wait_s = send, max_texts, wait_s
        self._pending: list[tuple[list[Any], asyncio.Future]] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._in_flight = 0

    async def submit(self, texts: list[Any]) -> dict[str, Any]:
        """The model's answer for ``texts`` alone: ``{"data", "prompt_tokens"}`` or ``{"error"}``."""
        if len(texts) >= self.max_texts:  # a full batch by itself: straight through
            self._in_flight += 1
            return _own(await self._call(texts), 0, len(texts))
        if self._size + len(texts) > self.max_texts:
            self._flush()
        future = asyncio.get_running_loop().create_future()
        self._pending.append((texts, future))
        self._size += len(texts)
        if self._size >= self.max_texts or self._in_flight == 0 or self.wait_s == 0:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.wait_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        batch, self._pending, self._size = self._pending, [], 0
        self._in_flight += 1  # counted now, so requests arriving before the task starts wait for it
        asyncio.get_running_loop().create_task(self._run(batch))

    async def _call(self, texts: list[Any]) -> dict[str, Any]:
        try:
            return await self.send(texts)
        finally:
            self._in_flight -= 1

    async def _run(self, batch: list[tuple[list[Any], asyncio.Future]]) -> None:
        try:
            answer = await self._call([text for texts, _ in batch for text in texts])
        except BaseException as exc:  # noqa: BLE001 - handed to every caller, who raises it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for texts, future in batch:
            if not future.done():  # a caller that gave up (client gone) no longer waits
                future.set_result(_own(answer, start, start + len(texts)))
            start += len(texts)


def _own(answer: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    if "error" in answer:
        return answer
    return {"data": answer["data"][start:end], "prompt_tokens": sum(answer["tokens"][start:end])}
