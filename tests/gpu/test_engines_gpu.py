"""The serving engines on CUDA: both LLM runners (fp32, bf16, nf4) against HF ``generate`` on the same GPU
model, with requests joining mid-decode; MiniLM embeddings on the GPU against the CPU."""

import asyncio

import pytest
import torch

from mass.serving.engines.llm import LLMEngine
from mass.serving.engines.sampling import SamplingParams

PROMPTS = ["Return the", "This module provides helpers for", "A", "Create a new thread and start it, then wait"]


def _reference(model, tok, prompt: str, n: int) -> str:
    ids = tok(prompt, return_tensors="pt")["input_ids"].to(model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("dtype,quantization,runner", [
    ("float32", "none", "GPT2Runner"), ("bfloat16", "none", "GPT2Runner"), ("auto", "nf4", "HFRunner")])
def test_llm_engine_on_cuda_matches_hf_generate(saved_lm, dtype, quantization, runner):
    from mass.models import load_hf_dir

    model, tok = load_hf_dir(saved_lm, "text-generation", dtype=dtype, quantization=quantization, device="cuda")
    assert model.device.type == "cuda"
    engine = LLMEngine(model, tok, max_running=8)
    try:
        assert type(engine.runner).__name__ == runner

        async def run():
            tasks = []
            for i, prompt in enumerate(PROMPTS):  # each joins while the earlier ones are mid-decode
                tasks.append(asyncio.create_task(engine.generate(prompt, SamplingParams(max_tokens=8 + 4 * i,
                                                                                       temperature=0))))
                await asyncio.sleep(0.01)
            return await asyncio.gather(*tasks)

        outs = asyncio.run(run())
        for i, (prompt, out) in enumerate(zip(PROMPTS, outs)):
            expected = _reference(model, tok, prompt, 8 + 4 * i)
            if dtype == "bfloat16":  # batched bf16 may round differently from one-by-one: compare the start
                assert out.text[:8] == expected[:8], prompt
            else:
                assert out.text == expected, prompt
    finally:
        engine.shutdown()


def test_minilm_embeddings_on_cuda_match_the_cpu():
    from transformers import AutoModel, AutoTokenizer

    from mass.registry.imports import minilm_dir
    from mass.serving.engines.embedding import EmbeddingEngine

    path, texts = minilm_dir(), ["a cat sits on the mat", "quarterly tax filing", "serving models on Ray"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    cpu, _ = EmbeddingEngine(AutoModel.from_pretrained(path), tokenizer).embed(texts)
    gpu, _ = EmbeddingEngine(AutoModel.from_pretrained(path).to("cuda"), tokenizer).embed(texts)
    torch.testing.assert_close(torch.tensor(gpu), torch.tensor(cpu), atol=1e-3, rtol=1e-3)
