"""``VLLMEngine``: vLLM's ``AsyncLLM`` behind the interface of MASS's LLM engine (encode, check, stream, generate,
stats), for ``engine: vllm`` models. It loads in vLLM's venv only (``make vllm``): Ray starts those replicas with
that venv's Python (``mass.serving.vllm_env``), so nothing of vLLM enters MASS's base install."""

from __future__ import annotations

import itertools
from typing import Any, AsyncIterator

from mass.errors import InvalidRequest, MassError
from mass.sampling import LOGPROB_FLOOR, SamplingParams
from mass.serving.engines.events import TokenEvent, check_request, check_resume, joined, token_text

GIB = 1 << 30


class VLLMEngine:
    """One vLLM engine serving a causal LM from an HF directory (its engine core runs in a child process).

    Args:
        model_dir: the HF model directory (config, safetensors and the tokenizer's files).
        dtype: ``auto`` (vLLM's choice) or a torch dtype name.
        max_running: sequences decoded together (vLLM's ``max_num_seqs``).
        kv_cache_gb: KV cache size on CPU (on GPUs vLLM sizes it from ``gpu_memory_utilization``).
        device: ``cpu`` or ``cuda``.
        engine_args: more ``AsyncEngineArgs``, as they are.
    """

    def __init__(self, model_dir: str, dtype: str = "auto", max_running: int = 16,
                 kv_cache_gb: float = 1.0, device: str = "cpu", engine_args: dict[str, Any] | None = None) -> None:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        options: dict[str, Any] = {"model": model_dir, "tokenizer": model_dir, "dtype": dtype,
                                   "max_num_seqs": max_running, "seed": 0}
        if device == "cpu":
            options["kv_cache_memory_bytes"] = int(kv_cache_gb * GIB)
        options.update(engine_args or {})
        try:
            engine_options = AsyncEngineArgs(**options)
        except TypeError as exc:
            raise InvalidRequest(f"vllm.engine_args: {exc} (see vLLM's AsyncEngineArgs)", field="vllm") from exc
        self.engine = AsyncLLM.from_engine_args(engine_options)
        config = self.engine.model_config
        self.context_length = int(config.max_model_len)
        self.max_batch_tokens = self.context_length  # one request's room; vLLM's KV budget is kv_cache_gb
        self.vocab_size = int(config.get_vocab_size())
        self.dtype = str(config.dtype).removeprefix("torch.")
        self.eos_id = self.tokenizer.eos_token_id
        self._ids = itertools.count(1)
        self._in_flight = 0
        self.requests = 0

    # ------------------------------------------------------------ requests
    def encode(self, prompt: str) -> list[int]:
        """Prompt text -> token ids (no special tokens added), as MASS's engine encodes."""
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest when a request can never fit the model (the same rules as MASS's engine)."""
        check_request(prompt_ids, params, self.vocab_size, self.context_length)

    def check_resume(self, generated: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest unless ``generated`` can be the start of a ``params`` request's output."""
        check_resume(generated, params, self.vocab_size)

    def _sampling(self, params: SamplingParams, done: int):
        """vLLM's sampling parameters for ``params``, ``done`` tokens already generated (a resumed request)."""
        from vllm import SamplingParams as VLLMParams
        from vllm.sampling_params import RequestOutputKind

        greedy = params.greedy
        return VLLMParams(max_tokens=params.max_tokens - done, temperature=0.0 if greedy else params.temperature,
                          top_p=1.0 if greedy else params.top_p, seed=params.seed, stop=list(params.stop) or None,
                          presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                          logit_bias=dict(params.logit_bias) or None, logprobs=params.logprobs,
                          output_kind=RequestOutputKind.DELTA)

    async def stream(self, prompt: str | list[int], params: SamplingParams, generated: list[int] = (),
                     sent: int = 0) -> AsyncIterator[TokenEvent]:
        """Yield events for one request; closing the iterator early aborts it in vLLM. ``generated``/``sent``
        resume a request another replica had started (its tokens so far, and how many characters of their text
        the client got): vLLM continues after them as after a longer prompt, so greedy output goes on exactly;
        penalties then see the resumed tokens as prompt."""
        from vllm import TokensPrompt

        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        generated = list(generated)
        self.check(ids, params)
        self.check_resume(generated, params)
        request_id = f"mass-{next(self._ids)}"
        outputs = self.engine.generate(TokensPrompt(prompt_token_ids=ids + generated),
                                       self._sampling(params, len(generated)), request_id)
        count = len(generated)
        carried = self.tokenizer.decode(generated, skip_special_tokens=True)[sent:] if generated else ""
        self._in_flight += 1
        self.requests += 1
        try:
            async for out in outputs:
                piece = out.outputs[0]
                tokens = list(piece.token_ids)
                reason = piece.finish_reason
                if reason == "abort":
                    raise MassError("generation aborted by the vLLM engine")
                if reason == "stop" and piece.stop_reason is None and tokens and tokens[-1] == self.eos_id:
                    tokens = tokens[:-1]  # EOS ends a choice; like MASS's engine, it is not part of the output
                    logprobs = list(piece.logprobs or [])[:len(tokens)]
                else:
                    logprobs = list(piece.logprobs or [])
                count += len(tokens)
                text, carried = carried + piece.text, ""
                if text or tokens or reason:
                    yield TokenEvent(text, tokens, reason, len(ids), count,
                                     self._logprobs(tokens, logprobs, params.logprobs))
        except MassError:
            raise
        except Exception as exc:  # vLLM's EngineDeadError, EngineGenerateError: the request fails, named
            raise MassError(f"generation failed in vLLM: {type(exc).__name__}: {exc}") from exc
        finally:
            self._in_flight -= 1
            await outputs.aclose()  # a stream closed early (client gone): vLLM aborts the request

    def _logprobs(self, tokens: list[int], positions: list[dict], k: int | None) -> list[dict] | None:
        """MASS's logprob entries (OpenAI's shape) from vLLM's per-position {token id: Logprob}."""
        if k is None:
            return None
        out = []
        for token, position in zip(tokens, positions):
            top = sorted(((t, lp) for t, lp in position.items() if lp.rank is not None and lp.rank <= k),
                         key=lambda item: item[1].rank)
            out.append({**token_text(self.tokenizer, token), "logprob": _floor(position[token].logprob),
                        "top": [{**token_text(self.tokenizer, t), "logprob": _floor(lp.logprob)} for t, lp in top]})
        return out

    async def generate(self, prompt: str | list[int], params: SamplingParams) -> TokenEvent:
        """The whole completion as one event (text joined, usage and finish reason of the last)."""
        return await joined(self.stream(prompt, params), params.logprobs is not None)

    def stats(self) -> dict[str, int]:
        """Requests in flight now and served so far (vLLM keeps its own queue: waiting and running are not split
        here)."""
        return {"in_flight": self._in_flight, "requests": self.requests}

    def alive(self) -> bool:
        """Whether vLLM's engine core still runs (Serve's health check asks)."""
        return not self.engine.errored

    def shutdown(self) -> None:
        """Stop vLLM's engine core process."""
        self.engine.shutdown()


def _floor(logprob: float) -> float:
    return max(float(logprob), LOGPROB_FLOOR)  # -inf is not JSON; OpenAI reports -9999 for "impossible"
