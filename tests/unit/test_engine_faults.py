"""One request never fails another: innocent greedy streams decode while a poisoned request joins.

The poison is every extreme value the API admits for each sampling parameter (the attack that used to
fail the whole batch), and injected faults in one sequence's sampling or in the shared forward pass.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from mass.errors import InvalidRequest, MassError
from mass.serving.engines import llm as llm_module
from mass.serving.engines.llm import LLMEngine
from mass.serving.engines.sampling import SamplingParams, adjust, sample

INNOCENT = ["Return the", "This module provides helpers for", "A", "Create a new thread and start it, then wait",
            "The", "Raise an error", "Return a list of", "If the"]
LENGTH = 24


@pytest.fixture(scope="module")
def expected(lm):
    """What each innocent stream produces on an engine with nobody else on it."""
    engine = LLMEngine(*lm, max_running=16)
    try:
        async def run():
            return await asyncio.gather(*(engine.generate(p, SamplingParams(max_tokens=LENGTH, temperature=0))
                                          for p in INNOCENT))
        return [o.text for o in asyncio.run(run())]
    finally:
        engine.shutdown()


def attack(engine: LLMEngine, poison: SamplingParams, prompt: str = "Return the"):
    """Start the innocent streams, let them decode a few steps, then send the poisoned request.
    Returns (innocent texts, innocent finish reasons, the poisoned request's result or exception)."""
    async def innocent(prompt):
        parts, finish = [], None
        async for event in engine.stream(prompt, SamplingParams(max_tokens=LENGTH, temperature=0)):
            parts.append(event.text)
            finish = event.finish_reason
        return "".join(parts), finish

    async def run():
        tasks = [asyncio.create_task(innocent(p)) for p in INNOCENT]
        start = engine.steps
        while engine.steps < start + 3:  # they are decoding now
            await asyncio.sleep(0.001)
        try:
            poisoned = await engine.generate(prompt, poison)
        except MassError as exc:
            poisoned = exc
        return await asyncio.gather(*tasks), poisoned

    results, poisoned = asyncio.run(run())
    return [r[0] for r in results], [r[1] for r in results], poisoned


POISONS = {
    "top_p=5e-324": dict(temperature=1.0, top_p=5e-324),
    "top_p=1e-50": dict(temperature=1.0, top_p=1e-50),
    "top_p=0": dict(temperature=1.0, top_p=0.0),
    "temperature=1e-300": dict(temperature=1e-300),
    "temperature=5e-324,top_p=5e-324": dict(temperature=5e-324, top_p=5e-324),
    "temperature=2": dict(temperature=2.0),
    "seed=2**64-1": dict(temperature=1.0, seed=2**64 - 1),
    "seed=-2**63": dict(temperature=1.0, seed=-2**63),
    "presence_penalty=2": dict(temperature=1.0, presence_penalty=2.0),
    "frequency_penalty=-2,greedy": dict(temperature=0.0, frequency_penalty=-2.0),
    "logit_bias=+100": dict(temperature=1.0, logit_bias={5: 100.0}),
    "logit_bias=-100 on everything": dict(temperature=1.0, logit_bias={t: -100.0 for t in range(512)}),
    "logprobs=20": dict(temperature=1.0, logprobs=20),
    "stop=4 odd strings": dict(temperature=1.0, stop=("\ufffd", "\x00", "e", "  ")),
    "max_tokens=1": dict(max_tokens=1, temperature=1e-6),
}


@pytest.mark.parametrize("poison", list(POISONS.values()), ids=list(POISONS))
def test_no_sampling_value_can_fail_other_streams(lm, expected, poison):
    engine = LLMEngine(*lm, max_running=16)
    try:
        texts, finishes, poisoned = attack(engine, SamplingParams(**{"max_tokens": 12, **poison}))
    finally:
        engine.shutdown()
    assert texts == expected and finishes == ["length"] * len(INNOCENT)
    assert not isinstance(poisoned, Exception), poisoned  # the extreme value itself is served too
    assert 1 <= poisoned.completion_tokens <= poison.get("max_tokens", 12) or poisoned.finish_reason == "stop"


def test_a_failure_in_one_sequences_sampling_fails_that_request_alone(lm, expected, monkeypatch):
    """Whatever is left that could raise in one request's sampling (a bug, a corner we did not foresee)."""
    def faulty(logits, params, generator):
        if params.seed == 666:
            raise RuntimeError("injected sampling fault")
        return sample(logits, params, generator)

    monkeypatch.setattr(llm_module, "sample", faulty)
    engine = LLMEngine(*lm, max_running=16)
    try:
        texts, finishes, poisoned = attack(engine, SamplingParams(max_tokens=12, seed=666))
        assert engine.stats()["running"] == 0
    finally:
        engine.shutdown()
    assert texts == expected and finishes == ["length"] * len(INNOCENT)
    assert isinstance(poisoned, MassError) and "injected sampling fault" in poisoned.message


def test_a_failure_in_one_greedy_sequences_penalties_fails_that_request_alone(lm, expected, monkeypatch):
    """Greedy rows are chosen in one batched argmax; a failure adjusting one row's logits stays with it."""
    from mass.serving.engines.sampling import adjust

    def faulty(logits, params, generated):
        if params.frequency_penalty == 1.5:
            raise RuntimeError("injected penalty fault")
        return adjust(logits, params, generated)

    monkeypatch.setattr(llm_module, "adjust", faulty)
    engine = LLMEngine(*lm, max_running=16)
    try:
        texts, finishes, poisoned = attack(engine, SamplingParams(max_tokens=12, temperature=0,
                                                                  frequency_penalty=1.5))
    finally:
        engine.shutdown()
    assert texts == expected and finishes == ["length"] * len(INNOCENT)
    assert isinstance(poisoned, MassError) and "injected penalty fault" in poisoned.message


def _fail_shared_passes(engine: LLMEngine, times: int) -> list[int]:
    """Make the engine's next ``times`` forward passes over more than one sequence raise (an OOM, say), whichever
    runner it has; returns the list the failed passes' sizes are appended to."""
    failures: list[int] = []
    if engine._stepped:
        real_step = engine.runner.step

        def step(tokens, prompts, room=1, more=None):
            size = len(tokens) + len(prompts) + (more is not None)
            if len(failures) < times and size > 1:
                failures.append(size)
                raise RuntimeError("injected forward fault")
            return real_step(tokens, prompts, room, more)

        engine.runner.step = step
    else:
        real_decode = engine.runner.decode

        def decode(state, tokens, positions):
            if len(failures) < times and len(tokens) > 1:
                failures.append(len(tokens))
                raise RuntimeError("injected forward fault")
            return real_decode(state, tokens, positions)

        engine.runner.decode = decode
    return failures


def _poison_prompts(engine: LLMEngine, first_token: int) -> None:
    """Make every forward pass that holds a prompt starting with ``first_token`` raise, whichever runner."""
    if engine._stepped:
        real_step = engine.runner.step

        def step(tokens, prompts, room=1, more=None):
            if any(p[:1] == [first_token] for p in prompts):
                raise RuntimeError("injected forward fault")
            return real_step(tokens, prompts, room, more)

        engine.runner.step = step
    else:
        real_prefill = engine.runner.prefill

        def prefill(prompts):
            if any(p[:1] == [first_token] for p in prompts):
                raise RuntimeError("injected forward fault")
            return real_prefill(prompts)

        engine.runner.prefill = prefill


RUNNERS = pytest.mark.parametrize("fast", [True, False], ids=["gpt2-runner", "hf-runner"])


@RUNNERS
def test_a_failed_shared_forward_is_retried_per_sequence(lm, expected, fast):
    """The batch's forward pass fails twice (an OOM, say): every sequence is recomputed alone and completes."""
    engine = LLMEngine(*lm, max_running=16, fast=fast)
    failures = _fail_shared_passes(engine, 2)
    try:
        texts, finishes, poisoned = attack(engine, SamplingParams(max_tokens=12, temperature=0))
    finally:
        engine.shutdown()
    assert failures and texts == expected and finishes == ["length"] * len(INNOCENT)
    assert poisoned.completion_tokens == 12


@RUNNERS
def test_a_sequence_whose_own_forward_fails_is_failed_alone(lm, expected, fast):
    """A prompt that breaks the forward pass whatever batch it is in: only its request fails."""
    engine = LLMEngine(*lm, max_running=16, fast=fast)
    _poison_prompts(engine, engine.encode("zzz")[0])
    try:
        texts, finishes, poisoned = attack(engine, SamplingParams(max_tokens=12, temperature=0), prompt="zzz")
    finally:
        engine.shutdown()
    assert texts == expected and finishes == ["length"] * len(INNOCENT)
    assert isinstance(poisoned, MassError) and "injected forward fault" in poisoned.message


@pytest.mark.parametrize("fields, param", [
    (dict(top_p=1.5), "top_p"), (dict(top_p=-1e-9), "top_p"), (dict(temperature=2.01), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(seed=2**64), "seed"), (dict(seed=-2**63 - 1), "seed"), (dict(seed=1.5), "seed"),
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=True), "max_tokens"),
    (dict(stop=("a", "b", "c", "d", "e")), "stop"), (dict(stop=("",)), "stop"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(logit_bias={"x": 1}), "logit_bias"), (dict(logit_bias={5: 101}), "logit_bias"),
    (dict(logit_bias={-1: 1}), "logit_bias"), (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs"),
])
def test_out_of_range_values_are_refused_where_params_are_built(fields, param):
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**fields)
    assert info.value.details["param"] == param and param in info.value.message


