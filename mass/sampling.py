"""Sampling parameters of one request, validated where they are built (pure Python: the SDK and the gateway
build them without torch).

``SamplingParams`` is the one place a request's decoding options are checked: the gateway, the SDK and
the model deployment all build it, so a value the sampler cannot use never reaches the engine thread.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from mass.errors import InvalidRequest

GREEDY_BELOW = 1e-5  # temperatures under this decode greedily (dividing logits by them overflows float32)
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_LOGPROBS = 20  # alternatives per token (OpenAI chat's top_logprobs limit)
MAX_LOGIT_BIAS = 1024  # entries in logit_bias
SEED_RANGE = (-2**63, 2**64 - 1)  # any signed or unsigned 64-bit seed (torch's manual_seed range)
LOGPROB_FLOOR = -9999.0
MAX_CHOICES = 64  # engine sequences one request may start (prompts x n)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. Building one validates it (InvalidRequest naming the field).

    Attributes:
        max_tokens: new tokens at most; None: as many as the model allows (the deployment resolves it).
        temperature: in [0, 2]; under 1e-5 decodes greedily, higher flattens the distribution.
        top_p: nucleus mass in [0, 1]; the most likely token is always kept (0 is greedy).
        seed: makes sampling reproducible per request (any 64-bit integer); None draws fresh entropy.
        stop: up to 4 non-empty strings that end generation (not included in the output).
        presence_penalty: in [-2, 2], subtracted once from the logit of every token already generated.
        frequency_penalty: in [-2, 2], subtracted from a token's logit per time it was generated.
        logit_bias: token id -> bias in [-100, 100] added to its logit before sampling.
        logprobs: None for none; k >= 0 returns each chosen token's log-probability and the k most likely
            alternatives (the model's own distribution, before penalties, biases and temperature).
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    logprobs: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise in place once
        if self.max_tokens is not None:
            set_(self, "max_tokens", _int(self.max_tokens, "max_tokens", 1, None))
        set_(self, "temperature", _number(self.temperature, "temperature", 0.0, 2.0))
        set_(self, "top_p", _number(self.top_p, "top_p", 0.0, 1.0))
        if self.seed is not None:
            set_(self, "seed", _int(self.seed, "seed", *SEED_RANGE))
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequest(f"stop takes at most {MAX_STOP} non-empty strings", param="stop")
        set_(self, "stop", stop)
        for name in ("presence_penalty", "frequency_penalty"):
            set_(self, name, _number(getattr(self, name), name, -2.0, 2.0))
        set_(self, "logit_bias", _logit_bias(self.logit_bias))
        if self.logprobs is not None:
            set_(self, "logprobs", _int(self.logprobs, "logprobs", 0, MAX_LOGPROBS))

    @property
    def greedy(self) -> bool:
        """True when the next token is the most likely one (after penalties and biases)."""
        return self.temperature < GREEDY_BELOW or self.top_p == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """True when penalties or biases change the logits before the choice."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (what crosses Serve); ``SamplingParams(**d)`` rebuilds and re-validates."""
        out = asdict(self)
        out["stop"] = list(self.stop)
        out["logit_bias"] = {str(k): v for k, v in self.logit_bias.items()}
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SamplingParams":
        """Build from ``to_dict()`` output (or any mapping of the fields); unknown fields are refused."""
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise InvalidRequest(f"unknown sampling fields: {', '.join(unknown)}", param=unknown[0])
        return cls(**values)

    def for_choice(self, index: int) -> "SamplingParams":
        """The params of choice ``index`` of ``n``: a seeded request's choices use seed + index (mod 2**64)."""
        if index == 0 or self.seed is None:
            return self
        return self.replace(seed=(self.seed + index) % 2**64)

    def replace(self, **changes: Any) -> "SamplingParams":
        """A copy with ``changes`` (validated again)."""
        return SamplingParams(**{**self.__dict__, **changes})


def _int(value: Any, name: str, low: int | None, high: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer, got {value!r}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidRequest(f"{name} must be {bounds}, got {value}", param=name)
    return value


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number, got {value!r}", param=name)
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be in [{low:g}, {high:g}], got {value}", param=name)
    return float(value)


def _logit_bias(bias: Any) -> dict[int, float]:
    if not isinstance(bias, Mapping):
        raise InvalidRequest("logit_bias must map token ids to numbers", param="logit_bias")
    if len(bias) > MAX_LOGIT_BIAS:
        raise InvalidRequest(f"logit_bias takes at most {MAX_LOGIT_BIAS} entries", param="logit_bias")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise InvalidRequest(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        if token < 0:
            raise InvalidRequest(f"logit_bias token id {token} is negative", param="logit_bias")
        out[token] = _number(value, "logit_bias", -100.0, 100.0)
    return out
