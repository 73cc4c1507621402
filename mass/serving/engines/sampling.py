"""The per-sequence token sampler: penalties and biases, temperature, top-p, seeded generators, logprobs.

It stays finite for every value ``SamplingParams`` admits (tiny ``top_p`` keeps the most likely token,
near-zero temperatures decode greedily, penalties and biases are bounded).
"""

from __future__ import annotations

import math

import torch

from mass.sampling import LOGPROB_FLOOR, SamplingParams

__all__ = ["SamplingParams", "adjust", "make_generator", "sample", "top_logprobs"]


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded from ``seed`` (any 64-bit integer), or from fresh entropy."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def adjust(logits: torch.Tensor, params: SamplingParams, generated: list[int]) -> torch.Tensor:
    """One row of logits with the frequency/presence penalties of ``generated`` and the logit biases
    applied (float32; unchanged when the params adjust nothing)."""
    if not params.adjusts_logits:
        return logits
    out = logits.float().clone()
    if generated and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(generated, device=out.device), minlength=out.shape[-1])
        counts = counts[:out.shape[-1]].to(out.dtype)
        out -= counts * params.frequency_penalty + (counts > 0).to(out.dtype) * params.presence_penalty
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=out.device)
        out[ids] += torch.tensor(list(params.logit_bias.values()), device=out.device, dtype=out.dtype)
    return out


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token id from one row of (already adjusted) logits; finite for every valid params."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(probs, dim=-1) - probs < params.top_p
        keep[0] = True  # the most likely token stays, however small top_p is (5e-324 rounds to 0 in float32)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    else:
        order = None
    total = probs.sum()
    if not torch.isfinite(total) or total <= 0:  # NaN/inf logits from the model: fall back to the argmax
        return int(torch.argmax(torch.nan_to_num(logits.float(), nan=-math.inf)))
    choice = int(torch.multinomial(probs.cpu() / total.cpu(), 1, generator=generator))
    return int(order[choice]) if order is not None else choice


def top_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """``token``'s log-probability under one row of raw logits, and the ``k`` most likely (id, logprob)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    logp = logp.clamp(min=LOGPROB_FLOOR)  # -inf is not JSON; OpenAI reports -9999 for "impossible"
    chosen = float(logp[token])
    if k <= 0:
        return chosen, []
    values, ids = torch.topk(logp, min(k, logp.shape[-1]))
    return chosen, list(zip(ids.tolist(), values.tolist()))