def test_the_engine_refuses_token_ids_outside_its_vocabulary(lm):
    engine = LLMEngine(*lm, max_running=2)
    try:
        with pytest.raises(InvalidRequest, match="outside this model's vocabulary"):
            asyncio.run(engine.generate([1, 2, engine.vocab_size], SamplingParams(max_tokens=2)))
        with pytest.raises(InvalidRequest, match="logit_bias token id 9999"):
            asyncio.run(engine.generate("A", SamplingParams(max_tokens=2, logit_bias={9999: 1})))
    finally:
        engine.shutdown()


def test_sampler_stays_finite_and_keeps_the_most_likely_token():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    gen = torch.Generator().manual_seed(0)
    for top_p in (5e-324, 1e-50, 1e-8):
        assert {sample(logits, SamplingParams(top_p=top_p), gen) for _ in range(20)} == {1}
    assert sample(logits, SamplingParams(temperature=1e-300), gen) == 1
    nan = torch.tensor([float("nan"), 1.0, float("nan"), 0.0])
    assert sample(nan, SamplingParams(), gen) == 1


def test_penalties_and_biases_follow_openais_formula():
    logits = torch.zeros(5)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={4: 3.0})
    out = adjust(logits, params, [1, 1, 2])
    torch.testing.assert_close(out, torch.tensor([0.0, -1.0, -0.75, 0.0, 3.0]))
    assert adjust(logits, SamplingParams(), [1]) is logits  # nothing to adjust: no copy


def test_choices_get_distinct_seeds_that_wrap_in_64_bits():
    p = SamplingParams(seed=2**64 - 1)
    assert [p.for_choice(i).seed for i in range(3)] == [2**64 - 1, 0, 1]
    assert SamplingParams(seed=None).for_choice(2).seed is None
