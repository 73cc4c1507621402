"""The continuous-batching engine against HF ``generate`` on a real (randomly initialised) GPT-2."""

from __future__ import annotations

import asyncio

import pytest
import torch

from mass.errors import InvalidRequest
from mass.serving.engines.llm import LLMEngine
from mass.serving.engines.sampling import SamplingParams

PROMPTS = ["Return the", "This module provides helpers for", "A", "Create a new thread and start it, then wait"]


@pytest.fixture
def engine(lm):
    eng = LLMEngine(*lm, max_running=8)
    yield eng
    eng.shutdown()


def reference(lm, prompt: str, n: int) -> str:
    model, tok = lm
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("step_tokens", [512, 3], ids=["whole-prompts", "prompts-in-parts"])
def test_staggered_greedy_batch_matches_one_by_one_generate(lm, step_tokens):
    """Requests joining mid-decode produce HF's greedy text; with 3 prompt tokens a step, every longer prompt
    is prefilled in parts while the others decode."""
    engine = LLMEngine(*lm, max_running=8, max_step_prompt_tokens=step_tokens)
    try:
        _staggered_matches_generate(engine, lm)
    finally:
        engine.shutdown()


def _staggered_matches_generate(engine, lm):
    async def run():
        tasks = []
        for i, prompt in enumerate(PROMPTS):  # each arrives while the earlier ones are mid-decode
            tasks.append(asyncio.create_task(engine.generate(prompt, SamplingParams(max_tokens=10 + 7 * i,
                                                                                   temperature=0))))
            await asyncio.sleep(0.01)
        return await asyncio.gather(*tasks)

    outs = asyncio.run(run())
    for i, (prompt, out) in enumerate(zip(PROMPTS, outs)):
        assert out.text == reference(lm, prompt, 10 + 7 * i), prompt
        assert out.finish_reason in ("length", "stop") and out.prompt_tokens == len(lm[1](prompt)["input_ids"])
    assert engine.stats() == {"waiting": 0, "running": 0, "steps": engine.steps}


def test_streaming_deltas_join_to_the_full_text(engine):
    async def run():
        parts = [ev async for ev in engine.stream("Return the", SamplingParams(max_tokens=24, temperature=0))]
        return parts, await engine.generate("Return the", SamplingParams(max_tokens=24, temperature=0))

    parts, whole = asyncio.run(run())
    assert len(parts) > 3 and "".join(p.text for p in parts) == whole.text
    assert [p.finish_reason for p in parts][-1] == "length" and all(p.finish_reason is None for p in parts[:-1])
    assert parts[-1].completion_tokens == 24


def test_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7)

    async def run():
        return await asyncio.gather(engine.generate("A", params), engine.generate("A", params),
                                    engine.generate("A", SamplingParams(max_tokens=20, seed=8)))

    a, b, c = asyncio.run(run())
    assert a.text == b.text and a.text != c.text


def test_stop_strings_end_generation_and_never_stream(engine, lm):
    full = reference(lm, "Return the", 30)
    stop = full[10:14]
    assert stop.strip(), full

    async def run():
        return [ev async for ev in engine.stream("Return the", SamplingParams(max_tokens=30, temperature=0,
                                                                              stop=(stop,)))]

    events = asyncio.run(run())
    text = "".join(e.text for e in events)
    assert text == full[: full.find(stop)] and events[-1].finish_reason == "stop"


def test_requests_that_cannot_fit_are_rejected_naming_the_limit(engine):
    with pytest.raises(InvalidRequest, match="exceeds the model's context of 128 tokens"):
        asyncio.run(engine.generate("word " * 100, SamplingParams(max_tokens=64)))
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        asyncio.run(engine.generate("", SamplingParams()))


def test_cancelled_stream_frees_its_slot(lm):
    engine = LLMEngine(*lm, max_running=1)
    try:
        async def run():
            stream = engine.stream("Return the", SamplingParams(max_tokens=100, temperature=0))
            await stream.__anext__()             # it holds the only slot now
            await stream.aclose()                # the client went away
            return await asyncio.wait_for(engine.generate("A", SamplingParams(max_tokens=5, temperature=0)), 30)

        out = asyncio.run(run())
        assert out.completion_tokens == 5 or out.finish_reason == "stop"
        assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0
    finally:
        engine.shutdown()


