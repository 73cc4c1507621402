"""Per-version service levels: the gateways' request outcomes per served version, kept over a sliding window by
the controller (one window for all gateway replicas), and the judgement that rolls a canary back when its
figures break the configured bounds against production."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable

#: what a gateway reports per (model, version) between two table polls
Report = dict[str, dict[str, dict[str, Any]]]
MAX_SAMPLES = 20_000  # per version and window: bounds the controller's memory under any load
REPORT_SAMPLES = 5_000  # latencies per version and report: bounds a report's size between two polls


def empty_report() -> dict[str, Any]:
    """One version's outcomes since the last report."""
    return {"n": 0, "errors": 0, "latency_ms": [], "ttft_ms": []}


def note(report: Report, model: str, version: str, failed: bool, latency_ms: float | None = None,
         ttft_ms: float | None = None) -> None:
    """Count one finished call of ``model``'s ``version`` in ``report`` (a failed call's latency is not kept)."""
    entry = report.setdefault(model, {}).setdefault(str(version), empty_report())
    entry["n"] += 1
    entry["errors"] += bool(failed)
    if not failed and latency_ms is not None and len(entry["latency_ms"]) < REPORT_SAMPLES:
        entry["latency_ms"].append(round(latency_ms, 2))
        if ttft_ms is not None:
            entry["ttft_ms"].append(round(ttft_ms, 2))


def merge(into: Report, report: Report) -> None:
    """Add ``report`` (another reporter's, e.g. an SDK's handle calls) to ``into``."""
    for model, versions in report.items():
        for version, outcomes in versions.items():
            entry = into.setdefault(model, {}).setdefault(str(version), empty_report())
            entry["n"] += int(outcomes.get("n", 0))
            entry["errors"] += int(outcomes.get("errors", 0))
            for key in ("latency_ms", "ttft_ms"):
                room = REPORT_SAMPLES - len(entry[key])
                entry[key].extend(float(v) for v in list(outcomes.get(key, ()))[:max(room, 0)])


def p95(values: Iterable[float]) -> float | None:
    """The 95th percentile (nearest rank), None for no values."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)] if ordered else None


@dataclass(frozen=True)
class Figures:
    """One version's figures over the window."""

    requests: int
    errors: int
    p95_ms: float | None
    ttft_p95_ms: float | None

    @property
    def error_ratio(self) -> float:
        """Failed requests / requests (0 without requests)."""
        return self.errors / self.requests if self.requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"requests": self.requests, "errors": self.errors, "error_ratio": round(self.error_ratio, 4),
                "p95_ms": self.p95_ms, "ttft_p95_ms": self.ttft_p95_ms}


class Window:
    """A version's request outcomes over the last ``window_s`` seconds, merged from every gateway's reports."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.outcomes: deque[tuple[float, bool]] = deque()
        self.latency: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)
        self.ttft: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)
        self.total = 0  # requests ever reported (since this controller started), window or not

    def add(self, report: dict[str, Any], now: float | None = None) -> None:
        """Merge one gateway's report for this version."""
        now = time.monotonic() if now is None else now
        errors = min(int(report.get("errors", 0)), int(report.get("n", 0)))
        self.total += int(report.get("n", 0))
        self.outcomes.extend([(now, False)] * errors + [(now, True)] * (int(report.get("n", 0)) - errors))
        while len(self.outcomes) > MAX_SAMPLES:
            self.outcomes.popleft()
        self.latency.extend((now, float(v)) for v in report.get("latency_ms", ()))
        self.ttft.extend((now, float(v)) for v in report.get("ttft_ms", ()))

    def figures(self, since: float | None = None, now: float | None = None) -> Figures:
        """The figures over the window (or since ``since``, if that is later)."""
        now = time.monotonic() if now is None else now
        start = max(now - self.window_s, since or 0.0)
        for samples in (self.outcomes, self.latency, self.ttft):
            while samples and samples[0][0] < now - self.window_s:
                samples.popleft()
        outcomes = [ok for t, ok in self.outcomes if t >= start]
        return Figures(len(outcomes), outcomes.count(False), p95(v for t, v in self.latency if t >= start),
                       p95(v for t, v in self.ttft if t >= start))


def judge(canary: Figures, production: Figures, slo) -> str | None:
    """Which bound the canary broke against production, with the figures (None when it holds, or when the
    canary has fewer than ``slo.min_requests`` requests to judge). ``slo``: ``SloArgs``."""
    if canary.requests < slo.min_requests:
        return None
    bound = slo.error_ratio_factor * production.error_ratio + slo.error_ratio_margin
    if canary.error_ratio > bound:
        return (f"error rate {canary.error_ratio:.1%} ({canary.errors}/{canary.requests}) > "
                f"{slo.error_ratio_factor:g} x production's {production.error_ratio:.1%} + "
                f"{slo.error_ratio_margin:.0%} = {bound:.1%}")
    if production.requests < slo.min_requests:
        return None  # latency is judged against production's own, which needs as many requests
    for name, ours, theirs in (("p95 latency", canary.p95_ms, production.p95_ms),
                               ("p95 time to first token", canary.ttft_p95_ms, production.ttft_p95_ms)):
        if ours is None or theirs is None:
            continue
        limit = max(slo.latency_factor * theirs, theirs + slo.latency_margin_ms)
        if ours > limit:
            return (f"{name} {ours:.0f} ms > {slo.latency_factor:g} x production's {theirs:.0f} ms (and at least "
                    f"{slo.latency_margin_ms:g} ms more) = {limit:.0f} ms")
    return None
