"""``dtype: auto``: the weight dtype a served model runs in, chosen where it measured faster and checked at load.

On hardware with native bf16 (a CPU with AVX-512 BF16 or AMX, a CUDA GPU that supports it) ``auto`` tries bf16
where it measured faster than fp32, and keeps it only when the bf16 model agrees with the fp32 one on a few
probe inputs (embedding cosine, greedy tokens); otherwise the model runs as saved. What was chosen, and why,
is logged and reported by the deployment's ``describe()``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

PROBE_TEXTS = ["Return the value of the parser.", "a cat sits on the mat", "quarterly tax filing deadline",
               "Create a new thread and start it, then wait for it to finish.", "hello"]
MIN_COSINE = 0.999  # embeddings: the lowest probe cosine to the fp32 vectors that keeps bf16
GREEDY_TOKENS = 8  # causal LMs: every probe's first greedy tokens must equal fp32's


@dataclass(frozen=True)
class Precision:
    """The dtype a model is served in, and why."""

    dtype: str
    reason: str


def weight_dtype(model) -> str:
    """The dtype name of ``model``'s floating-point weights ("int8" for a model without any)."""
    for param in model.parameters():
        if param.is_floating_point():
            return str(param.dtype).removeprefix("torch.")
    return "int8"


def candidate(engine: str, device_type: str) -> tuple[bool, str]:
    """Whether ``auto`` tries bf16 for ``engine`` ("llm" or "embedding") on ``device_type``, and why (not)."""
    from mass.hardware import native_bf16

    if not native_bf16(device_type):
        return False, f"no native bf16 on this {device_type.upper()}"
    if device_type == "cuda" or engine == "embedding":
        return True, "native bf16"
    # benchmarks/llm_engines.py on an AVX-512 BF16 CPU without AMX: bf16 GEMMs over many rows (prefill) ran
    # at about 60 % of fp32's speed, and the 4x256 GPT decoded slower in bf16; only decode-bound loads on the
    # larger shapes gained, so a causal LM stays in fp32 on CPUs.
    return False, "bf16 measured slower than fp32 for the LLM engine on CPUs (benchmarks/llm_engines.py)"


def choose(model, tokenizer, engine: str, device_type: str = "cpu") -> tuple[object, Precision]:
    """``dtype: auto`` for a model loaded as saved: the model to serve (a bf16 copy, or ``model`` itself) and
    the ``Precision`` chosen. bf16 is kept only when the parity check on the probe inputs passes."""
    saved = weight_dtype(model)
    if saved != "float32":
        return model, Precision(saved, "auto: kept as saved (not fp32)")
    worth, why = candidate(engine, device_type)
    if not worth:
        return model, Precision("float32", f"auto: {why}")
    from mass.threads import on_fresh_thread

    # on a thread that ends: the check's OpenMP team ends with it, and the engine's compute thread stays the
    # only one in the process that owns a team (two teams slow every parallel region)
    trial, ok, figure = on_fresh_thread(_try_bf16, model, tokenizer, engine)
    if not ok:
        log.warning("dtype auto: the bf16 copy failed the parity check (%s); serving fp32", figure)
        return model, Precision("float32", f"auto: bf16 failed the parity check ({figure})")
    return trial, Precision("bfloat16", f"auto: {why}, parity with fp32 ({figure})")


def _try_bf16(model, tokenizer, engine: str):
    """A bf16 copy of ``model``, whether it passes the parity check, and the check's figure."""
    trial = copy.deepcopy(model).to(torch.bfloat16)
    return (trial, *_parity(model, trial, tokenizer, engine))


def _parity(reference, trial, tokenizer, engine: str) -> tuple[bool, str]:
    """Whether ``trial`` answers the probes as ``reference`` does, and the figure that says so."""
    with torch.inference_mode():
        if engine == "embedding":
            from mass.serving.engines.embedding import EmbeddingEngine  # the vectors the engine would serve

            vectors = [torch.tensor(EmbeddingEngine(m, tokenizer).embed(PROBE_TEXTS)[0]) for m in (reference, trial)]
            cosines = torch.nn.functional.cosine_similarity(*vectors)
            low = float(cosines.min())
            return low >= MIN_COSINE, f"lowest probe cosine {low:.4f}, needs >= {MIN_COSINE}"
        same = sum(_greedy(reference, tokenizer, text) == _greedy(trial, tokenizer, text) for text in PROBE_TEXTS)
        return same == len(PROBE_TEXTS), f"greedy tokens equal on {same} of {len(PROBE_TEXTS)} probes"


def _greedy(model, tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()