def test_running_batch_is_capped(lm):
    engine = LLMEngine(*lm, max_running=2)
    seen = []
    try:
        async def run():
            tasks = [asyncio.create_task(engine.generate(p, SamplingParams(max_tokens=30, temperature=0)))
                     for p in PROMPTS]
            while not all(t.done() for t in tasks):
                seen.append(engine.stats())
                await asyncio.sleep(0.002)
            return await asyncio.gather(*tasks)

        outs = asyncio.run(run())
        assert max(s["running"] for s in seen) <= 2 and max(s["waiting"] for s in seen) >= 1
        assert all(o.completion_tokens > 0 for o in outs)
    finally:
        engine.shutdown()


def test_hf_runner_logits_match_the_hf_forward(lm):
    """Batched left-padded prefill + decode steps give the logits of running each sequence alone."""
    from mass.serving.engines.runners import HFRunner, make_runner, split_rows

    model, tok = lm
    runner = make_runner(model, fast=False)
    assert isinstance(runner, HFRunner)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    nxt = [[5, 9, 11], [7, 3, 2], [1, 1, 4], [8, 6, 10]]
    with torch.inference_mode():
        logits, kv = runner.prefill(prompts)
        state = runner.start(split_rows(kv, [len(p) for p in prompts]), room=1)
        steps = [logits]
        for step in range(3):
            steps.append(runner.decode(state, [n[step] for n in nxt], [len(p) + step for p in prompts]))
        for row, prompt in enumerate(prompts):
            alone = model(input_ids=torch.tensor([prompt + nxt[row]])).logits[0, len(prompt) - 1:]
            got = torch.stack([s[row] for s in steps])
            torch.testing.assert_close(got, alone, atol=1e-4, rtol=1e-4)


def test_gpt2_runner_steps_match_the_hf_forward(lm):
    """Mixed steps (rows decoding while prompts join), rows leaving (swap-remove) and the cache growing in rows
    and columns: every logit row is the HF forward of that sequence alone."""
    from mass.serving.engines.gpt2 import GPT2Runner, swap_remove_order

    model, tok = lm
    runner = GPT2Runner(model, max_rows=8)
    seqs = [tok(p)["input_ids"] for p in PROMPTS] + [list(range(5, 90))]  # the last outgrows 64 columns
    rows: list[list[int]] = []  # each cached row's tokens

    def check(logits, expect_rows):
        for got, tokens in zip(logits, expect_rows):
            alone = model(input_ids=torch.tensor([tokens])).logits[0, -1]
            torch.testing.assert_close(got, alone, atol=1e-4, rtol=1e-4)

    with torch.inference_mode():
        check(runner.step([], seqs[:2]), seqs[:2])  # two prompts, nothing cached yet
        rows = [list(s) for s in seqs[:2]]
        for step, joining in enumerate([[seqs[2]], [], [seqs[3], seqs[4]], []]):
            nxt = [(7 * step + r) % 50 + 3 for r in range(len(rows))]
            logits = runner.step(nxt, joining)
            rows = [r + [t] for r, t in zip(rows, nxt)] + [list(p) for p in joining]
            check(logits, rows)
            assert runner.cache.lens == [len(r) for r in rows]
        order = swap_remove_order([True, False, True, False, True])  # rows 1 and 3 leave
        assert order == [0, 4, 2]
        runner.cache.retain(order)
        rows = [rows[i] for i in order]
        nxt = [11, 12, 13]
        check(runner.step(nxt, [seqs[1]]), [r + [t] for r, t in zip(rows, nxt)] + [seqs[1]])
        rows = [r + [t] for r, t in zip(rows, nxt)] + [list(seqs[1])]
        assert runner.cache.kv[0][0].shape[:1] == (8,) and runner.cache.kv[0][0].shape[2] >= 90
        long = list(range(100, 140))  # joins in parts while the rows decode
        check(runner.step([1, 2, 3, 4], [long[:15]]), [r + [t] for r, t in zip(rows, [1, 2, 3, 4])] + [long[:15]])
        rows = [r + [t] for r, t in zip(rows, [1, 2, 3, 4])]
        check(runner.step([5, 6, 7, 8], [], more=long[15:30]), [r + [t] for r, t in zip(rows, [5, 6, 7, 8])]
              + [long[:30]])
        rows = [r + [t] for r, t in zip(rows, [5, 6, 7, 8])]
        check(runner.step([9, 10, 11, 12], [seqs[0]], more=long[30:]),
              [r + [t] for r, t in zip(rows, [9, 10, 11, 12])] + [long, seqs[0]])
        assert runner.cache.lens == [len(r) + 1 for r in rows] + [len(long), len(seqs[0])]


