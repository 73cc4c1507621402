"""bitsandbytes copies made on the CPU (as the compression job makes them) reload quantized on CUDA: the GPU
kernels compute what the CPU's do, and the LLM engine decodes the copy on the GPU as HF ``generate`` does."""

import asyncio

import pytest
import torch


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_cpu_made_bitsandbytes_copy_serves_on_cuda(saved_lm, tmp_path, kind):
    from mass.compression.bnb import quantize_dir
    from mass.models import load_bnb_dir
    from mass.serving.engines.llm import LLMEngine
    from mass.serving.engines.sampling import SamplingParams

    out = quantize_dir(saved_lm, saved_lm, tmp_path / kind, kind, task="text-generation")
    cpu, tok = load_bnb_dir(out, out / "tokenizer", "m/1", task="text-generation")
    gpu, _ = load_bnb_dir(out, out / "tokenizer", "m/1", device="cuda", task="text-generation")
    assert gpu.device.type == "cuda"
    assert type(gpu.transformer.h[0].attn.c_attn).__name__ == ("Linear4bit" if kind == "nf4" else "Linear8bitLt")
    ids = torch.randint(0, len(tok), (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = cpu(ids).logits.float(), gpu(ids.cuda()).logits.float().cpu()
    print(f"{kind}: max |logit difference| GPU vs CPU {float((got - want).abs().max()):.2e}, "
          f"logit scale {float(want.abs().max()):.2f}")
    assert float((got - want).abs().max()) < 0.05 * float(want.abs().max())
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95

    prompt = "Return the"
    ref = gpu.generate(tok(prompt, return_tensors="pt")["input_ids"].cuda(), max_new_tokens=12, do_sample=False,
                       pad_token_id=tok.eos_token_id)
    engine = LLMEngine(gpu, tok, max_running=4)
    try:
        result = asyncio.run(engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0)))
    finally:
        engine.shutdown()
    n = tok(prompt, return_tensors="pt")["input_ids"].shape[1]
    assert result.text == tok.decode(ref[0, n:], skip_special_tokens=True)
