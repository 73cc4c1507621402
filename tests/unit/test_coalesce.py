"""The gateway's request coalescer: concurrent embedding requests share upstream calls, each caller gets
exactly its own vectors and token count, failures reach every caller of the batch."""

import asyncio

import pytest

from mass.errors import Overloaded
from mass.gateway.coalesce import Coalescer


class Upstream:
    """Stands in for the model deployment: vector = [len(text)], tokens = words; records every call."""

    def __init__(self, delay: float = 0.02, fail: BaseException | None = None, answer_error: bool = False):
        self.calls: list[list[str]] = []
        self.delay, self.fail, self.answer_error = delay, fail, answer_error

    async def __call__(self, texts: list[str]) -> dict:
        self.calls.append(list(texts))
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        if self.answer_error:
            return {"error": {"code": "invalid_value", "message": "bad text"}}
        return {"data": [[float(len(t))] for t in texts], "tokens": [len(t.split()) for t in texts]}


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_calls_and_get_their_own_slices():
    up = Upstream()
    requests = [[f"text {i}"] * (1 + i % 3) + [f"extra words for {i}"] for i in range(20)]

    async def main():
        c = Coalescer(up, max_texts=16, wait_s=0.01)
        return await asyncio.gather(*(c.submit(texts) for texts in requests))

    answers = run(main())
    for texts, answer in zip(requests, answers):
        assert answer["data"] == [[float(len(t))] for t in texts]
        assert answer["prompt_tokens"] == sum(len(t.split()) for t in texts)
    assert len(up.calls) < len(requests)  # merged
    assert all(len(call) <= 16 for call in up.calls)  # bounded by max_texts
    assert sorted(t for call in up.calls for t in call) == sorted(t for texts in requests for t in texts)


def test_an_idle_model_gets_the_request_at_once_and_a_full_request_goes_alone():
    up = Upstream(delay=0.0)

    async def main():
        c = Coalescer(up, max_texts=4, wait_s=5.0)  # a long window that must never be waited out
        loop = asyncio.get_running_loop()
        start = loop.time()
        lone = await c.submit(["one"])
        big = await c.submit(["a", "b", "c", "d", "e"])
        return lone, big, loop.time() - start

    lone, big, elapsed = run(main())
    assert lone["data"] == [[3.0]] and len(big["data"]) == 5
    assert up.calls == [["one"], ["a", "b", "c", "d", "e"]] and elapsed < 1.0


def test_max_texts_one_never_merges():
    up = Upstream()

    async def main():
        c = Coalescer(up, max_texts=1, wait_s=0.01)
        return await asyncio.gather(*(c.submit([f"t{i}"]) for i in range(6)))

    run(main())
    assert len(up.calls) == 6


@pytest.mark.parametrize("fail", [Overloaded("model 'm' is at capacity", retry_after=1), asyncio.TimeoutError()])
def test_a_failed_call_fails_every_caller_in_it(fail):
    up = Upstream(fail=fail)

    async def main():
        c = Coalescer(up, max_texts=8, wait_s=0.01)
        return await asyncio.gather(*(c.submit([f"t{i}"]) for i in range(5)), return_exceptions=True)

    results = run(main())
    assert all(isinstance(r, type(fail)) for r in results), results


def test_an_error_answer_reaches_every_caller():
    up = Upstream(answer_error=True)

    async def main():
        c = Coalescer(up, max_texts=8, wait_s=0.01)
        return await asyncio.gather(*(c.submit([f"t{i}"]) for i in range(3)))

    assert all(r == {"error": {"code": "invalid_value", "message": "bad text"}} for r in run(main()))


def test_a_caller_that_gives_up_does_not_disturb_the_others():
    up = Upstream(delay=0.05)

    async def main():
        c = Coalescer(up, max_texts=8, wait_s=0.01)
        first = asyncio.create_task(c.submit(["warm"]))  # in flight: the next ones are batched
        await asyncio.sleep(0)
        quitter = asyncio.create_task(c.submit(["gone"]))
        stayer = asyncio.create_task(c.submit(["stays here"]))
        await asyncio.sleep(0.005)
        quitter.cancel()
        return await first, await stayer, quitter

    first, stayer, quitter = run(main())
    assert quitter.cancelled() and first["data"] == [[4.0]]
    assert stayer == {"data": [[10.0]], "prompt_tokens": 2}