def test_a_failed_pass_leaves_the_rows_as_they_were(lm):
    """A step that raises midway (after writing some keys) changes no row's length: the engine can go on."""
    from mass.serving.engines.gpt2 import GPT2Runner

    model, tok = lm
    runner = GPT2Runner(model, max_rows=4)
    prompt = tok(PROMPTS[1])["input_ids"]
    def boom(x):
        raise RuntimeError("injected fault in layer 1")

    with torch.inference_mode():
        runner.step([], [prompt])
        blocks = list(runner.blocks)
        runner.blocks[1] = blocks[1]._replace(proj=boom)  # layer 0 has written its keys by then
        with pytest.raises(RuntimeError, match="injected"):
            runner.step([3], [[8, 9]])
        runner.blocks[:] = blocks
        assert runner.cache.lens == [len(prompt)]
        got = runner.step([3], [])
        torch.testing.assert_close(got[0], model(input_ids=torch.tensor([prompt + [3]])).logits[0, -1],
                                   atol=1e-4, rtol=1e-4)


def test_generic_runner_matches_generate(lm):
    engine = LLMEngine(*lm, max_running=8, fast=False)
    try:
        async def run():
            tasks = []
            for i, prompt in enumerate(PROMPTS):
                tasks.append(asyncio.create_task(engine.generate(prompt, SamplingParams(max_tokens=8 + 5 * i,
                                                                                       temperature=0))))
                await asyncio.sleep(0.01)
            return await asyncio.gather(*tasks)

        for i, (prompt, out) in enumerate(zip(PROMPTS, asyncio.run(run()))):
            assert out.text == reference(lm, prompt, 8 + 5 * i), prompt
            assert len(out.token_ids) == out.completion_tokens
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def saved_lm(lm, tmp_path_factory):
    path = tmp_path_factory.mktemp("lm")
    lm[0].save_pretrained(path)
    lm[1].save_pretrained(path)
    return path


def test_bf16_weights_run_on_the_fast_path(saved_lm, lm):
    from mass.models import load_hf_dir
    from mass.serving.engines.gpt2 import GPT2Runner

    model, tok = load_hf_dir(saved_lm, "text-generation", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    engine = LLMEngine(model, tok, max_running=4)
    try:
        assert isinstance(engine.runner, GPT2Runner)
        with torch.inference_mode():
            ids = tok(PROMPTS[1])["input_ids"]
            logits = engine.runner.step([], [ids])
            ref = model(input_ids=torch.tensor([ids])).logits[0, -1]
        assert logits.dtype == torch.bfloat16
        torch.testing.assert_close(logits[0].float(), ref.float(), atol=0.05, rtol=0.05)
        out = asyncio.run(engine.generate(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0)))
        assert out.completion_tokens == 12 or out.finish_reason == "stop"
    finally:
        engine.shutdown()


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_bitsandbytes_quantized_weights_generate_like_hf(saved_lm, quantization):
    """A bitsandbytes-quantized model goes through the generic runner and matches its own HF generate."""
    from mass.models import load_hf_dir
    from mass.serving.engines.runners import HFRunner

    model, tok = load_hf_dir(saved_lm, "text-generation", quantization=quantization)
    layer = type(model.transformer.h[0].attn.c_attn).__name__
    assert layer == {"int8": "Linear8bitLt", "nf4": "Linear4bit"}[quantization], layer
    engine = LLMEngine(model, tok, max_running=4)
    try:
        assert isinstance(engine.runner, HFRunner)
        out = asyncio.run(engine.generate(PROMPTS[1], SamplingParams(max_tokens=10, temperature=0)))
        assert out.text == reference((model, tok), PROMPTS[1], 10)
    finally:
        engine.shutdown()
